"""Chunked token stores (Zarr or HDF5) that know their own rows: create, write whole units, seal, read.

A store holds ``cls (N, D)``, ``registers (N, R, D)`` (only when R > 0) and ``patches (N, P, D)``
(or the subset chosen with ``tokens``), chunked along N in units of ``chunk_rows`` rows, plus
``row_ids (N,)``: the ``image_id`` of every row. A store of several layers (``tprobe extract --layers
-1,-4``) has a layer axis after the rows (and channels): ``cls (N, L, D)``, ``registers (N, L, R, D)``
(dimension ``layer``) and ``patches (N, Lp, P, D)`` (dimension ``patch_layer``), with coordinate arrays
``layer`` and ``patch_layer`` holding the layer indices (-1 = the last block; every layer through the
model's final layer norm); a store of layer -1 alone has no layer axis (today's layout). A store of per-channel embeddings (``channels``) has a
channel axis after the rows: ``cls (N, C, D)``, ``registers (N, C, R, D)``, ``patches (N, C, P, D)``;
its poolings are taken per channel and concatenated in channel order. ``attrs["rows_hash"]`` hashes the ordered row ids;
every reader checks row identity against the manifest it is given (:meth:`FeatureStore.verify_rows`),
never just the row count. Arrays carry dimension names (``rows``, ``channel``, ``register``,
``patch``, ``hidden``), so ``xarray.open_zarr`` names them, and each token array names ``row_ids`` as its
coordinate (the CF ``coordinates`` attribute), so xarray attaches every row's ``image_id``.

Writing: the unit of writing is one whole chunk, so concurrent or interrupted writers never share
a chunk. Progress lives beside the store in ``<store>.progress/``: ``meta.json`` (shapes,
attributes), ``create.lock`` (owner host, pid and time) and one marker per finished unit. A unit's
data is fsynced before its marker is renamed into place. An HDF5 store (one file, one writer) is
written as ``.npz`` parts and assembled once all units are done, so a killed run never leaves a
half-written ``.h5`` file.

Sealing is idempotent: any worker that finds every unit done seals the store (assembles HDF5 into
a private temp file and renames it into place; writes Zarr's final attributes), then renames the
progress folder away in one atomic step. A worker killed at any point leaves a state that the next
run of any shard finishes; there is no sealing lock to go stale.

Integrity (store format 2): each unit's marker records a hash of its decoded values and, for Zarr,
the size of every chunk file; sealing copies them into the store's metadata (``tprobe_meta["units"]``).
Opening a sealed Zarr store checks that every chunk file exists with its recorded size (a deleted
chunk would otherwise read as zeros, Zarr's fill value) and removes what killed writers leave
(``*.partial`` files, ``.sealed-<pid>`` folders, ``.tmp@<host>@<pid>`` files of this host); :meth:`FeatureStore.verify`
with ``deep=True`` re-hashes every unit (``tprobe status --deep``), for HDF5 stores too. Stores
written before format 2 carry no hashes: they are checked for chunk existence only, with a note.
A creator holds an ``fcntl.flock`` on ``create.lock`` while it creates the arrays; a lock nobody
holds (its owner was killed, or its host died) is taken over at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tprobe.errors import TprobeError

if TYPE_CHECKING:
    import pandas as pd

from tprobe.cache.files import atomic_write, fsync_all, fsync_path
from tprobe.cache.keys import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    FORMATS,
    manifest_path,
    progress_dir,
    rows_hash,
)
from tprobe.cache.lightread import group_attributes, manifest_keys, string_array
from tprobe.models.tokens import POOLS, TOKENS, check_layered_pool, pool_layered, pool_needs, pool_tokens

__all__ = [
    "FeatureStore",
    "POOLS",
    "FORMATS",
    "TOKENS",
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "rows_hash",
    "manifest_hash",
    "manifest_path",
    "STORE_VERSION",
    "verified_manifest",
    "verify_own_manifest",
    "read_own_manifest",
    "label_kind",
]
log = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: per-unit hashes and chunk sizes in tprobe_meta["units"]; 1 (no "store_version"): none
CREATE_WAIT_S = 120.0  # how long a worker waits for a live creator
_META_KEYS = {"format": str, "n": int, "chunk_rows": int, "dtype": str, "shapes": dict, "attrs": dict}
# dimension names differ from the array names: xarray takes a variable named like a dimension for its
# index, and a 3-D one breaks swap_dims/sel ("IndexVariable objects must be 1-dimensional")
DIMS = {
    "cls": ("rows", "hidden"),
    "registers": ("rows", "register", "hidden"),
    "patches": ("rows", "patch", "hidden"),
    "row_ids": ("rows",),
}


LAYER_DIMS = {"cls": "layer", "registers": "layer", "patches": "patch_layer"}  # the layer axis of each array


def _dims(name: str, channels, layered: bool = False) -> tuple[str, ...]:
    dims = DIMS[name]
    dims = (dims[0], "channel", *dims[1:]) if channels and name != "row_ids" else dims
    if layered and name in LAYER_DIMS:  # the layer axis comes after the rows (and the channel axis)
        at = 2 if channels else 1
        dims = (*dims[:at], LAYER_DIMS[name], *dims[at:])
    return dims


def manifest_hash(manifest) -> str:
    """Hash of a manifest's row identities, labels and donors, in row order (``attrs["manifest_hash"]``)."""
    lines = (
        f"{i}\t{lab}\t{d}"
        for i, lab, d in zip(manifest["image_id"], manifest["label"], manifest["donor"], strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def label_kind(labels) -> str | None:
    """None when ``labels`` (a pandas column, or a list from :func:`tprobe.cache.lightread.manifest_keys`)
    are integers, as tprobe writes them; else what they are, for the refusal (text, floats, booleans)."""
    if hasattr(labels, "dtype"):  # a column: its dtype (Int64 and the other integer dtypes are kind "i")
        kind = getattr(labels.dtype, "kind", "O")
        return None if kind in "iu" else {"b": "booleans", "f": "floats"}.get(kind, f"{labels.dtype} values")
    bad = next((v for v in labels if type(v) is not int), None)
    return None if bad is None else f"{type(bad).__name__} values"


def _unit_digest(arrays: dict[str, np.ndarray], algo: str = "xxh3_128") -> str:
    """Hash of one unit's decoded values (every array, in name order, as stored).

    New units are hashed with xxHash's XXH3-128 (``"xxh3_128:<hex>"``: ~20x blake2b's speed here, so
    the hash is no longer a tenth of the writer's time); a recorded hash without a prefix is
    blake2b-128, as tprobe 0.3 wrote it, and is checked as such (:func:`_digest_matches`).
    """
    if algo == "xxh3_128":
        import xxhash

        h, prefix = xxhash.xxh3_128(), "xxh3_128:"
    elif algo == "blake2b":
        h, prefix = hashlib.blake2b(digest_size=16), ""
    else:
        raise ValueError(f"unknown unit hash {algo!r}")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return prefix + h.hexdigest()


def _digest_matches(arrays: dict[str, np.ndarray], recorded: str) -> bool:
    """Whether ``arrays`` hash to ``recorded``, with the algorithm that wrote it (a store resumed by a
    newer tprobe holds both kinds)."""
    algo = "xxh3_128" if recorded.startswith("xxh3_128:") else "blake2b"
    return _unit_digest(arrays, algo) == recorded


class _DamagedParts(Exception):
    """Raised while assembling an HDF5 store: these units' parts were missing or damaged (markers removed)."""

    def __init__(self, units: list[int]):
        super().__init__(units)
        self.units = units


def _remove(path: Path) -> None:
    """Remove a leftover file; a store on a read-only file system keeps it (it is harmless to readers)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("cannot remove %s: %s", path, exc)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(), "time": time.time()}


def _alive(owner: dict) -> bool:
    """Whether a lock's owner may still run (another host: assume so; this host rebooted since: no)."""
    if owner.get("host") != socket.gethostname():
        return True
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _checked_meta(path: Path, meta, fix: str = "delete the store and re-extract") -> dict:
    """The store's ``tprobe_meta``, its keys and types checked (one line naming the fix otherwise)."""
    ok = isinstance(meta, dict) and all(isinstance(meta.get(k), t) for k, t in _META_KEYS.items())
    if ok:
        shapes = meta["shapes"]
        ok = bool(shapes) and all(
            isinstance(v, list) and all(isinstance(d, int) for d in v) for v in shapes.values()
        )
        ok = ok and meta["format"] in FORMATS and meta["n"] > 0 and meta["chunk_rows"] > 0
    if ok and meta.get("units") is not None:  # format 2: one hash (and chunk size per array) per unit
        units, n_units = meta["units"], -(-meta["n"] // meta["chunk_rows"])
        ok = isinstance(units, dict) and isinstance(units.get("hash"), list) and len(units["hash"]) == n_units
        sizes = units.get("sizes", {}) if ok else None
        ok = (
            ok
            and isinstance(sizes, dict)
            and all(isinstance(v, list) and len(v) == n_units for v in sizes.values())
        )
    if not ok:
        raise TprobeError(
            f"{path}: its tprobe_meta attribute is damaged (not the metadata tprobe writes); {fix}"
        )
    return meta


class FeatureStore:
    """One store of token arrays; create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.format = meta["format"]
        self.n = int(meta["n"])
        self.chunk_rows = int(meta["chunk_rows"])
        self.shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        self.attrs = meta["attrs"]
        self.channels: list[str] = list(meta.get("channels") or [])  # the channel axis, when there is one
        # the layer axes (``--layers``), only in stores that have them; -1 (the last block) otherwise
        self.layered = "layers" in meta
        self.layers: tuple[int, ...] = tuple(int(v) for v in meta.get("layers") or (-1,))
        self.patch_layers: tuple[int, ...] = tuple(int(v) for v in meta.get("patch_layers") or (-1,))
        self.version = int(meta.get("store_version", 1))
        self.units = meta.get("units")  # sealed format-2 stores: {"hash": [...], "sizes": {array: [...]}}
        self._lock_fd: int | None = None
        self._zarr_arrays: dict = {}  # writing: each array opened once, not once per unit
        self._codecs: dict = {}  # writing: each array's chunk codec (numcodecs), made once
        self._durable_roots: set[str] = set()  # arrays whose chunk folder ``<array>/c`` is known on disk
        self._roots_lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------
    @property
    def progress_dir(self) -> Path:
        return progress_dir(self.path)

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        row_ids: Sequence[str],
        hidden: int,
        registers: int,
        patches: int,
        chunk_rows: int = 64,
        dtype: str = "float16",
        tokens: Sequence[str] = TOKENS,
        compression: str = DEFAULT_COMPRESSION,
        attrs: dict | None = None,
        channels: Sequence[str] = (),
        layers: Sequence[int] = (-1,),
        patch_layers: Sequence[int] = (-1,),
    ) -> FeatureStore:
        """Create (or reopen, when the same layout and rows exist) a store at its final shape.

        ``channels`` names a channel axis after the rows (per-channel embeddings); empty for none.
        ``layers`` (CLS and registers) and ``patch_layers`` (patches) other than ``(-1,)`` add a layer
        axis after the rows (and channels), named ``layer`` / ``patch_layer``; ``(-1,)`` keeps today's layout.
        """
        path = Path(path)
        fmt = next((f for f, suf in FORMATS.items() if path.name.endswith(suf)), None)
        if fmt is None:
            raise TprobeError(f"{path}: store name must end in .zarr or .h5")
        if dtype not in ("float16", "float32"):
            raise TprobeError(f"dtype {dtype!r} not supported; use float16 or float32")
        if compression not in COMPRESSIONS:
            raise TprobeError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        unknown = [t for t in tokens if t not in TOKENS]
        if unknown or not tokens:
            raise TprobeError(f"tokens {list(tokens)} must be a non-empty subset of {', '.join(TOKENS)}")
        row_ids = [str(r) for r in row_ids]
        n = len(row_ids)
        if n < 1:
            raise TprobeError("no rows to store: every image was filtered out")
        if len(set(row_ids)) != n:
            raise TprobeError("row ids must be unique: the manifest lists an image view twice")
        c = [len(channels)] if channels else []
        layers, patch_layers = tuple(int(v) for v in layers), tuple(int(v) for v in patch_layers)
        if "patches" not in tokens:
            patch_layers = (-1,)
        layered = layers != (-1,) or patch_layers != (-1,)
        lc, lp = ([len(layers)], [len(patch_layers)]) if layered else ([], [])
        shapes = {
            "cls": [n, *c, *lc, hidden],
            "registers": [n, *c, *lc, registers, hidden],
            "patches": [n, *c, *lp, patches, hidden],
        }
        shapes = {k: v for k, v in shapes.items() if k in tokens and not (k == "registers" and not registers)}
        attrs = {
            **(attrs or {}),
            "rows_hash": rows_hash(row_ids),
            "compression": compression,
            "tokens": [t for t in TOKENS if t in shapes],
        }
        meta = {
            "format": fmt,
            "n": n,
            "chunk_rows": chunk_rows,
            "dtype": dtype,
            "shapes": shapes,
            "attrs": attrs,
            "store_version": STORE_VERSION,
        }
        if channels:  # only then, so a one-channel store's metadata stays that of tprobe 0.2
            meta["channels"] = [str(ch) for ch in channels]
        if layered:  # only then, so a last-block store's metadata stays as it was
            meta["layers"], meta["patch_layers"] = list(layers), list(patch_layers)
        store = cls(path, meta)
        if path.exists() and not store.progress_dir.exists():  # complete already
            return cls.open(path)._check_layout(meta)
        store._clean_leftovers()
        if not store.progress_dir.exists():
            store.progress_dir.mkdir(parents=True, exist_ok=True)
            fsync_path(store.progress_dir.parent)
        end = time.monotonic() + CREATE_WAIT_S
        while not (store.progress_dir / "meta.json").exists():
            if store._claim_creation():
                try:
                    np.save(store.progress_dir / "row_ids.npy", np.asarray(row_ids, dtype=str))
                    fsync_path(store.progress_dir / "row_ids.npy")
                    if fmt == "zarr":
                        # arrays half made by a creator that died (no unit is written before meta.json)
                        shutil.rmtree(path, ignore_errors=True)
                        store._create_zarr(row_ids)
                    atomic_write(store.progress_dir / "meta.json", lambda p: p.write_text(json.dumps(meta)))
                finally:
                    store._release_creation()
                return store
            if not store.progress_dir.exists():  # sealed meanwhile by the other workers
                break
            if time.monotonic() > end:
                raise TprobeError(
                    f"{path}: another worker began creating this store {CREATE_WAIT_S:.0f} s ago "
                    f"and has not finished; if it is dead, delete {store.progress_dir} and rerun"
                )
            time.sleep(0.2)
        store = cls.open(path, allow_incomplete=True)._check_layout(meta)
        if not store.complete:
            store._restore_row_ids(row_ids)
        return store

    def _restore_row_ids(self, row_ids: list[str]) -> None:
        """A store being written that lost its ``row_ids.npy`` (an HDF5 store's rows, read at sealing) gets it
        back from the rows it is resumed with: their hash is the store's (:meth:`_check_layout`)."""
        ids = np.asarray(row_ids, dtype=str)
        f = self.progress_dir / "row_ids.npy"
        try:
            if np.array_equal(np.load(f, allow_pickle=False), ids):
                return
        except FileNotFoundError:
            if not self.progress_dir.exists():
                return  # sealed meanwhile
        except (OSError, ValueError):
            pass
        log.warning("%s: its row ids (%s) were missing or damaged; restored", self.path, f.name)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, ids)

        atomic_write(f, write)

    def _claim_creation(self) -> bool:
        """Exactly one of several concurrent workers creates the arrays: the one holding ``create.lock``'s flock.

        The kernel drops a flock when its holder dies, so a lock left by a killed creator (or one on a
        host that died, once its lease ends) is taken over at once; where flock is not available, an
        owner on this host whose pid is gone (or that ran before a reboot) is taken over.
        """
        lock = self.progress_dir / "create.lock"
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            age = None
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except FileNotFoundError:  # the progress folder was sealed away meanwhile
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # no flock on this file system: judge the recorded owner
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner and _alive(owner) and owner.get("pid") != os.getpid():
                os.close(fd)
                return False
        self._lock_fd = fd
        try:
            if (self.progress_dir / "meta.json").exists():  # created while we waited for the lock
                self._release_creation()
                return False
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                owner = {}
            if owner or (
                age is not None and age > 2.0
            ):  # an empty lock: its creator died right after making it
                log.warning(
                    "%s: the worker that began creating this store (host %s, pid %s) is gone; taking over",
                    self.path,
                    owner.get("host", "?"),
                    owner.get("pid", "?"),
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_owner()).encode(), 0)
            os.fsync(fd)
            fsync_path(self.progress_dir)
        except BaseException:
            self._release_creation()
            raise
        return True

    def _release_creation(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def _clean_leftovers(self) -> list[Path]:
        """Remove what killed writers and sealers leave beside the store: private temp files (the store's,
        its manifest's) and progress folders already renamed away, unless their process still runs."""
        removed = []
        names = (self.path.name, self.path.name + ".manifest.parquet")
        here = socket.gethostname()
        for name in names:
            for pattern, sep in ((".tmp*", ".tmp"), (".sealed-*", ".sealed-")):
                for p in self.path.parent.glob(name + pattern):
                    tag = p.name[len(name) + len(sep) :]
                    # ".tmp@<host>@<pid>" (temp_path); a bare pid: this host's, as tprobe <= 0.6.0 named them
                    host, _, pid = tag[1:].rpartition("@") if tag.startswith("@") else (here, "", tag)
                    if (
                        not pid.isdigit()
                        or host != here  # another node's: its pid says nothing here, it may still run
                        or (int(pid) != os.getpid() and _alive({"host": here, "pid": int(pid)}))
                    ):
                        continue
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else _remove(p)
                    removed.append(p)
        return removed

    def _clean_partials(self) -> list[Path]:
        """Remove Zarr's ``*.partial`` temp files (a writer killed mid-chunk) from the store's metadata folders;
        chunk folders are cleaned by :meth:`_scan_chunks`. Only while no writer runs: sealed, or sealing."""
        removed = []
        for folder in [
            self.path,
            *(self.path / n for n in (*self.shapes, "row_ids", "channel", "layer", "patch_layer")),
        ]:
            for p in folder.glob("*.partial") if folder.is_dir() else ():
                _remove(p)
                removed.append(p)
        rid = self.path / "row_ids" / "c"
        if rid.is_dir():
            for p in rid.glob("*.partial"):
                _remove(p)
                removed.append(p)
        return removed

    def _check_layout(self, meta: dict) -> FeatureStore:
        if (
            self.meta["shapes"] != meta["shapes"]
            or self.meta["dtype"] != meta["dtype"]
            or self.channels != list(meta.get("channels") or [])
            or (self.meta.get("layers"), self.meta.get("patch_layers"))
            != (meta.get("layers"), meta.get("patch_layers"))
        ):
            raise TprobeError(f"{self.path}: exists with another layout; delete it to re-extract")
        if self.attrs.get("rows_hash") != meta["attrs"]["rows_hash"]:
            raise TprobeError(
                f"{self.path}: exists with other rows (rows hash {self.attrs.get('rows_hash')}, "
                f"expected {meta['attrs']['rows_hash']}); delete it to re-extract"
            )
        return self

    def _layer_coords(self) -> dict[str, tuple[int, ...]]:
        """The layer axes' coordinate arrays: ``layer`` (CLS, registers) and, when patches are stored, ``patch_layer``."""
        if not self.layered:
            return {}
        return {
            "layer": self.layers,
            **({"patch_layer": self.patch_layers} if "patches" in self.shapes else {}),
        }

    def _codec(self):
        from zarr.codecs import BloscCodec

        c = self.attrs.get("compression", "zstd")
        return None if c == "none" else BloscCodec(cname=c, clevel=3, shuffle="shuffle")

    def _create_zarr(self, row_ids: list[str]) -> None:
        import zarr

        group = zarr.open_group(self.path, mode="a", attributes={**self.attrs, "complete": False})
        codec = self._codec()
        for name, shape in self.shapes.items():
            zarr.create_array(
                group.store,
                name=name,
                shape=tuple(shape),
                dtype=self.meta["dtype"],
                chunks=(self.chunk_rows, *shape[1:]),
                compressors=codec,
                fill_value=0,
                dimension_names=_dims(name, self.channels, self.layered),
                attributes={"coordinates": "row_ids"},
                overwrite=True,
            )
        ids = zarr.create_array(
            group.store,
            name="row_ids",
            shape=(self.n,),
            dtype=str,
            chunks=(self.n,),
            dimension_names=DIMS["row_ids"],
            overwrite=True,
        )
        ids[:] = np.asarray(row_ids, dtype=str)
        if self.channels:  # the channel names, xarray's index of the channel axis: ds.sel(channel="nadh")
            names = zarr.create_array(
                group.store,
                name="channel",
                shape=(len(self.channels),),
                dtype=str,
                chunks=(len(self.channels),),
                dimension_names=("channel",),
                overwrite=True,
            )
            names[:] = np.asarray(self.channels, dtype=str)
        if self.layered:  # the layer indices (-1 = the last block), xarray's index: ds.sel(layer=-4)
            for dim, values in self._layer_coords().items():
                arr = zarr.create_array(
                    group.store,
                    name=dim,
                    shape=(len(values),),
                    dtype="int64",
                    chunks=(len(values),),
                    dimension_names=(dim,),
                    overwrite=True,
                )
                arr[:] = np.asarray(values, dtype=np.int64)
        # every file and folder made here reaches the disk before meta.json says the arrays exist
        for folder, _, files in os.walk(self.path, topdown=False):
            for f in files:
                fsync_path(Path(folder) / f)
            fsync_path(Path(folder))
        fsync_path(self.path.parent)

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False, check: bool = True) -> FeatureStore:
        """Open a store; unless ``allow_incomplete``, it must be complete.

        A sealed store is cleaned of what killed writers left and, with ``check``, every Zarr chunk it
        should hold must exist (with its recorded size): one line naming the fix otherwise.
        """
        path = Path(path)
        progress = progress_dir(path) / "meta.json"
        if progress.exists():
            # a store being written: its metadata is the progress folder's (the store, if any, is not whole)
            fix = (
                f"delete {progress.parent.name}{' and ' + path.name if path.exists() else ''} "
                "beside it and rerun `tprobe extract`"
            )
            try:
                meta = json.loads(progress.read_text())
            except (OSError, ValueError):
                raise TprobeError(f"{progress}: is damaged (not the JSON tprobe writes); {fix}") from None
            store = cls(path, _checked_meta(progress, meta, fix))
            if not allow_incomplete:
                done, total = len(store.done_units()), store.n_units
                raise TprobeError(
                    f"{path}: store is incomplete ({done}/{total} chunks); rerun the same "
                    "`tprobe extract` command to resume it"
                )
            return store
        if not path.exists():
            raise TprobeError(f"{path}: no such store; run `tprobe extract` first")
        try:
            if path.suffix == ".h5":
                import h5py

                with h5py.File(path, "r") as f:
                    meta = json.loads(f.attrs["tprobe_meta"])
            else:
                attrs = group_attributes(path)  # zarr.json as plain JSON: no zarr import (~0.2 s)
                if attrs is None or "tprobe_meta" not in attrs:
                    import zarr

                    attrs = dict(zarr.open_group(path, mode="r").attrs)
                meta = attrs["tprobe_meta"]
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:  # the last two: Zarr's, on
            # JSON that is not its metadata (a list, attributes that are not a dict, an unknown key)
            raise TprobeError(
                f"{path}: not a readable tprobe store ({type(exc).__name__}); delete it and re-extract"
            ) from None
        store = cls(path, _checked_meta(path, meta))
        store._clean_leftovers()
        if store.format == "zarr":
            missing = store._scan_chunks(clean=True)
            if check and missing:
                raise TprobeError(store._missing_line(missing))
        return store

    # ---- integrity ----------------------------------------------------------------------
    def _chunk_file(self, name: str, unit: int) -> Path:
        """The Zarr chunk file of ``unit`` in array ``name`` (``<name>/c/<unit>/0/.../0``)."""
        return self.path.joinpath(name, "c", str(unit), *["0"] * (len(self.shapes[name]) - 1))

    def _scan_chunks(self, units=None, *, clean: bool = False) -> list[str]:
        """The chunk files (``name/c/u/0``) that are missing or not their recorded size; with ``clean``,
        also remove Zarr's ``*.partial`` temp files found beside them and in the metadata folders."""
        sizes = (self.units or {}).get("sizes", {})
        bad = []
        for name in self.shapes:
            for u in range(self.n_units) if units is None else units:
                f = self._chunk_file(name, u)
                try:
                    with os.scandir(f.parent) as it:
                        entries = {e.name: e for e in it}
                except (FileNotFoundError, NotADirectoryError):
                    entries = {}
                if clean:
                    for e in entries:
                        if e.endswith(".partial"):
                            _remove(f.parent / e)
                entry = entries.get(f.name)
                want = sizes.get(name, [None] * self.n_units)[u] if name in sizes else None
                if (
                    entry is None
                    or not entry.is_file()
                    or (want is not None and entry.stat().st_size != want)
                ):
                    bad.append(f"{name}/c/{u}")
        if clean:
            self._clean_partials()
        return bad

    def _missing_line(self, bad: list[str]) -> str:
        return (
            f"{self.path}: chunk {bad[0]} is missing or truncated ({len(bad)} of "
            f"{self.n_units * len(self.shapes)} chunks); the store is damaged and would read zeros there — "
            f"delete it and re-extract (`tprobe status --deep {self.path.name}` checks every chunk)"
        )

    def verify(self, *, deep: bool = False) -> list[str]:
        """Problems found (empty: none). Every Zarr chunk must exist with its recorded size; ``deep``
        re-reads every unit and compares its hash with the one recorded when it was written."""
        if not self.complete:
            return []
        problems = (
            [f"chunk {c} missing or truncated" for c in self._scan_chunks()] if self.format == "zarr" else []
        )
        if deep and self.units and not problems:
            for u, want in enumerate(self.units["hash"]):
                sl = self.unit_slice(u)
                try:
                    ok = _digest_matches({n: self._read_raw(n, sl) for n in self.shapes}, want)
                except Exception as exc:  # noqa: BLE001 - any decode failure is damage, reported per unit
                    problems.append(
                        f"unit {u} (rows {sl.start}-{sl.stop}) cannot be read ({type(exc).__name__})"
                    )
                    continue
                if not ok:
                    problems.append(f"unit {u} (rows {sl.start}-{sl.stop}) does not match its recorded hash")
        return problems

    # ---- writing ------------------------------------------------------------------------
    @property
    def n_units(self) -> int:
        return -(-self.n // self.chunk_rows)

    def unit_slice(self, unit: int) -> slice:
        return slice(unit * self.chunk_rows, min(self.n, (unit + 1) * self.chunk_rows))

    def done_units(self) -> set[int]:
        if not self.progress_dir.exists():
            return set(range(self.n_units))
        return {int(p.name.split("_")[1].split(".")[0]) for p in self.progress_dir.glob("unit_*.done")}

    def pending_units(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Units still to write; with ``shard=(i, k)`` only this worker's ``units[i::k]``."""
        i, k = shard
        done = self.done_units()
        return [u for u in range(self.n_units)[i::k] if u not in done]

    @property
    def complete(self) -> bool:
        return not self.progress_dir.exists()

    def write_unit(self, unit: int, tokens: dict[str, np.ndarray]) -> None:
        """Write one whole unit of every stored token array, fsync it, then mark it done."""
        sl = self.unit_slice(unit)
        rows = sl.stop - sl.start
        dtype = self.meta["dtype"]
        arrays = {}
        for name, shape in self.shapes.items():
            arr = np.asarray(tokens[name])
            if arr.shape != (rows, *shape[1:]):
                raise ValueError(f"unit {unit} {name}: shape {arr.shape} != {(rows, *shape[1:])}")
            arrays[name] = arr.astype(dtype, copy=False)
        marker = self.progress_dir / f"unit_{unit:06d}.done"
        if marker.exists() or not self.progress_dir.exists():
            # written meanwhile by another extract of this store, or sealed by it: its rows stand (never
            # overwrite a sealed store's chunks, whose sizes and hashes are recorded)
            return
        record = {"hash": _unit_digest(arrays)}
        if self.format == "zarr":
            record["sizes"] = {}
            for name, arr in arrays.items():
                self._chunk_root(name)
                # every chunk is written, even one equal to the fill value, so a missing chunk is always damage
                self._write_chunk(name, unit, arr)
            # every file and folder of the unit reaches the disk before its marker; issued together, so
            # the file system commits them at once rather than one after another
            fsync_all([p for name in arrays for p in self._chunk_paths(name, unit)])
            for name in arrays:
                record["sizes"][name] = self._chunk_file(name, unit).stat().st_size
        else:
            part = self.progress_dir / f"part_{unit:06d}.npz"
            atomic_write(part, lambda p: np.savez(open(p, "wb"), **arrays))
            record["part_size"] = part.stat().st_size
        try:
            atomic_write(marker, lambda p: p.write_text(json.dumps(record)))
        except FileNotFoundError:
            if self.progress_dir.exists():
                raise
            raise TprobeError(
                f"{self.path}: another extract of this store sealed it while this one wrote unit {unit}; "
                f"check it with `tprobe status --deep {self.path.name}` (delete and re-extract if damaged)"
            ) from None

    def _write_chunk(self, name: str, unit: int, arr: np.ndarray) -> None:
        """Write ``unit``'s chunk of array ``name`` as Zarr would (the same bytes: a test compares them), from
        this thread: encoded here (Blosc releases the GIL), not through Zarr's one event-loop thread."""
        rows = self.chunk_rows
        if len(arr) < rows:  # the last unit: Zarr pads the chunk to its full shape with the fill value (0)
            full = np.zeros((rows, *arr.shape[1:]), arr.dtype)
            full[: len(arr)] = arr
            arr = full
        raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))  # Zarr's BytesCodec: little endian
        codec = self._chunk_codec(name)
        # Zarr hands Blosc the chunk as bytes (uint8): with numcodecs < 0.16, Blosc's typesize is theirs
        data = raw.data if codec is None else codec.encode(raw.reshape(-1).view(np.uint8))
        path = self._chunk_file(name, unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # Zarr's own temporary name: cleaned as its
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _chunk_codec(self, name: str):
        """The numcodecs Blosc that Zarr's BloscCodec of array ``name`` encodes with (None: uncompressed)."""
        if name not in self._codecs:
            import numcodecs
            from numcodecs import Blosc
            from packaging.version import Version
            from zarr.codecs import BloscCodec

            meta = self._zarr_array(name).metadata
            found = [c for c in meta.codecs if isinstance(c, BloscCodec)]
            if not found:
                self._codecs[name] = None
            else:
                c = found[0]
                shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[
                    str(getattr(c.shuffle, "value", c.shuffle))
                ]
                config = {
                    "cname": str(getattr(c.cname, "value", c.cname)),
                    "clevel": c.clevel,
                    "shuffle": shuffle,
                    "blocksize": c.blocksize,
                }
                # as Zarr's BloscCodec: numcodecs 0.16 added Blosc's typesize (Zarr >= 3.0 allows 0.14);
                # before it, Blosc takes the item size of the buffer, 1 for the bytes Zarr hands it
                if Version(numcodecs.__version__) >= Version("0.16.0"):
                    config["typesize"] = c.typesize or np.dtype(self.meta["dtype"]).itemsize
                self._codecs[name] = Blosc.from_config(config)
        return self._codecs[name]

    def _zarr_array(self, name: str):
        """Array ``name`` opened for writing (once per store object; a race opens it twice, harmlessly)."""
        arr = self._zarr_arrays.get(name)
        if arr is None:
            import zarr

            arr = zarr.open_array(self.path / name, mode="r+").with_config({"write_empty_chunks": True})
            self._zarr_arrays[name] = arr
        return arr

    def _chunk_root(self, name: str) -> None:
        """Make ``<array>/c`` exist on disk (its entry in ``<array>`` fsynced) before this process's first
        unit of the array, so a unit's own fsyncs stop at ``c``; under a lock, so no writer thread
        marks a unit done while another has made ``c`` but not yet fsynced ``<array>``."""
        if name in self._durable_roots:
            return
        with self._roots_lock:
            if name not in self._durable_roots:
                root = self.path / name / "c"
                root.mkdir(exist_ok=True)
                fsync_path(root.parent)
                self._durable_roots.add(name)

    def _chunk_paths(self, name: str, unit: int) -> list[Path]:
        """What to fsync for one written Zarr chunk: its files (``<array>/c/<unit>/0/...``), their folders
        and ``<array>/c``, which gained the unit's folder (``<array>`` holds ``c`` already: :meth:`_chunk_root`)."""
        root = self.path / name / "c" / str(unit)
        paths = []
        for folder, _, files in os.walk(root, topdown=False):
            paths += [Path(folder) / f for f in files]
            paths.append(Path(folder))
        return [*paths, root.parent]

    def drop_damaged_units(self, units=None) -> list[int]:
        """Units marked done whose data is gone: a Zarr chunk or an HDF5 store's part missing or not the size
        its marker recorded. Their markers (and parts) are removed, so they are written again; returns
        them. A marker is renamed into place after its unit's data reached the disk, so only damage from
        outside (a cut copy, a lost file) makes one; sealing such a store would seal a store that reads
        zeros, or that every reader refuses."""
        if self.complete:
            return []
        bad = []
        for u in sorted(self.done_units()) if units is None else units:
            marker = self.progress_dir / f"unit_{u:06d}.done"
            try:
                rec = json.loads(marker.read_text() or "{}")
            except FileNotFoundError:
                continue  # not done (a concurrent sealer renamed the folder away)
            except (OSError, ValueError):
                rec = None
            sizes = rec.get("sizes") if isinstance(rec, dict) else None
            if rec is None:
                damaged = True
            elif self.format == "zarr":
                damaged = False
                for name in self.shapes:
                    want = sizes.get(name) if isinstance(sizes, dict) else None
                    try:
                        st = self._chunk_file(name, u).stat()
                    except (FileNotFoundError, NotADirectoryError):
                        damaged = True
                        break
                    if want is not None and st.st_size != want:
                        damaged = True
                        break
            else:
                part = self.progress_dir / f"part_{u:06d}.npz"
                want = rec.get("part_size") if isinstance(rec, dict) else None
                damaged = not part.is_file() or (want is not None and part.stat().st_size != want)
            if damaged:
                sl = self.unit_slice(u)
                log.warning(
                    "%s: unit %d (rows %d-%d) was marked done but its data is missing or truncated; "
                    "it is written again",
                    self.path,
                    u,
                    sl.start,
                    sl.stop,
                )
                self._drop_unit(u)
                bad.append(u)
        return bad

    def _drop_unit(self, unit: int) -> None:
        """Mark a finished unit not done (its marker first), so the next run writes it again."""
        _remove(self.progress_dir / f"unit_{unit:06d}.done")
        _remove(self.progress_dir / f"part_{unit:06d}.npz")

    def _redo_line(self, bad: list[int]) -> str:
        sl = self.unit_slice(bad[0])
        return (
            f"{self.path}: {len(bad)} finished unit(s) (first: unit {bad[0]}, rows {sl.start}-{sl.stop}) were "
            "missing or damaged on disk, so the store was not sealed; they are marked to be written again — "
            "rerun the same `tprobe extract` command"
        )

    def _unit_records(self) -> dict | None:
        """Every unit's recorded hash (and Zarr chunk sizes), from the markers; None if any marker predates them."""
        hashes, sizes = [], {name: [] for name in self.shapes} if self.format == "zarr" else {}
        for u in range(self.n_units):
            try:
                rec = json.loads((self.progress_dir / f"unit_{u:06d}.done").read_text() or "{}")
            except ValueError:
                return None
            if "hash" not in rec or (sizes and set(rec.get("sizes", {})) != set(sizes)):
                return None
            hashes.append(rec["hash"])
            for name in sizes:
                sizes[name].append(int(rec["sizes"][name]))
        return {"hash": hashes, **({"sizes": sizes} if sizes else {})}

    def finalize(self) -> bool:
        """Seal the store once every unit is written; True once complete. Safe to run by any worker, any time."""
        if self.complete:
            return True
        if len(self.done_units()) < self.n_units:
            return False
        bad = self.drop_damaged_units()
        if bad:
            raise TprobeError(self._redo_line(bad))
        meta = dict(self.meta)
        try:
            units = self._unit_records()
            if units is not None and self.version >= 2:
                meta["units"] = units
            if self.format == "zarr":
                import zarr

                self._clean_partials()
                missing = self._scan_chunks(clean=True)
                if missing:  # written units whose chunks are gone: never seal a store that reads zeros
                    raise TprobeError(self._missing_line(missing))
                group = zarr.open_group(self.path, mode="r+")
                group.attrs.update({**self.attrs, "complete": True, "tprobe_meta": meta})
                fsync_path(self.path / "zarr.json")
                fsync_path(self.path)
            else:
                try:
                    atomic_write(self.path, lambda p: self._assemble_h5(p, meta))
                except _DamagedParts as exc:  # atomic_write removed its temp file
                    raise TprobeError(self._redo_line(exc.units)) from None
            # one atomic step turns the store complete; a concurrent sealer that lost the race finds it gone
            trash = self.path.with_name(f"{self.path.name}.sealed-{os.getpid()}")
            os.rename(self.progress_dir, trash)
            fsync_path(self.path.parent)
        except FileNotFoundError:
            if not self.complete:
                raise
            return True  # another worker sealed it meanwhile
        shutil.rmtree(trash, ignore_errors=True)
        self.meta, self.units = meta, meta.get("units")
        return True

    def _assemble_h5(self, target: Path, meta: dict) -> None:
        import h5py

        row_ids = np.load(self.progress_dir / "row_ids.npy", allow_pickle=False)
        comp = self.attrs.get("compression", "zstd")
        opts = {} if comp == "none" else {"compression": "gzip", "compression_opts": 1, "shuffle": True}
        with h5py.File(target, "w") as f:
            dsets = {
                name: f.create_dataset(
                    name,
                    shape=tuple(shape),
                    dtype=meta["dtype"],
                    chunks=(min(self.chunk_rows, self.n), *shape[1:]),
                    **opts,
                )
                for name, shape in self.shapes.items()
            }
            f.create_dataset("row_ids", data=row_ids.astype(object), dtype=h5py.string_dtype())
            if self.channels:
                f.create_dataset(
                    "channel", data=np.asarray(self.channels, dtype=object), dtype=h5py.string_dtype()
                )
            for dim, values in self._layer_coords().items():
                f.create_dataset(dim, data=np.asarray(values, dtype=np.int64))
            hashes, bad = (meta.get("units") or {}).get("hash"), []
            for unit in range(self.n_units):
                try:
                    with np.load(self.progress_dir / f"part_{unit:06d}.npz", allow_pickle=False) as part:
                        arrays = {name: part[name] for name in dsets}
                    ok = hashes is None or _digest_matches(arrays, hashes[unit])
                except FileNotFoundError:
                    if not self.progress_dir.exists():
                        raise  # sealed meanwhile by another worker
                    ok = False
                except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a cut or damaged part
                    ok = False
                if not ok:
                    bad.append(unit)
                    continue
                for name, ds in dsets.items():
                    ds[self.unit_slice(unit)] = arrays[name]
            if bad:
                for unit in bad:
                    self._drop_unit(unit)
                raise _DamagedParts(bad)
            for name, ds in dsets.items():
                for i, dim in enumerate(_dims(name, self.channels, self.layered)):
                    ds.dims[i].label = dim
            for key, value in self.attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            f.attrs["tprobe_meta"] = json.dumps(meta)

    # ---- row identity -------------------------------------------------------------------
    def row_ids(self) -> np.ndarray:
        """The ``image_id`` of every row, in store order."""
        if not self.complete:
            f = self.progress_dir / "row_ids.npy"
            try:
                return np.load(f, allow_pickle=False)
            except (OSError, ValueError):
                raise TprobeError(
                    f"{f}: missing or damaged; rerun the same `tprobe extract` command (it restores it)"
                ) from None
        try:
            if self.format == "zarr":
                values = string_array(self.path / "row_ids")  # tprobe's layout, read without zarr
                if values is None:
                    import zarr

                    values = zarr.open_array(self.path / "row_ids", mode="r")[:].tolist()
                ids = np.asarray(values, dtype=str)
            else:
                import h5py

                with h5py.File(self.path, "r") as f:
                    ids = f["row_ids"].asstr()[:].astype(str)
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
            # RuntimeError: zstd's on a damaged chunk; TypeError / AttributeError: Zarr's on a zarr.json that
            # is JSON but not its metadata
            raise TprobeError(
                f"{self.path}: its row_ids array is missing or unreadable ({type(exc).__name__}); "
                "delete the store and re-extract"
            ) from None
        if ids.shape != (self.n,):
            raise TprobeError(
                f"{self.path}: its row_ids array holds {ids.size} ids for {self.n} rows; "
                "delete the store and re-extract"
            )
        return ids

    def verify_rows(self, image_ids: Sequence[str], source: str = "the manifest") -> None:
        """Raise unless ``image_ids`` are exactly this store's rows, in order (the hash, then every row)."""
        ids = np.asarray([str(i) for i in image_ids], dtype=str)
        if len(ids) != self.n:
            raise TprobeError(
                f"{self.path}: {source} has {len(ids)} rows, the store {self.n}; their rows differ — "
                "use the store's own manifest or re-extract with this data"
            )
        stored = self.row_ids()
        bad = np.flatnonzero(stored != ids)
        if not len(bad):
            if rows_hash(ids) == self.attrs.get("rows_hash"):
                return
            raise TprobeError(
                f"{self.path}: its row ids do not match its rows hash (the store is damaged); "
                "delete it and re-extract"
            )
        i = int(bad[0])
        raise TprobeError(
            f"{self.path}: row {i} holds {stored[i]} but {source} says {ids[i]} ({len(bad)} rows "
            "differ); use the store's own manifest or re-extract with this data"
        )

    def verify_manifest(self, manifest, source: str = "the manifest") -> None:
        """:meth:`verify_rows`, then the manifest's labels and donors against the store's ``manifest_hash``
        (stores written before it was recorded are checked for rows only)."""
        want = self.attrs.get("manifest_hash")
        missing = [c for c in ("image_id", "label", "donor")[: 3 if want else 1] if c not in manifest]
        if missing:
            raise TprobeError(
                f"{self.path}: {source} has no {', '.join(missing)} column; use the store's own manifest "
                "(restore it if edited) or re-extract"
            )
        ids = manifest["image_id"]  # a DataFrame's column, or a list (:func:`verify_own_manifest`)
        self.verify_rows(ids.tolist() if hasattr(ids, "tolist") else ids, source)
        if want and manifest_hash(manifest) != want:
            raise TprobeError(
                f"{self.path}: {source} lists the store's rows with other labels or donors than it was "
                "extracted with (edited?); restore it or re-extract"
            )
        odd = "label" in manifest and label_kind(manifest["label"])
        if odd:  # "0" and 0 hash alike (``f"{v}"``): text labels pass the hash, then break the probes
            raise TprobeError(
                f"{self.path}: {source}'s label column holds {odd}, not the integer labels it was "
                "extracted with (edited?); restore it or re-extract"
            )

    # ---- reading ------------------------------------------------------------------------
    @property
    def num_registers(self) -> int:
        if "registers" in self.shapes:
            return self.shapes["registers"][-2]
        return int(self.attrs.get("num_register_tokens", 0) or 0)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Read one token array (or a row range of it) as stored."""
        if name not in self.shapes:
            raise TprobeError(
                f"{self.path}: has no {name!r} tokens (it holds {', '.join(self.shapes)}); "
                "re-extract with those --tokens"
            )
        if self.format == "zarr" and self.complete:  # a missing chunk would read as zeros (the fill value)
            start, stop, _ = rows.indices(self.n)
            bad = (
                self._scan_chunks(range(start // self.chunk_rows, -(-stop // self.chunk_rows)))
                if stop > start
                else []
            )
            if bad:
                raise TprobeError(self._missing_line(bad))
        try:
            return self._read_raw(name, rows)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # a damaged chunk or file; TypeError / AttributeError: Zarr's on a zarr.json that is not its metadata
            raise TprobeError(
                f"{self.path}: {name} rows {rows.start or 0}-{rows.stop or self.n} cannot be read "
                f"({type(exc).__name__}: {str(exc)[:80]}); the store is damaged — delete it and "
                "re-extract"
            ) from None

    def _read_raw(self, name: str, rows: slice) -> np.ndarray:
        if self.format == "zarr":
            import zarr

            return np.asarray(zarr.open_array(self.path / name, mode="r")[rows])
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[name][rows]

    def iter_units(self, names=TOKENS) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Yield ``(rows, {name: array})`` chunk by chunk, so memory stays one chunk wide."""
        names = [n for n in names if n in self.shapes]
        for unit in range(self.n_units):
            sl = self.unit_slice(unit)
            yield sl, {n: self.read(n, sl) for n in names}

    def check_pool(self, pool: str) -> None:
        """Refuse (one line naming the fix) a pool this store's tokens and layers cannot give."""
        check_layered_pool(pool, self.num_registers, self.layers, self.patch_layers)

    def layer_pools(self) -> list[str]:
        """``cls@<layer>`` for every stored CLS layer, shallow to deep (what ``--pool layers`` sweeps)."""
        return [f"cls@{v}" for v in self.layers]

    def pooled(self, pool: str = "cls") -> np.ndarray:
        """Pool tokens into one float32 vector per row (:func:`tprobe.models.tokens.pool_tokens`), chunk by chunk."""
        return self.pooled_many([pool])[pool]

    def pooled_many(self, pools) -> dict[str, np.ndarray]:
        """Several poolings from ONE pass over the store (each chunk read and decoded once)."""
        need = set()
        for pool in pools:
            self.check_pool(pool)
            need |= {t for t in pool_needs(pool) if not (t == "registers" and not self.num_registers)}
        missing = sorted(need - set(self.shapes))
        if missing:
            raise TprobeError(
                f"{self.path}: pool(s) {', '.join(pools)} need {', '.join(missing)} tokens, which this "
                f"store does not hold (it holds {', '.join(self.shapes)}); re-extract with --tokens"
            )
        out: dict[str, np.ndarray] = {}  # filled chunk by chunk: no list of parts, no final copy
        for sl, t in self.iter_units([n for n in TOKENS if n in need]):
            # a channel axis folds into the rows, is pooled per channel, and unfolds into the columns
            t = {
                k: v.astype(np.float32).reshape(-1, *v.shape[2:]) if self.channels else v.astype(np.float32)
                for k, v in t.items()
            }
            for p in pools:
                if self.layered:
                    v = pool_layered(
                        t.get("cls"), t.get("registers"), t.get("patches"), p, self.layers, self.patch_layers
                    )
                else:
                    v = pool_tokens(t.get("cls"), t.get("registers"), t.get("patches"), p)
                v = v.reshape(sl.stop - sl.start, -1)
                if p not in out:
                    out[p] = np.empty((self.n, v.shape[1]), np.float32)
                out[p][sl] = v
        return out


def verified_manifest(store: FeatureStore, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The manifest of ``store``'s rows, row identity verified.

    ``manifest`` defaults to the store's own (``<store>.manifest.parquet``); any manifest given must
    list exactly the store's rows, in order, with the labels and donors it was extracted with, or this raises.
    """
    source_name = "the manifest given"
    if manifest is None:
        manifest, source_name = read_own_manifest(store.path), manifest_path(store.path).name
    store.verify_manifest(manifest, source_name)
    return manifest


def read_own_manifest(store_path: str | Path) -> pd.DataFrame:
    """The store's own manifest (``<store>.manifest.parquet``), unverified; a missing or unreadable
    file is one line naming it and the fix."""
    import pandas as pd

    mpath = manifest_path(store_path)
    if not mpath.exists():
        raise TprobeError(f"{store_path}: its manifest {mpath.name} is missing; re-extract the store")
    try:
        return pd.read_parquet(mpath)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: not a parquet file
        raise TprobeError(
            f"{mpath}: cannot be read as the store's manifest ({type(exc).__name__}: {str(exc)[:80]}); "
            "it is damaged — restore it or re-extract the store"
        ) from None


def verify_own_manifest(store: FeatureStore) -> None:
    """:func:`verified_manifest` of the store's own manifest, without pandas (~0.3 s to import) where
    pyarrow gives the values pandas would (:func:`tprobe.cache.lightread.manifest_keys`): what
    ``tprobe status`` checks. Any other manifest, and any mismatch, goes through pandas, so every
    outcome and line is :func:`verified_manifest`'s."""
    mpath = manifest_path(store.path)
    keys = manifest_keys(mpath) if mpath.is_file() else None
    if keys is not None:
        try:
            store.verify_manifest(keys, mpath.name)
        except TprobeError:
            pass  # reported by pandas' reading below, word for word as before
        else:
            return
    verified_manifest(store)
