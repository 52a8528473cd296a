#!/usr/bin/env python
"""One extract of the whole bundled sample, timed in-process (wall and CPU).

``--model blockless`` (default) runs the blockless ViT-S-width model (patch embedding and final
layer norm, no transformer blocks). ``--model null`` swaps in :class:`NullViT`, a BENCHMARK DEVICE
ONLY (never used by the library): it returns tokens of the right shape from one tiny op, so the
figure is the data path alone (read, views, normalisation, copy to host, hashing, compression,
writing, fsync), the model forward costing ~nothing.

For paired old/new comparisons on a shared machine: run it alternately with PYTHONPATH pointing at
each checkout (the CPU seconds, all threads, are less sensitive to other load than the wall time).
``bench_pipeline.py`` builds the same blockless model. Nothing here is a test.

    PYTHONPATH=. python scripts/bench_datapath.py --threads 2 --compression zstd --tag new
    PYTHONPATH=. python scripts/bench_datapath.py --model null --tag new
"""

from __future__ import annotations

import argparse
import cProfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def null_vit(hidden: int, tokens: int):
    """A stand-in for a ViT whose forward costs ~nothing: fixed random tokens plus each view's mean.

    Benchmark device only. Its tokens are random-normal-like (as a random-weight ViT's), so they
    compress as the codec benchmark's do; each view's own mean keeps rows distinct.
    """
    import torch

    class NullViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("base", torch.randn(1, tokens, hidden, generator=g))

        def forward(self, pixel_values, **_):  # numpy, one thread: no torch thread-pool hand-offs
            m = pixel_values[:, :1, ::14, ::14].numpy().mean((1, 2, 3))  # touches the input, ~free
            return SimpleNamespace(last_hidden_state=torch.from_numpy(self.base.numpy() + m[:, None, None]))

    return NullViT().eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compression", default=None, help="[default: extract's]")
    ap.add_argument("--model", choices=["blockless", "null"], default="blockless")
    ap.add_argument("--tag", default="")
    ap.add_argument("--write-threads", type=int, help="[default: extract's, min(4, cores)]")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the calling thread's extract() into FILE")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import zarr  # noqa: F401 - imported by extract's store creation: start-up, not data path

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
        if args.model == "null":
            layout = bb.layout(pre.config.canvas)
            bb.model = null_vit(layout.hidden, 1 + layout.registers + layout.patches)
        kw = {"compression": args.compression} if args.compression else {}
        c0, w0 = time.process_time(), time.perf_counter()
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        if args.write_threads:
            kw["write_threads"] = args.write_threads
        res = extract(pre, bb, cache=Path(tmp) / "cache", progress=False, batch_size=16, **kw)
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    work = res.times.total  # the loop and the writers' drain (what issue 20's bar counts)
    print(
        f"{args.tag} {args.model} threads {args.threads} {args.compression or 'default'}: {res.images} views, "
        f"work {work:.2f} s ({res.images / work:.0f} views/s); whole call {wall:.2f} s wall, {cpu:.2f} CPU-s "
        f"(store creation included); {res.times.decodes} decodes; {res.times.line()}"
    )


if __name__ == "__main__":
    main()
