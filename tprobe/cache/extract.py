"""Run every kept image view through a backbone once and write its tokens to a store.

The pipeline (after clip-retrieval's reader -> mapper -> writer -> runner):

- **reader**: a ``DataLoader`` over whole batches (batches never cross a store unit). Each batch
  decodes each of its source images once and ships each cell's canvas once (uint8 when exact); the
  views (rot90/flip) and the normalisation are made on the model's device
  (``--loader-workers`` processes decode ahead of the model; ``--workers N`` is N whole extract
  processes, one shard each: :func:`tprobe.cluster.workers.run_workers`).
- **mapper**: the model under ``inference_mode`` and autocast; tokens split by the
  :class:`~tprobe.models.tokens.TokenLayout`.
- **writer**: background threads behind a bounded queue compress, write and fsync whole units
  (chunks; several at once) and mark each done, while the model computes the next one.
- **runner** (:func:`extract`): keys, resume, shards, progress and per-stage timings.

Units already done are skipped, so a rerun resumes; ``shard=(i, N)`` takes units ``i::N``.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from tprobe._version import __version__
from tprobe.cache.files import atomic_write
from tprobe.cache.keys import DEFAULT_CACHE, PRECISIONS, is_sealed, manifest_path, progress_dir, store_path
from tprobe.cache.store import DEFAULT_COMPRESSION, TOKENS, FeatureStore, label_kind, manifest_hash
from tprobe.data.preprocess import VIEW_OPS, PreprocessConfig, Preprocessed, load_canvas
from tprobe.errors import TprobeError
from tprobe.models.backbones import (
    ENGINES,
    Backbone,
    ModelRef,
    normalisation,
    parse_layers,
    pick_device,
)

__all__ = [
    "ExtractResult",
    "check_sealed",
    "StageTimes",
    "extract",
    "extract_many",
    "group_by_patch",
    "resolve_precision",
    "estimate_bytes",
]
log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0  # plain progress lines in logs when stderr is not a terminal


# ---- precision and size (the store's names and folders: tprobe.cache.keys) --------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; checks the choice against the device."""
    if precision not in PRECISIONS:
        raise TprobeError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise TprobeError("precision fp16 is for GPUs; on CPU use bf16 or fp32")
    return precision


def estimate_bytes(
    n_rows: int,
    hidden: int,
    registers: int,
    patches: int,
    dtype: str = "float16",
    tokens=TOKENS,
    channels: int = 1,
    layers: int = 1,
    patch_layers: int = 1,
) -> int:
    """Uncompressed size of a store's token arrays (random-weight tokens compress little)."""
    per = {"cls": layers, "registers": registers * layers, "patches": patches * patch_layers}
    return n_rows * channels * hidden * np.dtype(dtype).itemsize * sum(per[t] for t in tokens)


# ---- reader ----------------------------------------------------------------------------------
VIEW_CODES = ("orig", "r90", "r180", "r270", "fliph", "flipv", "transpose", "antitranspose")


class _Batches(Dataset):
    """Item ``b`` is batch ``b`` as each cell's canvas once plus which view of which canvas each row is.

    The canvases travel as uint8 when they hold whole numbers 0..255 (8-bit sources without a
    resize: 4x less than float32), float32 otherwise; :func:`_device_views` derives the views and
    scales them to [0, 1] on the model's device.
    """

    def __init__(self, rows: pd.DataFrame, batches: list[list[int]], config: PreprocessConfig):
        self.paths = rows["path"].tolist()
        self.views = rows["view"].tolist()
        for v in set(self.views) - set(VIEW_CODES):
            raise TprobeError(f"unknown view {v!r}; known views: {', '.join(VIEW_CODES)}")
        self.batches = batches
        self.config = config
        # the previous batch's canvases: a cell's views straddle batches
        self._last: dict[str, np.ndarray] = {}

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        t0 = time.perf_counter()
        index, canvases, src, last = {}, [], [], self._last
        for i in self.batches[b]:
            path = self.paths[i]
            if path not in index:
                index[path] = len(canvases)
                canvases.append(last[path] if path in last else load_canvas(path, self.config))
            src.append(index[path])
        self._last = dict(zip(index, canvases, strict=True))
        decodes = sum(p not in last for p in index)
        stack = np.stack(canvases)
        small = stack.astype(np.uint8)
        if np.array_equal(small, stack):  # whole numbers 0..255: exact as uint8
            stack = small
        views = torch.tensor([VIEW_CODES.index(self.views[i]) for i in self.batches[b]])
        return torch.from_numpy(stack), torch.tensor(src), views, decodes, time.perf_counter() - t0


class _Prefetch:
    """Batches read ahead by one background thread (``--loader-workers 0``): decoding (which releases
    the GIL) overlaps the model and the writers. A reader error is raised where the batch is taken."""

    def __init__(self, it, depth: int = 4):
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), name="tprobe-reader", daemon=True)
        self._thread.start()

    def _run(self, it) -> None:
        while not self._stop.is_set():
            try:
                item = (True, next(it))
            except StopIteration:
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = (False, exc)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def __next__(self):
        ok, item = self._q.get()
        if not ok:
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _view(x: torch.Tensor, code: int) -> torch.Tensor:
    """:func:`~tprobe.data.preprocess.apply_view` in torch on the last two axes (the same exact permutation)."""
    d = (-2, -1)
    return [
        lambda a: a,
        lambda a: torch.rot90(a, 1, d),
        lambda a: torch.rot90(a, 2, d),
        lambda a: torch.rot90(a, 3, d),
        lambda a: a.flip(-1),
        lambda a: a.flip(-2),
        lambda a: a.transpose(-1, -2),
        lambda a: torch.rot90(a, 2, d).transpose(-1, -2),
    ][code](x)


def _device_views(
    canvases: torch.Tensor, src: torch.Tensor, views: torch.Tensor, dev, *, host: bool | None = None
) -> torch.Tensor:
    """The batch's views on ``dev``, in the canvases' own dtype, from each cell's canvas shipped once.

    Equal to ``apply_view(canvas, view)`` on the host: a permutation, no arithmetic. On a CPU device
    (``host``) numpy makes them: one thread and no torch thread-pool hand-offs for these small copies.
    """
    if host if host is not None else torch.device(dev).type == "cpu":
        return torch.from_numpy(_host_views(canvases.numpy(), src.tolist(), views.tolist()))
    x = canvases.to(dev, non_blocking=True)
    codes, src_l = views.tolist(), src.tolist()
    parts, order = [], []
    for code in sorted(set(codes)):  # one gather + one permutation per view kind, then rows back in order
        rows = [r for r, c in enumerate(codes) if c == code]
        parts.append(_view(x.index_select(0, torch.tensor([src_l[r] for r in rows], device=dev)), code))
        order += rows
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != sorted(order):
        out = out.index_select(0, torch.from_numpy(np.argsort(order)).to(dev))
    return out


def _host_views(arr: np.ndarray, src: list[int], codes: list[int]) -> np.ndarray:
    """Row r = ``apply_view(arr[src[r]], VIEW_CODES[codes[r]])``, each copied once into one new array."""
    out = np.empty((len(src), *arr.shape[1:]), arr.dtype)
    for r, (s, c) in enumerate(zip(src, codes, strict=True)):
        out[r] = _VIEW_OPS[c](arr[s])
    return out


_VIEW_OPS = tuple(VIEW_OPS[v] for v in VIEW_CODES)  # apply_view's permutations (no copy), by view code


def _host_inputs(backbone: Backbone, canvases: torch.Tensor, src: torch.Tensor, views: torch.Tensor):
    """The model's input on a CPU for grey canvases: each cell's canvas normalised once, then its views.

    The normalisation is elementwise and the views are permutations, so this is bit for bit
    ``_pixel_values(backbone, _device_views(...))`` with a sixth of the arithmetic for six views a cell.
    """
    normed = _pixel_values(backbone, canvases)  # (cells, 3, H, W)
    return torch.from_numpy(_host_views(normed.numpy(), src.tolist(), views.tolist()))


def _pixel_values(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The model's normalised input for views ``x`` (0..255): ``backbone.pixel_values(x / 255.0)``, on x's device.

    On the CPU in numpy, one thread, the same float32 operations in the same order (so the same
    bytes): torch's thread pool cost more than these passes while the writer threads run. (A
    per-channel table of the 256 levels gathered on the CPU was 2x slower than these three
    elementwise passes; measured in docs/guide/benchmarks.md.)
    """
    if x.device.type == "cpu":
        a = x.numpy().astype(np.float32) / np.float32(255.0)
        if a.ndim == 4 and a.shape[1] != 3:  # refused there, in one line
            return backbone.pixel_values(torch.from_numpy(a))
        mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (backbone.mean, backbone.std))
        out = np.subtract(a[:, None] if a.ndim == 3 else a, mean)  # grey: copied to R, G, B by broadcasting
        out /= std
        return torch.from_numpy(out)
    return backbone.pixel_values(x.to(torch.float32).div_(255.0))


@contextmanager
def _torch_threads(n: int | None):
    """Within the block torch's CPU ops use ``n`` threads (then the count set before, restored); None: as set.

    Only under torch's OpenMP backend (Linux and macOS wheels), whose thread count may change at any
    time; torch's native backend refuses a change once its pool runs, so there it stays as set."""
    before = torch.get_num_threads()
    n = (n or before) if _openmp_backend() else before
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


@functools.cache
def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


# ---- writer ----------------------------------------------------------------------------------
class _Writer:
    """Background threads writing whole units from a bounded queue; errors surface in the runner.

    ``threads`` units are compressed at once (Blosc releases the GIL; each unit is its own chunk
    files and marker, and a chunk's bytes do not depend on which thread wrote it).
    """

    def __init__(self, store: FeatureStore, depth: int = 2, threads: int = 1):
        self.store, self.seconds, self.error = store, 0.0, None
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, threads))
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, name=f"tprobe-writer-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for t in self.threads:
            t.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                t0 = time.perf_counter()
                try:
                    self.store.write_unit(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the runner thread
                    self.error = exc
                with self.lock:
                    self.seconds += time.perf_counter() - t0

    def put(self, unit: int, tokens: dict) -> float:
        """Queue a unit; returns the seconds spent waiting for room (the writer was behind)."""
        self.check()
        t0 = time.perf_counter()
        self.queue.put((unit, tokens))
        return time.perf_counter() - t0

    def check(self):
        if self.error is not None:
            raise self.error

    def close(self, *, drain: bool = True):
        if not drain:  # interrupted: finish the units in hand, drop the rest (they are not marked done)
            while not self.queue.empty():
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self.check()


# ---- runner ----------------------------------------------------------------------------------
@dataclass
class StageTimes:
    """Seconds per stage of one extract run (the writer's seconds overlap the model's)."""

    read: float = 0.0  # decode + views, summed over reader workers (in the loop when workers=0)
    wait_data: float = 0.0  # the model waited for the reader
    forward: float = 0.0  # model forward + copy to host
    write: float = 0.0  # compress + write + fsync, summed over the writer threads
    wait_write: float = 0.0  # the model waited for the writer's queue
    total: float = 0.0
    decodes: int = 0  # source images decoded
    startup: float | None = None  # the process's age when its first batch was read (Linux), else None

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def line(self) -> str:
        started = (
            "" if self.startup is None else f"first batch {self.startup:.1f} s after the process started; "
        )
        return started + (
            f"read {self.read:.1f} s, model waited {self.wait_data:.1f} s for data, forward {self.forward:.1f} s, "
            f"write {self.write:.1f} s (waited {self.wait_write:.1f} s)"
        )


@dataclass
class ExtractResult:
    """What an extract run did: the store's ``path`` and ``status``, its ``rows``, and how it ran.

    ``images`` are the views this run embedded (0 when the store was up to date), in ``seconds``;
    ``model`` is the resolved model, ``skipped`` the input files preprocessing could not read.
    ``executor`` is ``local`` (``workers`` processes on ``devices``) or ``slurm`` (array ``job_ids``).
    """

    path: Path
    status: str  # "up to date" | "written" | "partial (shard)"
    rows: int
    seconds: float = 0.0
    images: int = 0
    times: StageTimes = field(default_factory=StageTimes)
    model: ModelRef | None = None
    skipped: list = field(default_factory=list)
    executor: str = "local"
    workers: int = 1
    devices: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

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
    tokens=TOKENS,
    compression: str = DEFAULT_COMPRESSION,
    check_disk: bool = True,
    layers="-1",
    patch_layers="-1",
    write_threads: int | None = None,
) -> ExtractResult:
    """Extract the chosen tokens (CLS, registers, patches) of every kept view of ``pre`` into the cache.

    ``layers`` (``"-1,-4,-7"`` or ints; -1 the last block) picks the blocks whose CLS and registers are
    stored, ``patch_layers`` those whose patch tokens are; each layer through the final layer norm
    (:meth:`~tprobe.models.backbones.Backbone.layer_outputs`). The store is keyed by the data, preprocessing,
    row order, model content, precision, dtype, tokens and layers; a complete store with the same key
    is left as it is ("up to date"). ``workers`` are the DataLoader's decoding processes (the CLI's
    ``--loader-workers``); ``write_threads`` units are compressed at once [default: min(4, cores)].
    Several models in one pass: :func:`extract_many`.
    """
    return extract_many(
        pre,
        [model],
        cache=cache,
        fmt=fmt,
        dtype=dtype,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        device=device,
        precision=precision,
        compile=compile,
        workers=workers,
        shard=shard,
        offline=offline,
        progress=progress,
        tokens=tokens,
        compression=compression,
        check_disk=check_disk,
        layers=layers,
        patch_layers=patch_layers,
        write_threads=write_threads,
    )[0]


def group_by_patch(refs) -> list[list]:
    """Models (refs or backbones) grouped by patch size, in first-seen order: each group shares one canvas
    (the default canvas is rounded up to the patch size), so each group is one :func:`extract_many` pass."""
    groups: dict[int, list] = {}
    for m in refs:
        ref = m.ref if isinstance(m, Backbone) else m
        groups.setdefault(ref.patch_size, []).append(m)
    return list(groups.values())


@dataclass
class _Job:
    """One model's share of a pass: its store, backbone, units to write, writer and timings."""

    ref: ModelRef
    path: Path
    norm: tuple
    layers: tuple
    patch_layers: tuple
    backbone: Backbone | None = None
    store: FeatureStore | None = None
    layout: object = None
    units: set = field(default_factory=set)
    times: StageTimes = field(default_factory=StageTimes)
    todo: int = 0
    writer: _Writer | None = None
    forward: object = None
    take: object = None
    buffer: dict = field(default_factory=dict)


def extract_many(
    pre: Preprocessed,
    models,
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
    tokens=TOKENS,
    compression: str = DEFAULT_COMPRESSION,
    check_disk: bool = True,
    layers="-1",
    patch_layers="-1",
    write_threads: int | None = None,
) -> list[ExtractResult]:
    """:func:`extract` for several models in one pass: one :class:`ExtractResult` per model, in order.

    Each view is read, decoded and turned into its views once and fed to every model; each model
    writes its own store, under the same key and with the same bytes as its own :func:`extract` would
    (same batches, same units). Resume and shards are per store: a complete store is "up to date" and
    its model is not even loaded; a partial one writes only its missing units (of ``shard``). One pass
    takes one canvas, so the models must share a patch size (:func:`group_by_patch` splits a list into
    passes). ``layers`` / ``patch_layers`` apply to every model. The stage times of each result share the
    pass's read, wait and total seconds; forward and write are the model's own.
    """
    models = list(models)
    if not models:
        raise TprobeError("no model to extract; give at least one --model")
    refs = [m.ref if isinstance(m, Backbone) else m for m in models]
    patches = {r.patch_size for r in refs}
    if len(patches) > 1:
        sizes = ", ".join(f"{r.name} (patch {r.patch_size})" for r in refs)
        raise TprobeError(
            f"one extract pass feeds models of one patch size, one canvas; got {sizes}: extract each patch "
            "size in its own pass (tprobe.cache.extract.group_by_patch; `tprobe extract` does it by itself)"
        )
    engine = forward_engine()  # a bad TPROBE_FORWARD is refused even when every store is complete
    given = [m.device for m in models if isinstance(m, Backbone)]
    dev = given[0] if given else pick_device(device)
    precision = resolve_precision(precision, dev)
    tokens = tuple(t for t in TOKENS if t in tokens)
    kept = pre.kept
    results: list[ExtractResult | None] = [None] * len(models)
    jobs: list[tuple[int, _Job]] = []
    seen: dict[Path, str] = {}
    for i, (model, ref) in enumerate(zip(models, refs, strict=True)):
        lay = parse_layers(layers, ref.num_layers)
        play = parse_layers(patch_layers, ref.num_layers, "--patch-layers") if "patches" in tokens else (-1,)
        norm = (model.mean, model.std) if isinstance(model, Backbone) else normalisation(ref, offline)
        path = store_path(
            cache, pre, ref, dtype, fmt, precision, tokens, norm=norm, layers=lay, patch_layers=play
        )
        if path in seen:
            raise TprobeError(
                f"models {seen[path]!r} and {ref.name!r} are the same model (one store, {path.parent.name}); "
                "give it once"
            )
        seen[path] = ref.name
        if is_sealed(path):
            check_sealed(path, kept)
            results[i] = ExtractResult(path, "up to date", len(kept), model=ref)
            continue
        job = _Job(ref, path, norm, lay, play)
        if isinstance(model, Backbone):
            job.backbone = model
        else:
            job.backbone = Backbone.from_pretrained(ref, device=str(dev), offline=offline, engine=engine)
            if (job.backbone.mean, job.backbone.std) != norm:
                raise TprobeError(
                    f"model {ref.name}: its preprocessor_config.json changed while loading; rerun"
                )
        jobs.append((i, job))
    for _, job in jobs:
        _open_store(job, pre, dtype, precision, tokens, chunk_rows, compression, check_disk, shard)
    if jobs:
        _run_pass(
            pre,
            [j for _, j in jobs],
            dev,
            batch_size,
            workers,
            progress,
            write_threads,
            precision,
            compile,
            dtype,
        )
    for i, job in jobs:
        sealed = job.store.finalize()  # any worker that finds every unit done seals the store
        status = "written" if sealed else "partial (shard)"
        results[i] = ExtractResult(
            job.path, status, len(kept), job.times.total, job.todo, job.times, model=job.ref
        )
    return results


def check_sealed(path: Path, kept: pd.DataFrame) -> None:
    """A complete store found again (every executor's "up to date"): remove what killed workers left beside
    it, refuse a missing chunk, and restore its manifest if it was edited or deleted."""
    FeatureStore.open(path)
    _write_manifest(manifest_path(path), kept)


def _open_store(job: _Job, pre, dtype, precision, tokens, chunk_rows, compression, check_disk, shard) -> None:
    """Create (or reopen) the job's store and list its units to write."""
    kept, backbone = pre.kept, job.backbone
    layout = job.layout = backbone.layout(pre.config.canvas)
    channels = pre.config.per_channel  # a channel axis in per-channel mode
    if check_disk and not progress_dir(job.path).exists():
        _check_disk(
            job.path,
            estimate_bytes(
                len(kept),
                layout.hidden,
                layout.registers,
                layout.patches,
                dtype,
                tokens,
                max(1, len(channels)),
                len(job.layers),
                len(job.patch_layers),
            ),
        )
    _write_manifest(manifest_path(job.path), kept)
    job.store = FeatureStore.create(
        job.path,
        row_ids=kept["image_id"].tolist(),
        hidden=layout.hidden,
        registers=layout.registers,
        patches=layout.patches,
        chunk_rows=chunk_rows,
        dtype=dtype,
        tokens=tokens,
        compression=compression,
        channels=channels,
        attrs=_attrs(pre, backbone, layout, dtype, precision, job.layers, job.patch_layers),
        layers=job.layers,
        patch_layers=job.patch_layers,
    )
    # this shard's finished units whose data went missing are written again (a warning each); other shards'
    # may be in flight on other nodes: the worker that seals checks them all
    i, k = shard
    job.store.drop_damaged_units([u for u in sorted(job.store.done_units()) if u % k == i])
    job.units = set(job.store.pending_units(shard))


def _run_pass(
    pre, jobs: list[_Job], dev, batch_size, workers, progress, write_threads, precision, compile, dtype
):
    """The reader -> mapper -> writer loop: every batch read once, fed to each job whose store needs its unit."""
    kept = pre.kept
    channels = pre.config.per_channel
    first = jobs[0].store  # every store has the same rows and units (same rows, same chunk_rows)
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    batches, owner = [], []
    for u in sorted(set().union(*(j.units for j in jobs))):
        sl = first.unit_slice(u)
        for s in range(sl.start, sl.stop, batch_size):
            batches.append(list(range(s, min(sl.stop, s + batch_size))))
            owner.append(u)
    for job in jobs:
        job.todo = sum(len(b) for b, u in zip(batches, owner, strict=True) if u in job.units)
    workers = workers if workers is not None else (min(8, _cpus()) if dev.type == "cuda" else 0)
    loader = DataLoader(
        _Batches(kept, batches, pre.config),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    todo = sum(len(b) for b in batches)
    shared = StageTimes()  # the pass's reading, shared by every model
    out_dtype = getattr(torch, dtype)  # torch's float16 rounding equals numpy's astype, and is ~10x faster
    # on a CPU device the per-batch casts run on one torch thread: the pool's hand-offs cost more than the
    # copies themselves while the writer threads hold the other cores (docs/guide/benchmarks.md)
    host_threads = 1 if dev.type == "cpu" else None
    t0 = time.perf_counter()
    names = " + ".join(j.ref.name for j in jobs)
    bar = _Progress(todo, f"extract {names}", progress)
    threads = write_threads or max(1, min(4, _cpus()) // len(jobs))
    for job in jobs:
        job.writer = _Writer(job.store, threads=threads)
        job.buffer = {}
    ok = False
    try:
        with ExitStack() as stack:
            for job in jobs:
                stack.enter_context(job.backbone.fixed_canvas(pre.config.canvas))
                layered = job.store.layered
                job.forward = _forward_fn(
                    job.backbone, precision, compile, (*job.layers, *job.patch_layers) if layered else None
                )
                job.take = _token_taker(job.layout, job.layers, job.patch_layers) if layered else None
            # a reader thread ahead of the model on a CPU; on a GPU the pinning stays in this thread (a new
            # thread's current CUDA device is 0, so pinning there could open a context on another GPU)
            ahead = workers == 0 and dev.type == "cpu"
            # on a CPU, grey: each canvas is normalised once and then permuted into its views (below)
            per_cell = dev.type == "cpu" and not channels
            it = _Prefetch(iter(loader)) if ahead else iter(loader)
            if ahead:
                stack.callback(it.close)
            for b in range(len(batches)):
                tw = time.perf_counter()
                canvases, src, views, decodes, read_s = next(it)
                shared.wait_data += time.perf_counter() - tw
                if b == 0:
                    shared.startup = _process_age()
                shared.read += read_s
                shared.decodes += decodes
                tf = time.perf_counter()
                images = None if per_cell else _device_views(canvases, src, views, dev)
                t_views = time.perf_counter() - tf
                unit = first.unit_slice(owner[b])
                at = slice(batches[b][0] - unit.start, batches[b][-1] + 1 - unit.start)
                inputs: dict = {}  # the normalised input, made once per normalisation
                for job in jobs:
                    if owner[b] not in job.units:
                        continue
                    tf = time.perf_counter()
                    # per channel (B, C, H, W): every channel through the model on its own, as grey
                    if job.norm not in inputs:
                        inputs[job.norm] = (
                            _host_inputs(job.backbone, canvases, src, views)
                            if per_cell
                            else _pixel_values(job.backbone, images.flatten(0, 1) if channels else images)
                        )
                    hidden = job.forward(inputs[job.norm])
                    # {token: (B', ...)}: the last block's split, or each chosen layer's on a layer axis
                    layout = job.layout
                    parts = (
                        dict(zip(TOKENS, layout.split(hidden), strict=True))
                        if job.take is None
                        else job.take(hidden)
                    )
                    if channels:
                        parts = {n: v.unflatten(0, (len(images), len(channels))) for n, v in parts.items()}
                    store = job.store
                    # the unit's rows, filled batch by batch (no list of parts, no concatenation)
                    if not job.buffer:
                        job.buffer = {
                            n: np.empty((unit.stop - unit.start, *store.shapes[n][1:]), dtype)
                            for n in store.shapes
                        }
                    with _torch_threads(host_threads):
                        # cast to the store's dtype in torch (on the device: half the copy to host)
                        for n, buf in job.buffer.items():
                            v = parts[n] if dev.type == "cpu" else parts[n].to(out_dtype).cpu()
                            torch.from_numpy(buf[at]).copy_(v)
                    job.times.forward += time.perf_counter() - tf + t_views
                    if b + 1 == len(batches) or owner[b + 1] != owner[b]:  # the unit is whole
                        job.times.wait_write += job.writer.put(owner[b], job.buffer)
                        job.buffer = {}
                bar.update(len(src))
        ok = True
    except torch.cuda.OutOfMemoryError:
        raise TprobeError(
            f"out of GPU memory at batch size {batch_size}; finished chunks are kept — "
            "rerun with a smaller --batch-size to resume"
        ) from None
    finally:
        bar.close()
        errors = []
        for job in jobs:
            try:
                job.writer.close(drain=ok)
            except BaseException as exc:  # noqa: BLE001 - every writer is closed, the first error raised
                errors.append(exc)
        if errors:
            raise errors[0]
    total = time.perf_counter() - t0
    for job in jobs:
        job.times.read, job.times.wait_data, job.times.decodes = shared.read, shared.wait_data, shared.decodes
        job.times.startup = shared.startup
        job.times.write = job.writer.seconds
        job.times.total = total


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, 10 ms resolution); None where unknown."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class _Progress:
    """A tqdm bar on a terminal; plain log lines every ~10 s otherwise (so logs show progress)."""

    def __init__(self, total: int, desc: str, enabled: bool | None):
        import sys

        from tqdm.auto import tqdm

        self.total, self.desc, self.done, self.t0 = total, desc, 0, time.monotonic()
        self.last = self.t0
        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total, unit="img", desc=desc, disable=not tty if enabled is None else not enabled
        )
        self.plain = enabled is not False and not tty

    def update(self, n: int):
        self.bar.update(n)
        self.done += n
        now = time.monotonic()
        if self.plain and (now - self.last >= PROGRESS_EVERY_S or self.done == self.total):
            self.last = now
            rate = self.done / (now - self.t0)
            eta = (self.total - self.done) / rate if rate else float("nan")
            log.info(
                "%s: %d/%d views (%.0f%%), %.1f views/s, about %.0f s left",
                self.desc,
                self.done,
                self.total,
                100 * self.done / max(1, self.total),
                rate,
                eta,
            )

    def close(self):
        self.bar.close()


def _check_disk(path: Path, need: int) -> None:
    import shutil

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    log.info(
        "storage estimate: %.2f GB uncompressed for %s (%.1f GB free)", need / 1e9, path.name, free / 1e9
    )
    if need > free:
        raise TprobeError(
            f"{folder}: the store needs about {need / 1e9:.1f} GB (uncompressed) but the disk has "
            f"{free / 1e9:.1f} GB free; free space, pick --tokens cls,registers, or --cache elsewhere"
        )


def forward_engine() -> str:
    """The engine extraction loads models with: ``TPROBE_FORWARD`` (``auto``, the default: tprobe's
    torch-only DINOv2 where it applies, transformers otherwise; ``transformers``; ``torch``)."""
    import os

    engine = os.environ.get("TPROBE_FORWARD", "auto").strip().lower() or "auto"
    if engine not in ENGINES:
        raise TprobeError(f"TPROBE_FORWARD={engine!r} is not one of {', '.join(ENGINES)}; unset it for auto")
    return engine


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _forward_fn(backbone: Backbone, precision: str, compile: bool, layers=None):
    """Build the model call: inference mode, autocast per ``precision``, optional torch.compile.

    It returns ``last_hidden_state``, or with ``layers`` ``{layer: tokens}`` of each (through the final
    layer norm, :meth:`~tprobe.models.backbones.Backbone.layer_outputs`)."""
    dev = backbone.device
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision, dev)]
    net = backbone.model
    if compile:
        net = torch.compile(net)

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(dev.type, dtype=amp) if amp else nullcontext()
        with torch.inference_mode(), ctx:
            return net(pixel_values=pixel_values).last_hidden_state

    def forward_layers(pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        ctx = torch.autocast(dev.type, dtype=amp) if amp else nullcontext()
        with torch.inference_mode(), ctx:
            out = net(pixel_values=pixel_values, output_hidden_states=any(v != -1 for v in layers))
            norm = backbone.final_norm  # as Backbone.layer_outputs: -1 is last_hidden_state, already normed
            return {v: out.last_hidden_state if v == -1 else norm(out.hidden_states[v]) for v in set(layers)}

    return forward if layers is None else forward_layers


def _token_taker(layout, layers, patch_layers):
    """``{layer: (B, T, D)}`` -> ``{token: (B, L, ...)}``: CLS and registers of ``layers``, patches of
    ``patch_layers``, each stacked on a layer axis after the rows, in the store's layer order."""

    def take(by_layer: dict) -> dict:
        split = {v: layout.split(t) for v, t in by_layer.items()}
        return {
            "cls": torch.stack([split[v][0] for v in layers], 1),
            "registers": torch.stack([split[v][1] for v in layers], 1),
            "patches": torch.stack([split[v][2] for v in patch_layers], 1),
        }

    return take


def _attrs(
    pre: Preprocessed,
    backbone: Backbone,
    layout,
    dtype: str,
    precision: str,
    layers=(-1,),
    patch_layers=(-1,),
) -> dict:
    ref = backbone.ref
    channels = {"channels": list(pre.config.used_channels), "channel_mode": pre.config.channel_mode}
    layered = {
        "layers": list(layers),
        "patch_layers": list(patch_layers),
        "num_hidden_layers": ref.num_layers,
        "tokens_source": "layer -1: last_hidden_state; layer l: final layernorm(hidden_states[l]) "
        "(DINOv2's get_intermediate_layers(norm=True))",
    }
    return {
        "model": ref.name,
        "model_source": ref.source,
        "model_id": ref.source if not ref.is_local else f"local:{Path(ref.source).name}",
        "revision": ref.revision or "",
        "resolved_revision": ref.resolved,
        "model_random_init": ref.random_init,
        "model_type": ref.config.model_type,
        "forward": backbone.engine,  # transformers, or tprobe's torch-only DINOv2 (the same tokens)
        "hidden_size": layout.hidden,
        "num_register_tokens": layout.registers,
        "patch_size": backbone.patch_size,
        "image_mean": list(backbone.mean),
        "image_std": list(backbone.std),
        "patch_grid": [layout.grid, layout.grid],
        "token_layout": "cls, registers[R], patches[grid*grid] (row-major) of last_hidden_state",
        "tokens_source": "last_hidden_state (final layernorm applied)",
        "dtype": dtype,
        "precision": precision,
        "preprocess": pre.config.to_dict(),
        "preprocess_hash": pre.config.hash,
        **(channels if pre.config.channels else {}),  # a one-channel store keeps tprobe 0.2's attributes
        **(
            layered if (tuple(layers), tuple(patch_layers)) != ((-1,), (-1,)) else {}
        ),  # last block: as before
        "dataset_fingerprint": pre.fingerprint,
        **_pixel_type(pre.kept),  # the images' raw bit depth (uint8, uint16): predict refuses another
        "manifest_hash": manifest_hash(
            pre.kept
        ),  # rows, labels, donors: checked on every read of the manifest
        "tprobe_version": __version__,
    }


def _pixel_type(kept: pd.DataFrame) -> dict:
    """``{"pixel_type": "uint8"}``: the one raw pixel type of the kept images; ``{}`` when the manifest
    (saved by an older tprobe) does not give it."""
    types = set(kept["pixel_type"].dropna()) - {""} if "pixel_type" in kept.columns else set()
    return {"pixel_type": str(types.pop())} if len(types) == 1 else {}


def _write_manifest(path: Path, kept: pd.DataFrame) -> None:
    """Write the store's own manifest (atomically), unless one with the same rows, labels and donors is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            old = pd.read_parquet(path)
        except (OSError, ValueError):
            old = None
        if (  # the same rows, labels and donors, every column there and the labels integers
            old is not None
            and set(kept.columns) <= set(old.columns)
            and label_kind(old["label"]) is None
            and manifest_hash(old) == manifest_hash(kept)
        ):
            return
    atomic_write(path, lambda p: kept.assign(row=np.arange(len(kept))).to_parquet(p, index=False))
