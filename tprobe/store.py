"""Chunked token stores (Zarr or HDF5) that know their own rows: create, write whole units, seal, read.

A store holds ``cls (N, D)``, ``registers (N, R, D)`` (only when R > 0) and ``patches (N, P, D)``
(or the subset chosen with ``tokens``), chunked along N in units of ``chunk_rows`` rows, plus
``row_ids (N,)``: the ``image_id`` of every row. A store of per-channel embeddings (``channels``) has a
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tprobe.errors import TprobeError
from tprobe.tokens import POOL_NEEDS, POOLS, TOKENS, check_pool, pool_tokens

__all__ = ["FeatureStore", "POOLS", "FORMATS", "TOKENS", "COMPRESSIONS", "rows_hash", "manifest_path"]
log = logging.getLogger(__name__)

FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}
COMPRESSIONS = ("zstd", "lz4", "none")
# dimension names differ from the array names: xarray takes a variable named like a dimension for its
# index, and a 3-D one breaks swap_dims/sel ("IndexVariable objects must be 1-dimensional")
DIMS = {"cls": ("rows", "hidden"), "registers": ("rows", "register", "hidden"),
        "patches": ("rows", "patch", "hidden"), "row_ids": ("rows",)}  # fmt: skip


def _dims(name: str, channels) -> tuple[str, ...]:
    dims = DIMS[name]
    return (dims[0], "channel", *dims[1:]) if channels and name != "row_ids" else dims


def rows_hash(row_ids: Sequence[str]) -> str:
    """Hash of the ordered row ids: equal only for the same images in the same order."""
    return hashlib.sha256("\n".join(map(str, row_ids)).encode()).hexdigest()[:16]


def manifest_path(store: str | Path) -> Path:
    """The store's own manifest (its rows, in order), written beside it before its first row."""
    store = Path(store)
    return store.with_name(store.name + ".manifest.parquet")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write through a private temp file, fsync it, rename it into place, fsync the folder."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _alive(owner: dict) -> bool:
    """Whether a lock's owner may still run (another host: assume so)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


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

    # ---- construction -------------------------------------------------------------------
    @property
    def progress_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".progress")

    @classmethod
    def create(
        cls, path: str | Path, *, row_ids: Sequence[str], hidden: int, registers: int, patches: int,
        chunk_rows: int = 64, dtype: str = "float16", tokens: Sequence[str] = TOKENS,
        compression: str = "zstd", attrs: dict | None = None, channels: Sequence[str] = (),
    ) -> FeatureStore:  # fmt: skip
        """Create (or reopen, when the same layout and rows exist) a store at its final shape.

        ``channels`` names a channel axis after the rows (per-channel embeddings); empty for none.
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
        shapes = {"cls": [n, *c, hidden], "registers": [n, *c, registers, hidden],
                  "patches": [n, *c, patches, hidden]}  # fmt: skip
        shapes = {k: v for k, v in shapes.items() if k in tokens and not (k == "registers" and not registers)}
        attrs = {**(attrs or {}), "rows_hash": rows_hash(row_ids), "compression": compression,
                 "tokens": [t for t in TOKENS if t in shapes]}  # fmt: skip
        meta = {
            "format": fmt,
            "n": n,
            "chunk_rows": chunk_rows,
            "dtype": dtype,
            "shapes": shapes,
            "attrs": attrs,
        }
        if channels:  # only then, so a one-channel store's metadata stays that of tprobe 0.2
            meta["channels"] = [str(ch) for ch in channels]
        store = cls(path, meta)
        if path.exists() and not store.progress_dir.exists():  # complete already
            return cls.open(path)._check_layout(meta)
        store._clean_leftovers()
        store.progress_dir.mkdir(parents=True, exist_ok=True)
        if store._claim_creation():
            np.save(store.progress_dir / "row_ids.npy", np.asarray(row_ids, dtype=str))
            if fmt == "zarr":
                store._create_zarr(row_ids)
            _atomic_write(store.progress_dir / "meta.json", lambda p: p.write_text(json.dumps(meta)))
            return store
        store._wait_for_creator()
        return cls.open(path, allow_incomplete=True)._check_layout(meta)

    def _claim_creation(self) -> bool:
        """Exactly one of several concurrent workers creates the arrays; a dead creator's claim is taken over."""
        lock = self.progress_dir / "create.lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if (self.progress_dir / "meta.json").exists():
                    return False
                try:
                    owner = json.loads(lock.read_text() or "{}")
                except (OSError, ValueError):
                    owner = {}
                if owner and not _alive(owner):
                    log.warning("%s: the worker that began creating this store (%s pid %s) is gone; taking over",
                                self.path, owner.get("host"), owner.get("pid"))  # fmt: skip
                    lock.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
            return True
        return False

    def _wait_for_creator(self, seconds: float = 120.0) -> None:
        """Wait while another worker creates the store (its meta.json appears last)."""
        meta = self.progress_dir / "meta.json"
        end = time.monotonic() + seconds
        while not meta.exists() and self.progress_dir.exists():
            if time.monotonic() > end:
                raise TprobeError(f"{self.path}: another worker began creating this store {seconds:.0f} s ago "
                                  f"and has not finished; if it is dead, delete {self.progress_dir} and rerun")  # fmt: skip
            time.sleep(0.2)

    def _clean_leftovers(self) -> None:
        """Remove what killed sealers leave: private temp files and progress folders already renamed away."""
        for pattern, sep in ((".tmp*", ".tmp"), (".sealed-*", ".sealed-")):
            for p in self.path.parent.glob(self.path.name + pattern):
                pid = p.name.rsplit(sep, 1)[-1]
                if pid.isdigit() and not _alive({"host": socket.gethostname(), "pid": int(pid)}):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _check_layout(self, meta: dict) -> FeatureStore:
        if self.meta["shapes"] != meta["shapes"] or self.meta["dtype"] != meta["dtype"] \
                or self.channels != list(meta.get("channels") or []):  # fmt: skip
            raise TprobeError(f"{self.path}: exists with another layout; delete it to re-extract")
        if self.attrs.get("rows_hash") != meta["attrs"]["rows_hash"]:
            raise TprobeError(f"{self.path}: exists with other rows (rows hash {self.attrs.get('rows_hash')}, "
                              f"expected {meta['attrs']['rows_hash']}); delete it to re-extract")  # fmt: skip
        return self

    def _codec(self):
        from zarr.codecs import BloscCodec

        c = self.attrs.get("compression", "zstd")
        return None if c == "none" else BloscCodec(cname=c, clevel=3, shuffle="shuffle")

    def _create_zarr(self, row_ids: list[str]) -> None:
        import zarr

        group = zarr.open_group(self.path, mode="a", attributes={**self.attrs, "complete": False})
        codec = self._codec()
        for name, shape in self.shapes.items():
            zarr.create_array(group.store, name=name, shape=tuple(shape), dtype=self.meta["dtype"],
                              chunks=(self.chunk_rows, *shape[1:]), compressors=codec, fill_value=0,
                              dimension_names=_dims(name, self.channels), attributes={"coordinates": "row_ids"},
                              overwrite=True)  # fmt: skip
        ids = zarr.create_array(group.store, name="row_ids", shape=(self.n,), dtype=str, chunks=(self.n,),
                                dimension_names=DIMS["row_ids"], overwrite=True)  # fmt: skip
        ids[:] = np.asarray(row_ids, dtype=str)
        if self.channels:  # the channel names, xarray's index of the channel axis: ds.sel(channel="nadh")
            names = zarr.create_array(group.store, name="channel", shape=(len(self.channels),), dtype=str,
                                      chunks=(len(self.channels),), dimension_names=("channel",), overwrite=True)  # fmt: skip
            names[:] = np.asarray(self.channels, dtype=str)

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False) -> FeatureStore:
        """Open a store; unless ``allow_incomplete``, it must be complete."""
        path = Path(path)
        progress = path.with_name(path.name + ".progress") / "meta.json"
        if progress.exists():
            store = cls(path, json.loads(progress.read_text()))
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
                import zarr

                meta = dict(zarr.open_group(path, mode="r").attrs)["tprobe_meta"]
        except (OSError, KeyError, ValueError) as exc:
            raise TprobeError(
                f"{path}: not a readable tprobe store ({type(exc).__name__}); re-extract it"
            ) from None
        return cls(path, meta)

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
        if self.format == "zarr":
            import zarr

            group = zarr.open_group(self.path, mode="r+")
            for name, arr in arrays.items():
                group[name][sl] = arr
                self._fsync_chunk(name, unit)
        else:
            part = self.progress_dir / f"part_{unit:06d}.npz"
            _atomic_write(part, lambda p: np.savez(open(p, "wb"), **arrays))
        _atomic_write(self.progress_dir / f"unit_{unit:06d}.done", lambda p: p.write_text(""))

    def _fsync_chunk(self, name: str, unit: int) -> None:
        """fsync the files of one Zarr chunk (``<array>/c/<unit>/0/...``) and their folders."""
        root = self.path / name / "c" / str(unit)
        if root.is_file():
            _fsync_path(root)
            return
        for folder, _, files in os.walk(root):
            for f in files:
                _fsync_path(Path(folder) / f)
            _fsync_path(Path(folder))

    def finalize(self) -> bool:
        """Seal the store once every unit is written; True once complete. Safe to run by any worker, any time."""
        if self.complete:
            return True
        if len(self.done_units()) < self.n_units:
            return False
        meta = dict(self.meta)
        try:
            if self.format == "zarr":
                import zarr

                group = zarr.open_group(self.path, mode="r+")
                group.attrs.update({**self.attrs, "complete": True, "tprobe_meta": meta})
                _fsync_path(self.path / "zarr.json")
            else:
                _atomic_write(self.path, lambda p: self._assemble_h5(p, meta))
            # one atomic step turns the store complete; a concurrent sealer that lost the race finds it gone
            trash = self.path.with_name(f"{self.path.name}.sealed-{os.getpid()}")
            os.rename(self.progress_dir, trash)
        except FileNotFoundError:
            if not self.complete:
                raise
            return True  # another worker sealed it meanwhile
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _assemble_h5(self, target: Path, meta: dict) -> None:
        import h5py

        row_ids = np.load(self.progress_dir / "row_ids.npy", allow_pickle=False)
        comp = self.attrs.get("compression", "zstd")
        opts = {} if comp == "none" else {"compression": "gzip", "compression_opts": 1, "shuffle": True}
        with h5py.File(target, "w") as f:
            dsets = {
                name: f.create_dataset(name, shape=tuple(shape), dtype=meta["dtype"],
                                       chunks=(min(self.chunk_rows, self.n), *shape[1:]), **opts)
                for name, shape in self.shapes.items()
            }  # fmt: skip
            f.create_dataset("row_ids", data=row_ids.astype(object), dtype=h5py.string_dtype())
            if self.channels:
                f.create_dataset(
                    "channel", data=np.asarray(self.channels, dtype=object), dtype=h5py.string_dtype()
                )
            for unit in range(self.n_units):
                with np.load(self.progress_dir / f"part_{unit:06d}.npz", allow_pickle=False) as part:
                    for name, ds in dsets.items():
                        ds[self.unit_slice(unit)] = part[name]
            for name, ds in dsets.items():
                for i, dim in enumerate(_dims(name, self.channels)):
                    ds.dims[i].label = dim
            for key, value in self.attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            f.attrs["tprobe_meta"] = json.dumps(meta)

    # ---- row identity -------------------------------------------------------------------
    def row_ids(self) -> np.ndarray:
        """The ``image_id`` of every row, in store order."""
        if not self.complete:
            return np.load(self.progress_dir / "row_ids.npy", allow_pickle=False)
        if self.format == "zarr":
            import zarr

            return np.asarray(zarr.open_array(self.path / "row_ids", mode="r")[:].tolist(), dtype=str)
        import h5py

        with h5py.File(self.path, "r") as f:
            return f["row_ids"].asstr()[:].astype(str)

    def verify_rows(self, image_ids: Sequence[str], source: str = "the manifest") -> None:
        """Raise unless ``image_ids`` are exactly this store's rows, in order (the hash, then every row)."""
        ids = np.asarray([str(i) for i in image_ids], dtype=str)
        if len(ids) != self.n:
            raise TprobeError(f"{self.path}: {source} has {len(ids)} rows, the store {self.n}; their rows differ — "
                              "use the store's own manifest or re-extract with this data")  # fmt: skip
        stored = self.row_ids()
        bad = np.flatnonzero(stored != ids)
        if not len(bad):
            if rows_hash(ids) == self.attrs.get("rows_hash"):
                return
            raise TprobeError(f"{self.path}: its row ids do not match its rows hash (the store is damaged); "
                              "delete it and re-extract")  # fmt: skip
        i = int(bad[0])
        raise TprobeError(f"{self.path}: row {i} holds {stored[i]} but {source} says {ids[i]} ({len(bad)} rows "
                          "differ); use the store's own manifest or re-extract with this data")  # fmt: skip

    # ---- reading ------------------------------------------------------------------------
    @property
    def num_registers(self) -> int:
        if "registers" in self.shapes:
            return self.shapes["registers"][-2]
        return int(self.attrs.get("num_register_tokens", 0) or 0)

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Read one token array (or a row range of it) as stored."""
        if name not in self.shapes:
            raise TprobeError(f"{self.path}: has no {name!r} tokens (it holds {', '.join(self.shapes)}); "
                              "re-extract with those --tokens")  # fmt: skip
        try:
            if self.format == "zarr":
                import zarr

                return np.asarray(zarr.open_array(self.path / name, mode="r")[rows])
            import h5py

            with h5py.File(self.path, "r") as f:
                return f[name][rows]
        except (OSError, RuntimeError, ValueError, KeyError) as exc:  # a damaged chunk or file
            raise TprobeError(f"{self.path}: {name} rows {rows.start or 0}-{rows.stop or self.n} cannot be read "
                              f"({type(exc).__name__}: {str(exc)[:80]}); the store is damaged — delete it and "
                              "re-extract") from None  # fmt: skip

    def iter_units(self, names=TOKENS) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Yield ``(rows, {name: array})`` chunk by chunk, so memory stays one chunk wide."""
        names = [n for n in names if n in self.shapes]
        for unit in range(self.n_units):
            sl = self.unit_slice(unit)
            yield sl, {n: self.read(n, sl) for n in names}

    def pooled(self, pool: str = "cls") -> np.ndarray:
        """Pool tokens into one float32 vector per row (:func:`tprobe.tokens.pool_tokens`), chunk by chunk."""
        return self.pooled_many([pool])[pool]

    def pooled_many(self, pools) -> dict[str, np.ndarray]:
        """Several poolings from ONE pass over the store (each chunk read and decoded once)."""
        need = set()
        for pool in pools:
            check_pool(pool, self.num_registers)
            need |= {t for t in POOL_NEEDS[pool] if not (t == "registers" and not self.num_registers)}
        missing = sorted(need - set(self.shapes))
        if missing:
            raise TprobeError(f"{self.path}: pool(s) {', '.join(pools)} need {', '.join(missing)} tokens, which this "
                              f"store does not hold (it holds {', '.join(self.shapes)}); re-extract with --tokens")  # fmt: skip
        out: dict[str, np.ndarray] = {}  # filled chunk by chunk: no list of parts, no final copy
        for sl, t in self.iter_units([n for n in TOKENS if n in need]):
            # a channel axis folds into the rows, is pooled per channel, and unfolds into the columns
            t = {k: v.astype(np.float32).reshape(-1, *v.shape[2:]) if self.channels else v.astype(np.float32)
                 for k, v in t.items()}  # fmt: skip
            for p in pools:
                v = pool_tokens(t.get("cls"), t.get("registers"), t.get("patches"), p).reshape(
                    sl.stop - sl.start, -1
                )
                if p not in out:
                    out[p] = np.empty((self.n, v.shape[1]), np.float32)
                out[p][sl] = v
        return out
