"""Time `tprobe curve` (default shots and repeats, leave-one-donor-out) per source and head.

    python scripts/bench_curve.py                       # pixels, logreg/knn/prototype
    python scripts/bench_curve.py --store cache/.../float16-fp32-<rows>.zarr --heads logreg

Prints one line per (source, head): rows, features, fits, seconds, and the mean AUC at k=1 and all.
"""

from __future__ import annotations

import argparse
import os

from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.features.pixels import pixel_features
from tprobe.features.sources import from_store
from tprobe.science.curve import LabelCurve, curve_band


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", action="append", default=[], help="feature store (repeatable)")
    ap.add_argument("--pool", default="cls")
    ap.add_argument("--no-pixels", action="store_true")
    ap.add_argument("--heads", default="logreg,knn,prototype")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    sources = [from_store(s, args.pool) for s in args.store]
    if not args.no_pixels:
        sources.append(pixel_features(preprocess(discover(), progress=False)))
    print(
        f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, repeats {args.repeats}, jobs {args.jobs}"
    )
    print(
        f"{'source':28s} {'head':10s} {'rows':>5s} {'feats':>6s} {'fits':>5s} {'seconds':>8s} {'AUC k=1':>8s} {'AUC all':>8s}"
    )
    for fs in sources:
        for head in args.heads.split(","):
            c = LabelCurve(head=head, repeats=args.repeats, n_jobs=args.jobs).fit(fs)
            band = curve_band(c.results_).set_index("shots")
            fits = c.results_.groupby(["fold", "shots", "repeat"]).ngroups
            print(
                f"{fs.name:28s} {head:10s} {len(fs.meta):5d} {fs.X.shape[1]:6d} {fits:5d} {c.seconds_:8.1f} "
                f"{band.loc['1', 'mean']:8.3f} {band.loc['all', 'mean']:8.3f}"
            )


if __name__ == "__main__":
    main()
