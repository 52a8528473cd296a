#!/usr/bin/env python
"""Measure the store's candidate codecs on float16 tokens: encode throughput and bytes per view.

Tokens: a random-weight ViT-S/14-reg (``--shape small``; ``blockless-small`` is the data-path model
of ``bench_pipeline.py``, whose padding tokens repeat exactly) on the first ``--n`` views of the bundled sample, float16, in 64-row
units (the store's chunks). The store writes Blosc at level 3 with byte shuffle (``tprobe extract
--compression lz4|zstd``; ``none`` stores raw bytes). Each codec encodes every unit on one thread; "2 threads" encodes two
units at a time (what the writer does; Blosc releases the GIL). Nothing here is a test.

    python scripts/bench_codecs.py --n 640
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def tokens(n: int, shape: str) -> np.ndarray:
    import torch

    from tprobe.cache.extract import extract
    from tprobe.cache.store import FeatureStore
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import Backbone
    from tprobe.testing import save_random_dinov2

    torch.set_num_threads(1)
    pre = preprocess(discover())
    pre.manifest = pre.manifest[pre.manifest["kept"]].iloc[:n].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_random_dinov2(Path(tmp) / "model", shape=shape)
        res = extract(
            pre,
            Backbone.from_pretrained(str(model), device="cpu"),
            cache=tmp,
            compression="none",
            progress=False,
        )
        store = FeatureStore.open(res.path)
        return np.concatenate([store.read(k).reshape(n, -1) for k in ("cls", "registers", "patches")], axis=1)


def codecs() -> dict:
    from numcodecs import LZ4, Blosc, Zstd

    out = {"none": None}
    for cname in ("lz4", "zstd"):
        for shuffle, tag in (
            (Blosc.SHUFFLE, "shuffle"),
            (Blosc.NOSHUFFLE, "noshuffle"),
            (Blosc.BITSHUFFLE, "bitshuffle"),
        ):
            for level in (1, 3, 5):
                out[f"blosc {cname} {level} {tag}"] = Blosc(cname=cname, clevel=level, shuffle=shuffle)
    out["zstd 3 (no blosc)"] = Zstd(level=3)
    out["lz4 (no blosc)"] = LZ4()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--shape",
        default="small",
        help="save_random_dinov2 shape: small (ViT-S/14-reg, random "
        "weights: tokens mixed by attention) or blockless-small (padding patches repeat exactly)",
    )
    args = ap.parse_args()
    x = tokens(args.n, args.shape).astype(np.float16)
    units = [np.ascontiguousarray(x[i : i + 64]) for i in range(0, len(x), 64)]
    raw = x.nbytes
    print(
        f"{args.shape} model, {len(x)} views, {raw / len(x) / 1e3:.1f} KB/view raw float16; best of {args.repeat}"
    )
    print(
        f"{'codec':32s} {'KB/view':>8s} {'ratio':>6s} {'MB/s 1 thr':>10s} {'MB/s 2 thr':>10s} {'views/s 1 thr':>13s}"
    )
    for name, codec in codecs().items():
        enc = (lambda u: u.tobytes()) if codec is None else codec.encode
        size = sum(len(enc(u)) for u in units)
        best1 = best2 = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for u in units:
                enc(u)
            best1 = min(best1, time.perf_counter() - t0)
            with ThreadPoolExecutor(2) as pool:
                t0 = time.perf_counter()
                list(pool.map(enc, units))
                best2 = min(best2, time.perf_counter() - t0)
        print(
            f"{name:32s} {size / len(x) / 1e3:8.1f} {raw / size:6.3f} {raw / best1 / 1e6:10.0f} "
            f"{raw / best2 / 1e6:10.0f} {len(x) / best1:13.0f}"
        )


if __name__ == "__main__":
    main()
