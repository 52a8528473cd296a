#!/usr/bin/env python
"""Benchmark: the full probe sweep (3 heads x 5 poolings, nested leave-one-donor-out) on a random ViT-S/14-reg cache.

Builds - once, then reuses - a randomly initialised model of the real ViT-S/14-with-registers shape and
its store of the bundled sample under FOLDER (extraction in bf16; a few minutes on 2 cores), then runs
``tprobe.sweep.run_sweep`` exactly as ``tprobe probe --store STORE --head all --pool all`` does and prints
one row per run: seconds and mean ROC AUC over held-out donors, beside the figures of the engine before
this benchmark existed (README "Probe sweep" table, commit 07914ac: one process per fit via joblib,
256-bin 200-tree XGBoost, every fit run separately). The features are random projections, so the AUCs
are plumbing checks, not results about DINOv2. Nothing here is a test.

    python scripts/bench_sweep.py --folder bench-cache                   # fast engine (the default)
    python scripts/bench_sweep.py --folder bench-cache --engine reference  # same heads, reference engine
    python scripts/bench_sweep.py --folder bench-cache --heads xgboost --pools concat
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# README "Probe sweep" table before the fast engine (2 cores): (pool, head) -> (mean ROC AUC, seconds)
BEFORE = {
    ("cls", "logreg"): (0.855, 3.1), ("cls", "mlp"): (0.882, 5.1), ("cls", "xgboost"): (0.892, 12.2),
    ("mean", "logreg"): (0.870, 2.4), ("mean", "mlp"): (0.891, 6.4), ("mean", "xgboost"): (0.905, 32.4),
    ("registers", "logreg"): (0.857, 1.8), ("registers", "mlp"): (0.882, 6.7),
    ("registers", "xgboost"): (0.898, 14.1),
    ("cls+mean", "logreg"): (0.860, 2.6), ("cls+mean", "mlp"): (0.895, 9.2), ("cls+mean", "xgboost"): (0.899, 36.5),
    ("concat", "logreg"): (0.881, 10.7), ("concat", "mlp"): (0.865, 24.9), ("concat", "xgboost"): (0.893, 202.8),
}  # fmt: skip
BEFORE_TOTAL_S = 387.0  # "6 min 27 s" for the whole command


def build_store(folder: Path) -> Path:
    """The random ViT-S/14-reg model and its store of the bundled sample, built once under ``folder``."""
    import transformers

    from tprobe.backbones import resolve_model
    from tprobe.dataset import discover
    from tprobe.extract import extract
    from tprobe.preprocess import preprocess
    from tprobe.testing import save_random_dinov2

    transformers.logging.set_verbosity_error()
    model_dir = folder / "vits14-reg-random"
    if not (model_dir / "config.json").exists():
        save_random_dinov2(model_dir, shape="small", registers=4)
    pre = preprocess(discover(), progress=False)
    t0 = time.perf_counter()
    res = extract(
        pre, resolve_model(str(model_dir)), cache=folder / "cache", precision="bf16", progress=False
    )
    if res.status != "up to date":
        print(f"built {res.path} in {time.perf_counter() - t0:.0f} s")
    return res.path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=Path("bench-cache"), help="where the model and store live")
    ap.add_argument("--engine", choices=["fast", "reference"], default="fast")
    ap.add_argument("--heads", default="logreg,mlp,xgboost")
    ap.add_argument("--pools", default="cls,mean,registers,cls+mean,concat")
    ap.add_argument("--n-jobs", type=int, default=2, help="worker threads of the fast engine")
    ap.add_argument("--before", type=Path, default=None,
                    help="summary.parquet of an earlier sweep of the same store to compare with "
                         "(default: the README figures, from another build of the store)")  # fmt: skip
    args = ap.parse_args()

    import pandas as pd

    from tprobe.sweep import run_sweep, store_sources

    store = build_store(args.folder)

    def report(ev):  # one line per finished run, as it happens (stderr, so the table stays clean)
        if ev.kind == "run":
            auc = ev.run.summary_["roc_auc"]["mean"]
            print(f"  {ev.source:9s} {ev.head:8s} AUC {auc:.3f}  {ev.run.seconds_:6.1f} s", file=sys.stderr,
                  flush=True)  # fmt: skip

    heads, pools = args.heads.split(","), args.pools.split(",")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_sweep(store_sources(store, pools), heads, out=out, progress=report,
                        probe_kwargs={"engine": args.engine, "n_jobs": args.n_jobs})  # fmt: skip
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # fits run in threads: all counted
    before = BEFORE
    if args.before is not None:
        b = pd.read_parquet(args.before)
        before = {(r.pool, r.head): (r.roc_auc_mean, r.seconds) for r in b.itertuples()}
    rows = []
    for r in res.summary.itertuples():
        auc0, s0 = before.get((r.pool, r.head), (float("nan"), float("nan")))
        rows.append({"pool": r.pool, "head": r.head, "roc_auc_mean": r.roc_auc_mean, "before": auc0,
                     "delta": r.roc_auc_mean - auc0, "seconds": r.seconds, "before_s": s0})  # fmt: skip
    table = pd.DataFrame(rows)
    print(
        f"engine {args.engine}, {os.cpu_count()} cores, load average before {load[0]:.2f} / after "
        f"{os.getloadavg()[0]:.2f} (1 min); store {store}"
    )
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    fits = table["seconds"].sum()
    print(
        f"sweep wall time {wall:.1f} s, CPU {cpu:.1f} s (runs {fits:.1f} s; pooling, saving and plots the rest); "
        f"before: runs {table['before_s'].sum():.1f} s"
        + (f", {BEFORE_TOTAL_S:.0f} s for the whole command" if args.before is None else "")
        + f"; worst AUC delta {table['delta'].min():+.3f}"
    )


if __name__ == "__main__":
    main()
