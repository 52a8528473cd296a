#!/usr/bin/env python
"""Benchmark: the full probe sweep (3 heads x 5 poolings, nested leave-one-donor-out) on a random ViT-S/14-reg cache.

Builds - once, then reuses - a randomly initialised model of the real ViT-S/14-with-registers shape and
its store of the bundled sample under FOLDER (extraction in bf16; a few minutes on 2 cores), then runs
``tprobe.probing.sweep.run_sweep`` exactly as ``tprobe probe --store STORE --head all --pool all`` does and prints
one row per run: seconds and mean ROC AUC over held-out donors, beside the figures of the engine before
this benchmark existed (docs/guide/benchmarks.md "Probe sweep" table, commit 07914ac: one process per fit via joblib,
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

# the engine before the fast one (commit 07914ac: one process per fit via joblib, 256-bin 200-tree XGBoost, every
# fit run separately) on THIS store (random ViT-S/14-reg, bf16), same machine: (pool, head) -> (mean ROC AUC, s)
BEFORE = {
    ("cls", "logreg"): (0.861, 2.3),
    ("cls", "mlp"): (0.866, 3.8),
    ("cls", "xgboost"): (0.878, 12.1),
    ("mean", "logreg"): (0.876, 1.5),
    ("mean", "mlp"): (0.886, 4.4),
    ("mean", "xgboost"): (0.906, 23.1),
    ("registers", "logreg"): (0.858, 1.6),
    ("registers", "mlp"): (0.860, 4.7),
    ("registers", "xgboost"): (0.864, 11.4),
    ("cls+mean", "logreg"): (0.872, 2.6),
    ("cls+mean", "mlp"): (0.895, 7.1),
    ("cls+mean", "xgboost"): (0.901, 31.9),
    ("concat", "logreg"): (0.881, 9.4),
    ("concat", "mlp"): (0.869, 20.0),
    ("concat", "xgboost"): (0.883, 194.6),
}
BEFORE_TOTAL_S = 344.0  # "5 min 44 s" for the whole command, 579 CPU-s


def build_store(folder: Path) -> Path:
    """The random ViT-S/14-reg model and its store of the bundled sample, built once under ``folder``."""
    import transformers

    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model
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


def _cpu() -> float:
    """CPU seconds of this process, its threads and its finished worker processes."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=Path("bench-cache"), help="where the model and store live")
    ap.add_argument("--engine", choices=["fast", "reference"], default="fast")
    ap.add_argument("--heads", default="logreg,mlp,xgboost")
    ap.add_argument("--pools", default="cls,mean,registers,cls+mean,concat")
    ap.add_argument("--n-jobs", type=int, default=2, help="worker threads of the fast engine")
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="summary.parquet of an earlier sweep of the same store to compare with "
        "(default: the engine of commit 07914ac on this store, docs/guide/benchmarks.md)",
    )
    args = ap.parse_args()

    import pandas as pd

    from tprobe.probing.sweep import run_sweep, store_sources

    store = build_store(args.folder)

    def report(ev):  # one line per finished run, as it happens (stderr, so the table stays clean)
        if ev.kind == "run":
            auc = ev.run.summary_["roc_auc"]["mean"]
            print(
                f"  {ev.source:9s} {ev.head:8s} AUC {auc:.3f}  {ev.run.seconds_:6.1f} s",
                file=sys.stderr,
                flush=True,
            )

    heads, pools = args.heads.split(","), args.pools.split(",")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        t0, c0 = time.perf_counter(), _cpu()
        res = run_sweep(
            store_sources(store, pools),
            heads,
            out=out,
            progress=report,
            probe_kwargs={"engine": args.engine, "n_jobs": args.n_jobs},
        )
        wall = time.perf_counter() - t0
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)  # the worker processes exit, so their CPU is counted
        cpu = _cpu() - c0
    before = BEFORE
    if args.before is not None:
        b = pd.read_parquet(args.before)
        before = {(r.pool, r.head): (r.roc_auc_mean, r.seconds) for r in b.itertuples()}
    rows = []
    for r in res.summary.itertuples():
        auc0, s0 = before.get((r.pool, r.head), (float("nan"), float("nan")))
        rows.append(
            {
                "pool": r.pool,
                "head": r.head,
                "roc_auc_mean": r.roc_auc_mean,
                "before": auc0,
                "delta": r.roc_auc_mean - auc0,
                "seconds": r.seconds,
                "before_s": s0,
            }
        )
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
