"""``tprobe extract --workers N`` on one node: N extract processes, worker i taking ``--shard i/N``.

The same shard contract as SLURM array tasks (:mod:`tprobe.cluster.slurm`): each worker takes units
``i::N`` of the store; whichever finds every unit done seals it. A worker that dies leaves its finished
units; the others run on, and a rerun of the same command redoes only the missing units. Each worker
is the ordinary command line on the caller's own options (``args``), so what ran is what a user types.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tprobe.cache.keys import is_sealed, store_path
from tprobe.errors import TprobeError
from tprobe.models.tokens import TOKENS

if TYPE_CHECKING:
    from tprobe.cache.extract import ExtractResult
    from tprobe.data.preprocess import Preprocessed
    from tprobe.models.backbones import ModelRef

__all__ = [
    "EXECUTORS",
    "WorkersResult",
    "check_executor",
    "extract_workers",
    "parse_devices",
    "run_workers",
    "worker_env",
]

EXECUTORS = ("local", "slurm")


@dataclass
class WorkersResult:
    status: str  # "written" | "up to date" | "partial (shard)"
    seconds: float
    codes: list[int]  # each worker's exit status


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_devices(devices: str | Sequence[str] | None) -> list[str]:
    """``"0,1,2"`` (or ``["0", "1"]``) -> ``["0", "1", "2"]``; ``None`` -> ``[]``."""
    if devices is None:
        return []
    items = devices.split(",") if isinstance(devices, str) else devices
    return [str(d).strip() for d in items]


def check_executor(
    *,
    executor: str = "local",
    workers: int = 1,
    devices: str | Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    shards: int | None = None,
    cache: str | Path = "cache",
) -> list[str]:
    """Refuse executor options that do not go together, before any work; return the GPUs of ``devices``."""
    if executor not in EXECUTORS:
        raise TprobeError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "local" and shards:
        raise TprobeError("--shards N is for --executor slurm; one local worker takes --shard i/N")
    if workers > 1 and (executor == "slurm" or tuple(shard) != (0, 1)):
        raise TprobeError(
            "--workers N runs --shard 0/N ... N-1/N itself on this node; leave out --shard and "
            "--executor slurm (or use --executor slurm --shards N instead of --workers)"
        )
    gpus = parse_devices(devices)
    if devices and (not all(d.isdigit() for d in gpus) or workers == 1):
        shown = devices if isinstance(devices, str) else ",".join(map(str, devices))
        raise TprobeError(f"--devices {shown!r}: give GPU indices like 0,1,2,3, with --workers N")
    if executor == "slurm":
        from tprobe.cluster.slurm import script_value

        if tuple(shard) != (0, 1):
            raise TprobeError("--shard is for one worker; with --executor slurm give --shards N instead")
        if not shards:
            raise TprobeError("--executor slurm needs --shards N (array tasks; e.g. the number of GPUs)")
        script_value("--cache", Path(cache).absolute())
        script_value("the working directory", Path.cwd())
    return gpus


def worker_env(i: int, n: int, devices: list[str], cores: int | None = None) -> dict[str, str]:
    """Worker ``i`` of ``n``'s environment: its device (``CUDA_VISIBLE_DEVICES``), or on CPU cores/n threads."""
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
    else:
        threads = str(max(1, (cores or _cpus()) // n))
        env.update(
            OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads
        )  # torch takes its thread count from these
    return env


def run_workers(args: list[str], path: Path, n: int, devices: list[str]) -> WorkersResult:
    """Run ``tprobe extract ARGS --shard i/n`` as ``n`` processes on this node and wait for all of them.

    The same shard contract as SLURM array tasks: each takes units ``i::n``; whichever finds every
    unit done seals the store. A worker that dies leaves its finished units; the others run on, and a
    rerun of the same command redoes only the missing units.
    """
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "tprobe.cli", "extract", *args, "--shard", f"{i}/{n}"]
        procs.append(subprocess.Popen(cmd, env=worker_env(i, n, devices), stdout=subprocess.DEVNULL))
    codes = [p.wait() for p in procs]
    sealed = is_sealed(path)
    return WorkersResult("written" if sealed else "partial (shard)", time.perf_counter() - t0, codes)


def extract_workers(
    pre: Preprocessed,
    ref: ModelRef,
    *,
    workers: int,
    devices: Sequence[str] = (),
    args: Sequence[str],
    cache: str | Path = "cache",
    fmt: str = "zarr",
    dtype: str = "float16",
    device: str = "auto",
    precision: str = "auto",
    tokens=TOKENS,
    layers="-1",
    patch_layers="-1",
) -> ExtractResult:
    """Extract ``pre`` with ``workers`` local processes (``--devices``: one GPU each, round robin; default:
    every visible GPU, none on CPU) and return when all exit; a failed worker is one line.

    ``args``: the ``tprobe extract`` options that name this store (without ``--shard``); the canvas
    (maybe rounded to the patch size), the resolved precision, ``--workers 1`` and one device per
    worker are set in it here, so every worker writes the store computed here.
    """
    from tprobe.cache.extract import ExtractResult, check_sealed, resolve_precision
    from tprobe.models.backbones import pick_device

    dev = pick_device(device)
    gpus = list(devices)
    if not gpus and dev.type == "cuda":
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    precision = resolve_precision(precision, dev)
    path = store_path(
        cache, pre, ref, dtype, fmt, precision, tokens, layers=layers, patch_layers=patch_layers
    )
    done = dict(rows=len(pre.kept), model=ref, workers=workers, devices=gpus)
    if is_sealed(path):
        # as a one-process extract: a missing chunk refused, the manifest restored
        check_sealed(path, pre.kept)
        return ExtractResult(path, "up to date", **done)
    overrides = {
        "--canvas": str(pre.config.canvas),
        "--workers": "1",
        "--devices": None,
        "--precision": precision,
    }
    if gpus and device.startswith("cuda:"):
        overrides["--device"] = "cuda"  # each worker sees only its own GPU
    from tprobe.cluster.slurm import with_options

    res = run_workers(with_options(args, overrides), path, workers, gpus)
    failed = [f"worker {i} (--shard {i}/{workers}) exit status {c}" for i, c in enumerate(res.codes) if c]
    if failed:
        raise TprobeError(
            f"{'; '.join(failed)}: the store is not sealed; finished units are kept, rerun the same "
            "command to redo the rest (the worker's own error is above)"
        )
    return ExtractResult(path, res.status, seconds=res.seconds, **done)
