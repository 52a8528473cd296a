#!/usr/bin/env python
"""N models in one extract pass against N separate extracts (issue #20 §5), wall and CPU seconds.

The models are random DINOv2s of ViT-S width (``blockless-small``: no transformer blocks, so the
data path and the writes dominate, as in ``bench_datapath.py``; ``--shape small`` for the real ViT-S
compute), half with 4 registers, half without, each with its own seed. Measured twice:
in-process (``extract`` per model against one ``extract_many``) and as whole commands (N
``tprobe extract --model M`` against one ``tprobe extract --model M1 --model M2 ...``), each into a
fresh cache. CPU seconds count every thread (and, for commands, the child processes). Nothing here
is a test; the stores of both ways are checked equal at the end.

    PYTHONPATH=. python scripts/bench_multimodel.py --models 4 --views orig
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _commands(cmds: list[list[str]], env: dict) -> tuple[float, float]:
    c0, w0 = _children_cpu(), time.perf_counter()
    for cmd in cmds:
        subprocess.run(
            [sys.executable, "-m", "tprobe.cli", *cmd], check=True, env=env, stdout=subprocess.DEVNULL
        )
    return time.perf_counter() - w0, _children_cpu() - c0


def _same(a: Path, b: Path) -> bool:
    files = lambda root: {  # noqa: E731
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
    return files(a) == files(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=4, help="N models [4: as DINOv2 S/B ± registers]")
    ap.add_argument("--shape", default="blockless-small", help="tprobe.testing.SHAPES key")
    ap.add_argument("--views", default="orig", help="--views of the preprocessing (all: the 6 views)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-commands", action="store_true", help="only the in-process comparison")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from tprobe.cache.extract import extract, extract_many
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import PreprocessConfig, preprocess
    from tprobe.models.backbones import resolve_model
    from tprobe.testing import save_random_dinov2

    n = args.models
    pre = preprocess(discover(), PreprocessConfig(views=args.views), progress=False)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = [
            save_random_dinov2(tmp / f"m{i}", shape=args.shape, registers=4 if i % 2 else 0, seed=i)
            for i in range(n)
        ]
        refs = [resolve_model(str(d)) for d in dirs]
        kw = dict(progress=False, batch_size=16)
        _, wall, cpu = _timed(lambda: [extract(pre, r, cache=tmp / "sep", **kw) for r in refs])
        rows.append(("in-process", f"{n} separate extract()", wall, cpu))
        res, wall, cpu = _timed(lambda: extract_many(pre, refs, cache=tmp / "one", **kw))
        rows.append(("in-process", f"one extract_many() of {n}", wall, cpu))
        assert all(r.status == "written" for r in res)
        assert _same(tmp / "sep", tmp / "one"), "one-pass stores differ from the separate ones"
        if not args.no_commands:
            base = ["extract", "--views", args.views, "--batch-size", "16", "--device", "cpu"]
            sep = [[*base, "--model", str(d), "--cache", str(tmp / "csep")] for d in dirs]
            wall, cpu = _commands(sep, env)
            rows.append(("commands", f"{n} x tprobe extract --model M", wall, cpu))
            many = [[*base, *[a for d in dirs for a in ("--model", str(d))], "--cache", str(tmp / "cone")]]
            wall, cpu = _commands(many, env)
            rows.append(("commands", f"tprobe extract --model M1 ... --model M{n}", wall, cpu))
            assert _same(tmp / "csep", tmp / "cone"), "one-command stores differ from the separate ones"
    load = os.getloadavg()[0]
    print(
        f"# bench_multimodel.py --models {n} --shape {args.shape} --views {args.views} --threads {args.threads}; "
        f"{len(pre.kept)} views, {os.cpu_count()} CPUs, load average {load:.1f} at the end"
    )
    print(f"{'how':11s} {'what':42s} {'wall s':>7s} {'CPU s':>7s} {'wall ratio':>10s}")
    for i, (how, what, wall, cpu) in enumerate(rows):
        ratio = f"{rows[i - 1][2] / wall:.2f}x" if i % 2 else ""
        print(f"{how:11s} {what:42s} {wall:7.1f} {cpu:7.1f} {ratio:>10s}")
    print("(wall ratio: the N separate runs' wall time over the one pass's; stores byte-identical both ways)")


if __name__ == "__main__":
    main()
