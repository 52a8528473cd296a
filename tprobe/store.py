"""Chunked token stores (Zarr or HDF5): create at final shape, write whole units, resume, read + pool.

A store holds ``cls (N, D)``, ``registers (N, R, D)`` (only when R > 0) and ``patches (N, P, D)``,
chunked along N in units of ``chunk_rows`` rows. The unit of writing is one whole chunk, so
concurrent or interrupted writers never share a chunk. Progress lives beside the store in
``<store>.progress/``: ``meta.json`` (shapes + attributes) and one marker per finished unit,
written after its data with a temp file + rename. For HDF5 (one file, one writer) each unit is
written as an ``.npy`` part first and the ``.h5`` file is assembled once all units are done, so
a killed run never leaves a half-written HDF5 file. A store is readable only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tprobe.errors import TprobeError

__all__ = ["FeatureStore", "POOLS", "FORMATS"]

FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}
POOLS = ("cls", "mean", "registers", "cls+mean", "concat")
TOKENS = ("cls", "registers", "patches")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _wait_for(meta: Path, path: Path, seconds: float = 120.0) -> None:
    """Wait while another worker is creating the store (its meta.json appears last)."""
    import time

    end = time.monotonic() + seconds
    while not meta.exists() and not (path.exists() and not meta.parent.exists()):
        if time.monotonic() > end:
            raise TprobeError(f"{path}: another worker began creating this store but never finished; "
                              f"delete {meta.parent} and {path} and rerun")  # fmt: skip
        time.sleep(0.2)


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

    # ---- construction -------------------------------------------------------------------
    @property
    def progress_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".progress")

    @classmethod
    def create(
        cls, path: str | Path, *, n: int, hidden: int, registers: int, patches: int,
        chunk_rows: int = 64, dtype: str = "float16", attrs: dict | None = None,
    ) -> FeatureStore:  # fmt: skip
        """Create (or reopen, when the same layout exists) a store at its final shape."""
        path = Path(path)
        fmt = next((f for f, suf in FORMATS.items() if path.name.endswith(suf)), None)
        if fmt is None:
            raise TprobeError(f"{path}: store name must end in .zarr or .h5")
        if dtype not in ("float16", "float32", "bfloat16"):
            raise TprobeError(f"--dtype {dtype} not supported; use float16 or float32")
        if n < 1:
            raise TprobeError("no rows to store: every image was filtered out")
        shapes = {"cls": [n, hidden], "patches": [n, patches, hidden]}
        if registers:
            shapes["registers"] = [n, registers, hidden]
        meta = {"format": fmt, "n": n, "chunk_rows": chunk_rows, "dtype": dtype,
                "shapes": shapes, "attrs": attrs or {}}  # fmt: skip
        store = cls(path, meta)
        if path.exists() and not store.progress_dir.exists():  # complete already
            return cls.open(path)._check_layout(shapes, dtype)
        store.progress_dir.mkdir(parents=True, exist_ok=True)
        try:  # exactly one of several concurrent workers (--shard) creates the arrays
            os.close(os.open(store.progress_dir / "create.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            creator = not path.exists()
        except FileExistsError:
            creator = False
        if creator:
            if fmt == "zarr":
                store._create_zarr()
            _atomic_write(store.progress_dir / "meta.json", lambda p: p.write_text(json.dumps(meta)))
            return store
        _wait_for(store.progress_dir / "meta.json", path)
        return cls.open(path, allow_incomplete=True)._check_layout(shapes, dtype)

    def _check_layout(self, shapes: dict, dtype: str) -> FeatureStore:
        if self.meta["shapes"] != shapes or self.meta["dtype"] != dtype:
            raise TprobeError(f"{self.path}: exists with another layout; delete it to re-extract")
        return self

    def _create_zarr(self) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        group = zarr.open_group(self.path, mode="a", attributes={**self.attrs, "complete": False})
        blosc = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        for name, shape in self.shapes.items():
            chunks = (self.chunk_rows, *shape[1:])
            zarr.create_array(group.store, name=f"{name}", shape=tuple(shape), dtype=self.meta["dtype"],
                              chunks=chunks, compressors=blosc, fill_value=0, overwrite=True)  # fmt: skip

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
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                meta = json.loads(f.attrs["tprobe_meta"])
        else:
            import zarr

            meta = dict(zarr.open_group(path, mode="r").attrs)["tprobe_meta"]
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
        """Write one whole unit (``cls``, ``patches`` and, when R > 0, ``registers``), then mark it."""
        sl = self.unit_slice(unit)
        rows = sl.stop - sl.start
        dtype = self.meta["dtype"]
        arrays = {}
        for name, shape in self.shapes.items():
            arr = np.asarray(tokens[name])
            if arr.shape != (rows, *shape[1:]):
                raise ValueError(f"unit {unit} {name}: shape {arr.shape} != {(rows, *shape[1:])}")
            arrays[name] = arr.astype(dtype)
        if self.format == "zarr":
            import zarr

            group = zarr.open_group(self.path, mode="r+")
            for name, arr in arrays.items():
                group[name][sl] = arr
        else:
            part = self.progress_dir / f"part_{unit:06d}.npz"
            _atomic_write(part, lambda p: np.savez(open(p, "wb"), **arrays))
        marker = self.progress_dir / f"unit_{unit:06d}.done"
        _atomic_write(marker, lambda p: p.write_text(""))

    def finalize(self) -> bool:
        """When every unit is written, seal the store (assemble HDF5); True once complete."""
        if self.complete:
            return True
        if len(self.done_units()) < self.n_units:
            return False
        try:  # one sealer only, when several shard workers finish at once
            os.close(os.open(self.progress_dir / "finalize.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        meta = dict(self.meta)
        if self.format == "zarr":
            import zarr

            group = zarr.open_group(self.path, mode="r+")
            group.attrs.update({**self.attrs, "complete": True, "tprobe_meta": meta})
        else:
            _atomic_write(self.path, lambda p: self._assemble_h5(p, meta))
        shutil.rmtree(self.progress_dir, ignore_errors=True)
        return True

    def _assemble_h5(self, target: Path, meta: dict) -> None:
        import h5py

        with h5py.File(target, "w") as f:
            dsets = {
                name: f.create_dataset(name, shape=tuple(shape), dtype=meta["dtype"],
                                       chunks=(self.chunk_rows, *shape[1:]),
                                       compression="gzip", compression_opts=1, shuffle=True)
                for name, shape in self.shapes.items()
            }  # fmt: skip
            for unit in range(self.n_units):
                with np.load(self.progress_dir / f"part_{unit:06d}.npz") as part:
                    for name, ds in dsets.items():
                        ds[self.unit_slice(unit)] = part[name]
            for key, value in self.attrs.items():
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            f.attrs["tprobe_meta"] = json.dumps(meta)

    # ---- reading ------------------------------------------------------------------------
    @property
    def num_registers(self) -> int:
        return self.shapes["registers"][1] if "registers" in self.shapes else 0

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Read one token array (or a row range of it) as stored."""
        if name not in self.shapes:
            raise TprobeError(f"{self.path}: has no {name!r} tokens (it holds {', '.join(self.shapes)})")
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

    def pooled(self, pool: str = "cls") -> np.ndarray:
        """Pool tokens into one float32 vector per row, reading one chunk at a time.

        ``cls``; ``mean`` (patch mean, registers excluded); ``registers`` (register mean);
        ``cls+mean``; ``concat`` (CLS, registers and every patch token flattened).
        """
        if pool not in POOLS:
            raise TprobeError(f"pool {pool!r} is not one of {', '.join(POOLS)}")
        if pool == "registers" and not self.num_registers:
            raise TprobeError(
                f"{self.path}: model has no register tokens; use a -reg model or another --pool"
            )
        need = {"cls": ["cls"], "mean": ["patches"], "registers": ["registers"],
                "cls+mean": ["cls", "patches"], "concat": list(TOKENS)}[pool]  # fmt: skip
        parts = []
        for _, t in self.iter_units(need):
            t = {k: v.astype(np.float32) for k, v in t.items()}
            if pool == "cls":
                parts.append(t["cls"])
            elif pool == "mean":
                parts.append(t["patches"].mean(1))
            elif pool == "registers":
                parts.append(t["registers"].mean(1))
            elif pool == "cls+mean":
                parts.append(np.concatenate([t["cls"], t["patches"].mean(1)], 1))
            else:
                flat = [t["cls"]] + [
                    t[k].reshape(len(t["cls"]), -1) for k in ("registers", "patches") if k in t
                ]
                parts.append(np.concatenate(flat, 1))
        return np.concatenate(parts, 0)
