#!/usr/bin/env python
"""Benchmark the extract pipeline stage by stage: the data path alone, and the real ViT-S forward.

1. **Data path**: a DINOv2 model of ViT-S/14-reg token width (384, 4 registers, patch 14) but *no
   transformer blocks*, so the model costs almost nothing and reading, decoding, copying and
   writing show. Whole bundled sample (3,954 views at 140 px), for each ``--workers``.
2. **Real forward**: a random model of the real ViT-S/14-reg shape; the bare forward (batch 16,
   same dtype, tensors prepared in advance, timed in the extract's own process right after it, so
   drift between processes cannot bias the ratio) against the end-to-end extract of the first
   ``--n`` views, start-up (model load) included.

Prints one table per part with per-stage seconds from ``ExtractResult.times`` beside the matmul
peak. With ``--old DIR`` it also runs part 1 with the tprobe code checked out in DIR (for a
before/after on the same machine). Nothing here is a test.

    python scripts/bench_pipeline.py                  # both parts, workers 0 1 2
    python scripts/bench_pipeline.py --skip-real --old ../tprobe-old
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_extract import matmul_peak  # the same peak measurement as the extraction benchmark

ROOT = Path(__file__).resolve().parents[1]


RUN = r"""
import json, sys, tempfile, time
t_start = time.perf_counter()
import torch
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.models.backbones import Backbone
from tprobe.cache.extract import extract
pre = preprocess(discover())
n = int(sys.argv[3])
if n:
    pre.manifest = pre.manifest[pre.manifest["kept"]].iloc[:n].reset_index(drop=True)


def bare(bb, n):  # the model alone on prepared (16, 3, 140, 140) batches, in this same process
    x = bb.pixel_values(torch.rand(16, 140, 140))
    with torch.inference_mode():
        bb(x)
        t0 = time.perf_counter()
        for _ in range(max(1, n // 16)):
            bb(x).last_hidden_state.numpy()
    return max(1, n // 16) * 16 / (time.perf_counter() - t0)


t_model = time.perf_counter()
bb = Backbone.from_pretrained(sys.argv[1], device="cpu")
t_loaded = time.perf_counter()
with tempfile.TemporaryDirectory() as cache:
    kw = dict(cache=cache, progress=False, workers=int(sys.argv[2]), batch_size=16)
    res = extract(pre, bb, **kw)
t_end = time.perf_counter()
times = res.times.to_dict() if hasattr(res, "times") else {}
# the bare forward after the run (same process, same threads), so machine drift between processes cannot bias the ratio
bare_after = bare(bb, res.images) if len(sys.argv) > 4 else None
print(json.dumps({"views": res.images, "loop": res.seconds, "load_model": t_loaded - t_model,
                  "end_to_end": (t_end - t_model), "times": times, "bare": bare_after}))
"""


def run(code_dir: Path, model: Path, workers: int, n: int = 0, bare: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(model), str(workers), str(n), *(["bare"] if bare else [])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=code_dir,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def fmt_row(label, r) -> str:
    t = r["times"]
    return (
        f"{label:28s} {r['views']:6d} {r['loop']:7.2f} {r['views'] / r['loop']:8.0f} "
        f"{t.get('read', float('nan')):6.2f} {t.get('wait_data', float('nan')):6.2f} "
        f"{t.get('forward', float('nan')):7.2f} {t.get('write', float('nan')):6.2f} "
        f"{t.get('wait_write', float('nan')):6.2f} {r['load_model']:6.2f}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=978, help="views for the real-forward part")
    ap.add_argument("--old", type=Path, default=None, help="another tprobe checkout to compare (part 1)")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    from tprobe.testing import save_random_dinov2

    torch.set_num_threads(torch.get_num_threads())
    print(
        f"threads {torch.get_num_threads()}, cores {os.cpu_count()}, torch {torch.__version__}; "
        f"matmul peak fp32 {matmul_peak():.0f} GFLOP/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        blockless = save_random_dinov2(Path(tmp) / "blockless", shape="blockless-small")
        head = (
            f"{'path':28s} {'views':>6s} {'work s':>7s} {'views/s':>8s} {'read':>6s} {'wait':>6s} "
            f"{'forward':>7s} {'write':>6s} {'wwait':>6s} {'load':>6s}"
        )
        print("\n1. data path: blockless ViT-S/14-reg-width model, whole bundled sample (fp32, batch 16)")
        print("   work s = extract loop + writer drain (start-up excluded); read = decode+views (summed over")
        print(
            "   workers); wait = model waited for data; wwait = model waited for the writer; load = from_pretrained"
        )
        print(head)
        for w in args.workers:
            print(fmt_row(f"tprobe --loader-workers {w}", run(ROOT, blockless, w)), flush=True)
            if args.old:
                print(fmt_row(f"old code --loader-workers {w}", run(args.old, blockless, w)), flush=True)
        if args.skip_real:
            return
        small = save_random_dinov2(Path(tmp) / "small", shape="small")
        print(f"\n2. real ViT-S/14-reg forward (random weights), first {args.n} views, fp32, batch 16")
        r = run(ROOT, small, 0, args.n, bare=True)
        bare = r["bare"]  # measured in the extract's own process, right after it
        e2e = r["views"] / r["end_to_end"]
        loop = r["views"] / r["loop"]
        print(f"bare forward          {bare:6.1f} views/s  (same process, after the extract)")
        print(f"extract loop          {loop:6.1f} views/s  ({loop / bare:.2f} of bare forward)")
        print(
            f"extract end to end    {e2e:6.1f} views/s  ({e2e / bare:.2f} of bare forward; model load "
            f"{r['load_model']:.1f} s included)"
        )
        if args.old:
            o = run(args.old, small, 0, args.n, bare=True)
            print(
                f"old code end to end  {o['views'] / o['end_to_end']:6.1f} views/s  "
                f"({o['views'] / o['end_to_end'] / o['bare']:.2f} of its bare forward {o['bare']:.1f}; loop "
                f"{o['views'] / o['loop']:.1f} views/s)"
            )
        print(head)
        print(fmt_row("tprobe --loader-workers 0", r))


if __name__ == "__main__":
    main()
