#!/usr/bin/env python
"""Benchmark: probes at scale - nested leave-one-donor-out on synthetic pooled features, 25k to 400k cells.

Each configuration (cells x donors x head) runs in a fresh subprocess: it draws the synthetic features
(``tprobe.features.synthetic.synthetic_features``: two Gaussian classes, a random offset per donor, 384 float32
columns, rows grouped by donor), then times ``tprobe.probing.run.ProbeRun(head=..., n_jobs=2).fit`` - the
engine ``tprobe probe`` uses: nested LODO with the inner C / depth / k search and the final head's
search and refit. It prints one row per configuration - wall time of the fit, mean ROC AUC over held-out
donors, the peak resident set of the subprocess (VmHWM, or its own worker processes' ru_maxrss if
larger), the floor: the resident set after the imports and one run of the same head, with the logreg
solver the measured run uses, on 1,200 cells (the interpreter, torch, scikit-learn, XGBoost, their thread
pools, the code pages of the solver: it does not grow with N), the float32 feature matrix's size and (peak - floor) / matrix - and then the
growth exponent per head and donor count: the least-squares slope of log(time) on log(cells).

``--store-views N`` also builds a store of N views of random float16 tokens (``--store-shape``, default
100 patches x 64 hidden + CLS + 4 registers) and pools it (cls, mean, registers in one pass,
``FeatureStore.pooled_many``) in a fresh subprocess: peak RSS beside the size all its tokens would take.

Targets (issue 20): growth <= N^1.15; peak RSS <= 3x the float32 matrix; 400k-cell logreg LODO <= 5 min
on 2 cores. Nothing here is a test.

    python scripts/bench_scale.py                                  # 25k, 100k, 400k; 6 and 20 donors; all heads
    python scripts/bench_scale.py --sizes 25000,100000 --heads logreg --donors 6
    python scripts/bench_scale.py --quick                          # 2k-8k cells, 6 donors: a smoke run
    python scripts/bench_scale.py --heads logreg --sizes 25000 --store-views 100000  # + pooling a 100k-view store
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(cells: int, donors: int, head: str, dims: int, n_jobs: int, solver: str) -> dict:
    """Run one configuration in this process; return its measurements."""
    import numpy as np

    import tprobe.probing.linear  # noqa: F401
    from tprobe.features.synthetic import peak_rss_mb, synthetic_features
    from tprobe.probing.linear import resolve_solver
    from tprobe.probing.run import ProbeRun

    if head == "xgboost":
        import xgboost  # noqa: F401
    if head == "logreg" and solver != "lbfgs":
        import torch  # noqa: F401

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    # the same head once on 1,200 cells first: lazily loaded code and thread pools count in the floor. With
    # the solver the measured run resolves to: "auto" picks scikit-learn's lbfgs for 1,200 cells, and the
    # torch solver's first fit then pages in ~90 MB of torch's code during the measured run
    warm = resolve_solver(solver, head, "l2", cells) or solver
    ProbeRun(head=head, n_jobs=n_jobs, n_boot=0, solver=warm).fit(synthetic_features(1200, 4, dims, seed=1))
    floor = rss_mb()
    t0 = time.perf_counter()
    fs = synthetic_features(cells, donors, dims, seed=0)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = ProbeRun(head=head, n_jobs=n_jobs, n_boot=0, solver=solver).fit(fs)
    seconds = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "cells": cells,
        "donors": donors,
        "head": head,
        "solver": getattr(run, "solver_", None),
        "seconds": round(seconds, 1),
        "gen_seconds": round(t_gen, 1),
        "auc": round(float(run.summary_["roc_auc"]["mean"]), 4),
        "peak_mb": round(max(peak_rss_mb(), children), 0),
        "floor_mb": round(floor, 0),
        "matrix_mb": round(fs.X.nbytes / 2**20, 1),
        "chosen": [c["params"] for c in run.chosen_][:1],
        "dtype": str(np.asarray(fs.X).dtype),
    }


def build_store(path: Path, views: int, hidden: int, patches: int, registers: int = 4) -> None:
    """A sealed Zarr store of ``views`` rows of random float16 tokens (no model: only its shape matters)."""
    import numpy as np

    from tprobe.cache.store import FeatureStore

    store = FeatureStore.create(
        path,
        row_ids=[f"v{i:07d}" for i in range(views)],
        hidden=hidden,
        registers=registers,
        patches=patches,
        compression="lz4",
    )
    rng = np.random.default_rng(0)
    for unit in store.pending_units():
        n = store.unit_slice(unit).stop - store.unit_slice(unit).start
        store.write_unit(
            unit,
            {
                "cls": rng.standard_normal((n, hidden), np.float32),
                "registers": rng.standard_normal((n, registers, hidden), np.float32),
                "patches": rng.standard_normal((n, patches, hidden), np.float32),
            },
        )
    assert store.finalize()


def pool_store(path: Path) -> dict:
    """Pool a store (cls, mean, registers in one pass) in this process; return time and memory."""
    from tprobe.cache.store import FeatureStore
    from tprobe.features.synthetic import peak_rss_mb

    store = FeatureStore.open(path)
    with open("/proc/self/status") as f:
        floor = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    t0 = time.perf_counter()
    out = store.pooled_many(["cls", "mean", "registers"])
    seconds = time.perf_counter() - t0
    n, p, d = store.shapes["patches"]
    return {
        "views": n,
        "patches": p,
        "hidden": d,
        "chunk_rows": store.chunk_rows,
        "seconds": round(seconds, 1),
        "peak_mb": round(peak_rss_mb(), 0),
        "floor_mb": round(floor, 0),
        "tokens_f32_mb": round(n * (1 + store.num_registers + p) * d * 4 / 2**20, 0),
        "pooled_mb": round(sum(v.nbytes for v in out.values()) / 2**20, 0),
    }


def store_row(views: int, hidden: int, patches: int, env: dict) -> None:
    """Build a random-token store of ``views`` rows, then pool it in a fresh subprocess; print one line."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        path = Path(tmp) / "tokens.zarr"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--build-store", str(path), str(views), str(hidden), str(patches)],
            check=True,
            env=env,
        )
        built = time.perf_counter() - t0
        res = subprocess.run(
            [sys.executable, __file__, "--pool-store", str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        f"pooling a store of {r['views']} views x {1 + 4 + r['patches']} tokens x {r['hidden']} (float16, "
        f"chunks of {r['chunk_rows']} rows; built in {built:.0f} s): cls+mean+registers in {r['seconds']:.1f} s, "
        f"peak RSS {r['peak_mb']:.0f} MB (floor {r['floor_mb']:.0f} MB) for {r['pooled_mb']:.0f} MB of pooled "
        f"output; all its tokens in float32 would be {r['tokens_f32_mb']:.0f} MB",
        flush=True,
    )


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) on log(cells)."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="25000,100000,400000", help="cells, comma-separated")
    ap.add_argument("--donors", default="6,20", help="donor counts, comma-separated")
    ap.add_argument("--heads", default="logreg,xgboost,knn", help="heads, comma-separated")
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--solver", default="auto", help="logreg solver: auto, lbfgs or torch (ProbeRun.solver)")
    ap.add_argument(
        "--timeout", type=float, default=1800, help="seconds per configuration before it is stopped"
    )
    ap.add_argument("--quick", action="store_true", help="2k, 4k, 8k cells, 6 donors: a smoke run")
    ap.add_argument(
        "--cap",
        default="",
        help="largest cells (and donors) per head, e.g. knn=25000x6,xgboost=25000: "
        "bigger configurations are listed as skipped, not run",
    )
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--store-views",
        type=int,
        default=0,
        help="also pool a random-token store of this many views (0: skip)",
    )
    ap.add_argument("--store-shape", default="100,64", help="patches,hidden of that store (4 registers)")
    ap.add_argument("--one", nargs=3, metavar=("CELLS", "DONORS", "HEAD"), help=argparse.SUPPRESS)
    ap.add_argument("--build-store", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--pool-store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_store:
        path, views, hidden, patches = args.build_store
        build_store(Path(path), int(views), int(hidden), int(patches))
        return
    if args.pool_store:
        print(json.dumps(pool_store(Path(args.pool_store))))
        return
    if args.one:
        cells, donors, head = args.one
        print(json.dumps(one(int(cells), int(donors), head, args.dims, args.n_jobs, args.solver)))
        return
    sizes = [2000, 4000, 8000] if args.quick else [int(s) for s in args.sizes.split(",")]
    donor_counts = [6] if args.quick else [int(d) for d in args.donors.split(",")]
    heads = args.heads.split(",")
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(
        f"# {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}; dims {args.dims}, "
        f"n_jobs {args.n_jobs}; each row a fresh subprocess",
        flush=True,
    )
    header = (
        f"{'cells':>8} {'donors':>6} {'head':>8} {'solver':>6} {'seconds':>8} {'AUC':>6} {'peak MB':>8} "
        f"{'floor MB':>8} {'X MB':>6} {'(peak-floor)/X':>14}"
    )
    print(header, flush=True)
    caps = {}
    for item in filter(None, args.cap.split(",")):
        head, _, limit = item.partition("=")
        cells, _, donors = limit.partition("x")
        caps[head] = (int(cells), int(donors) if donors else None)
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for donors in donor_counts:
        for head in heads:
            for cells in sizes:
                cap_cells, cap_donors = caps.get(head, (None, None))
                if (cap_cells and cells > cap_cells) or (cap_donors and donors > cap_donors):
                    print(
                        f"{cells:>8} {donors:>6} {head:>8} skipped (--cap {head}={args.cap.split(head + '=')[1].split(',')[0]})",
                        flush=True,
                    )
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    str(cells),
                    str(donors),
                    head,
                    "--dims",
                    str(args.dims),
                    "--n-jobs",
                    str(args.n_jobs),
                    "--solver",
                    args.solver,
                ]
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                except subprocess.TimeoutExpired:
                    print(
                        f"{cells:>8} {donors:>6} {head:>8} stopped after {args.timeout:.0f} s (not measured)",
                        flush=True,
                    )
                    rows.append({"cells": cells, "donors": donors, "head": head, "timeout": args.timeout})
                    continue
                if res.returncode != 0:
                    print(f"{cells:>8} {donors:>6} {head:>8} failed: {res.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(r)
                ratio = (r["peak_mb"] - r["floor_mb"]) / r["matrix_mb"] if r["matrix_mb"] else float("nan")
                print(
                    f"{cells:>8} {donors:>6} {head:>8} {r['solver'] or '-':>6} {r['seconds']:>8.1f} "
                    f"{r['auc']:>6.3f} {r['peak_mb']:>8.0f} {r['floor_mb']:>8.0f} {r['matrix_mb']:>6.0f} "
                    f"{ratio:>14.2f}",
                    flush=True,
                )
    if args.store_views:
        patches, hidden = (int(v) for v in args.store_shape.split(","))
        store_row(args.store_views, hidden, patches, env)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    print("growth exponent (slope of log time on log cells; target <= 1.15):")
    for donors in donor_counts:
        for head in heads:
            pts = [
                (r["cells"], r["seconds"])
                for r in rows
                if r["donors"] == donors and r["head"] == head and "seconds" in r
            ]
            b = slope(pts)
            cells = ", ".join(f"{n // 1000}k" for n, _ in pts)
            print(
                f"  {head:>8}, {donors:>2} donors: " + (f"{b:.2f} over {cells}" if b is not None else "n/a")
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
