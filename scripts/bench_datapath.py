#!/usr/bin/env python
"""One extract of the whole bundled sample with the blockless model, timed in-process (wall and CPU).

For paired old/new comparisons on a shared machine: run it alternately with PYTHONPATH pointing at
each checkout (the CPU seconds, all threads, are less sensitive to other load than the wall time).
``bench_pipeline.py`` builds the same blockless model. Nothing here is a test.

    PYTHONPATH=. python scripts/bench_datapath.py --threads 2 --compression zstd --tag new
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compression", default=None, help="[default: extract's]")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import Backbone
    from tprobe.testing import save_random_dinov2

    pre = preprocess(discover())
    with tempfile.TemporaryDirectory() as tmp:
        bb = Backbone.from_pretrained(
            str(save_random_dinov2(Path(tmp) / "bl", shape="blockless-small")), device="cpu"
        )
        kw = {"compression": args.compression} if args.compression else {}
        c0, w0 = time.process_time(), time.perf_counter()
        res = extract(pre, bb, cache=Path(tmp) / "cache", progress=False, batch_size=16, **kw)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(
        f"{args.tag} threads {args.threads} {args.compression or 'default'}: {res.images} views, work {wall:.2f} s "
        f"wall, {cpu:.2f} CPU-s; {res.times.line()}"
    )


if __name__ == "__main__":
    main()
