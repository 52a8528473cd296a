"""Run every kept image view through a backbone once and write its tokens to a store.

Shape of the loop (after clip-retrieval): a reader (DataLoader over manifest rows, batches never
crossing a store unit) -> a mapper (the model under ``inference_mode``) -> a writer (buffers one
unit, writes it whole, marks it done). Units already done are skipped, so a rerun resumes.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from tprobe import __version__
from tprobe.backbones import Backbone, ModelRef
from tprobe.errors import TprobeError
from tprobe.preprocess import PreprocessConfig, Preprocessed, load_view
from tprobe.store import FORMATS, FeatureStore

__all__ = ["ExtractResult", "extract", "store_dir", "store_path", "find_store", "DEFAULT_CACHE"]
log = logging.getLogger(__name__)
DEFAULT_CACHE = Path("cache")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def store_dir(cache: str | Path, pre: Preprocessed, ref: ModelRef) -> Path:
    """``cache/<dataset-fingerprint>/<preprocess-hash>/<model-slug>@<revision>``."""
    return Path(cache) / pre.fingerprint / pre.config.hash / ref.slug


def store_path(cache, pre: Preprocessed, ref: ModelRef, dtype="float16", fmt="zarr") -> Path:
    if fmt not in FORMATS:
        raise TprobeError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return store_dir(cache, pre, ref) / f"{dtype}{FORMATS[fmt]}"


def find_store(cache, pre: Preprocessed, ref: ModelRef, dtype=None, fmt=None) -> Path:
    """The complete store for this data, preprocessing and model; error naming the fix if none."""
    folder = store_dir(cache, pre, ref)
    candidates = [
        folder / f"{d}{FORMATS[f]}"
        for d in ([dtype] if dtype else ["float16", "float32"])
        for f in ([fmt] if fmt else list(FORMATS))
    ]
    for path in candidates:
        if path.exists() and not path.with_name(path.name + ".progress").exists():
            return path
    raise TprobeError(
        f"no complete feature store for model {ref.name!r} on this data and preprocessing under "
        f"{folder}; run `tprobe extract --model {ref.name}` with the same --data and "
        "preprocessing options first"
    )


class _Views(Dataset):
    def __init__(self, rows: pd.DataFrame, config: PreprocessConfig):
        self.paths = rows["path"].tolist()
        self.views = rows["view"].tolist()
        self.config = config

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(load_view(self.paths[i], self.views[i], self.config))


@dataclass
class ExtractResult:
    path: Path
    status: str  # "up to date" | "written" | "partial (shard)"
    rows: int
    seconds: float = 0.0
    images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def extract(
    pre: Preprocessed,
    model: ModelRef | Backbone,
    *,
    cache: str | Path = DEFAULT_CACHE,
    fmt: str = "zarr",
    dtype: str = "float16",
    batch_size: int | None = None,
    chunk_rows: int = 64,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    offline: bool = False,
    progress: bool | None = None,
) -> ExtractResult:
    """Extract CLS, register and patch tokens of every kept view of ``pre`` into the cache.

    Returns the store path; a complete store with the same key is left as it is ("up to date").
    """
    if precision not in PRECISIONS:
        raise TprobeError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    ref = model.ref if isinstance(model, Backbone) else model
    path = store_path(cache, pre, ref, dtype, fmt)
    kept = pre.kept
    if path.exists() and not path.with_name(path.name + ".progress").exists():
        return ExtractResult(path, "up to date", len(kept))
    backbone = (
        model
        if isinstance(model, Backbone)
        else Backbone.from_pretrained(ref, device=device, offline=offline)
    )
    grid = backbone.grid(pre.config.canvas)
    _write_manifest(path.parent / "manifest.parquet", kept)
    attrs = _attrs(pre, backbone, grid, dtype)
    store = FeatureStore.create(
        path, n=len(kept), hidden=backbone.hidden_size, registers=backbone.num_registers,
        patches=grid * grid, chunk_rows=chunk_rows, dtype=dtype, attrs=attrs,
    )  # fmt: skip
    units = store.pending_units(shard)
    dev = backbone.device
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    batches = [
        list(range(s, min(store.unit_slice(u).stop, s + batch_size)))
        for u in units
        for s in range(store.unit_slice(u).start, store.unit_slice(u).stop, batch_size)
    ]
    workers = workers if workers is not None else (min(8, _cpus()) if dev.type == "cuda" else 0)
    loader = DataLoader(
        _Views(kept, pre.config), batch_sampler=batches, num_workers=workers,
        pin_memory=dev.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    forward = _forward_fn(backbone, precision, compile)
    todo = sum(store.unit_slice(u).stop - store.unit_slice(u).start for u in units)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=todo, unit="img", desc=f"extract {ref.name}", disable=None if progress is None else not progress
    )
    buffer: dict[str, list] = {}
    unit_iter = iter(units)
    unit = next(unit_iter, None)
    t0 = time.perf_counter()
    try:
        for images in loader:
            hidden = forward(backbone.pixel_values(images).to(dev, non_blocking=True))
            cls, regs, patches = (t.float().cpu().numpy() for t in backbone.split(hidden))
            for name, arr in (("cls", cls), ("registers", regs), ("patches", patches)):
                buffer.setdefault(name, []).append(arr)
            bar.update(len(images))
            rows = sum(len(a) for a in buffer["cls"])
            sl = store.unit_slice(unit)
            if rows == sl.stop - sl.start:
                store.write_unit(unit, {k: np.concatenate(v) for k, v in buffer.items()})
                buffer, unit = {}, next(unit_iter, None)
    except torch.cuda.OutOfMemoryError:
        raise TprobeError(
            f"out of GPU memory at --batch-size {batch_size}; finished chunks are kept — "
            "rerun with a smaller --batch-size to resume"
        ) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    sealed = store.finalize()
    if not sealed and shard == (0, 1) and not store.pending_units():
        # the only worker, all units done: a finalize.lock left by a killed earlier run is stale
        (store.progress_dir / "finalize.lock").unlink(missing_ok=True)
        sealed = store.finalize()
    status = "written" if sealed else "partial (shard)"
    return ExtractResult(path, status, len(kept), seconds, todo)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _forward_fn(backbone: Backbone, precision: str, compile: bool):
    """Build the model call: inference mode, autocast per ``precision``, optional torch.compile."""
    dev = backbone.device
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if amp is torch.float16 and dev.type == "cpu":
        raise TprobeError("--precision fp16 is for GPUs; on CPU use bf16 or fp32")
    net = backbone.model
    if compile:
        net = torch.compile(net)

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(dev.type, dtype=amp) if amp else nullcontext()
        with torch.inference_mode(), ctx:
            return net(pixel_values=pixel_values).last_hidden_state

    return forward


def _attrs(pre: Preprocessed, backbone: Backbone, grid: int, dtype: str) -> dict:
    ref = backbone.ref
    return {
        "model": ref.name,
        "model_source": ref.source,
        "model_id": ref.source if not ref.is_local else f"local:{Path(ref.source).name}",
        "revision": ref.revision or "",
        "resolved_revision": ref.resolved,
        "model_type": ref.config.model_type,
        "hidden_size": backbone.hidden_size,
        "num_register_tokens": backbone.num_registers,
        "patch_size": backbone.patch_size,
        "patch_grid": [grid, grid],
        "token_layout": "cls, registers[R], patches[grid*grid] (row-major) of last_hidden_state",
        "tokens_source": "last_hidden_state (final layernorm applied)",
        "dtype": dtype,
        "preprocess": pre.config.to_dict(),
        "preprocess_hash": pre.config.hash,
        "dataset_fingerprint": pre.fingerprint,
        "tprobe_version": __version__,
    }


def _write_manifest(path: Path, kept: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        kept.assign(row=np.arange(len(kept))).to_parquet(path, index=False)
