"""What a feature store holds and how far its extraction got: units done / pending, per shard, seal state.

Read-only: it looks at the store's own progress markers (``<store>.progress/unit_*.done``), so it is
what to watch while shard workers (``tprobe extract --shard i/N``, SLURM array tasks) run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tprobe.cache.keys import progress_dir
from tprobe.cache.store import FeatureStore
from tprobe.errors import TprobeError

__all__ = ["ShardStatus", "StoreStatus", "store_status", "SEAL_STATES"]

SEAL_STATES = ("complete", "incomplete", "being sealed")
# the attributes worth showing; the full set is in the store
KEY_ATTRS = (
    "model",
    "model_id",
    "resolved_revision",
    "model_random_init",
    "precision",
    "rows_hash",
    "hidden_size",
    "num_register_tokens",
    "patch_grid",
    "dtype",
    "dataset_fingerprint",
    "preprocess_hash",
    "tprobe_version",
)


@dataclass
class ShardStatus:
    shard: int  # i of i/N: units i, i+N, i+2N, ...
    units: int
    done: int

    @property
    def pending(self) -> int:
        return self.units - self.done


@dataclass
class StoreStatus:
    path: Path
    state: str  # one of SEAL_STATES
    format: str
    rows: int
    chunk_rows: int
    units: int
    units_done: int
    shards: list[ShardStatus] = field(default_factory=list)  # for the N asked for
    attrs: dict = field(default_factory=dict)
    row_check: str = "not available"
    chunk_check: str = "not checked"

    @property
    def ok(self) -> bool:
        """False when the chunk check found damage (a missing, truncated or altered chunk) or the rows
        check failed (the manifest is missing, unreadable, or lists other rows, labels or donors)."""
        return not self.chunk_check.startswith("DAMAGED") and not self.row_check.startswith("NOT VERIFIED")

    @property
    def units_pending(self) -> int:
        return self.units - self.units_done

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["units_pending"] = self.units_pending
        d["shards"] = [{**asdict(s), "pending": s.pending} for s in self.shards]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StoreStatus:
        d = {k: v for k, v in d.items() if k != "units_pending"}
        shards = [ShardStatus(s["shard"], s["units"], s["done"]) for s in d.pop("shards", [])]
        return cls(path=Path(d.pop("path")), shards=shards, **d)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        rows = [
            ("store", str(self.path)),
            ("state", self.state),
            ("rows", f"{self.rows} in {self.units} units of {self.chunk_rows} rows ({self.format})"),
            ("units", f"{self.units_done} done, {self.units_pending} pending"),
        ]
        n = len(self.shards)
        rows += [
            (f"shard {s.shard}/{n}", f"{s.done}/{s.units} units done" + ("" if s.pending else " (finished)"))
            for s in self.shards
        ]
        rows += [(key, str(self.attrs[key])) for key in KEY_ATTRS if key in self.attrs]
        rows.append(("rows check", self.row_check))
        rows.append(("chunks check", self.chunk_check))
        width = max(len(k) for k, _ in rows) + 2
        return [f"{k:<{width}s}{v}" for k, v in rows]


def seal_state(store: FeatureStore) -> str:
    """complete (sealed, readable); written, not sealed (every unit written: the next run of any shard,
    or ``FeatureStore.finalize``, seals it); incomplete (units pending)."""
    if store.complete:
        return "complete"
    if len(store.done_units()) == store.n_units:
        return "written, not sealed"
    return "incomplete"


def _row_check(store: FeatureStore) -> str:
    """Row identity of the store against its own manifest (every row's image id, in order)."""
    from tprobe.cache.store import manifest_path, verify_own_manifest
    from tprobe.errors import TprobeError

    try:
        verify_own_manifest(store)
    except TprobeError as exc:
        return f"NOT VERIFIED: {exc}"
    return f"ok: {store.n} rows match {manifest_path(store.path).name} (rows hash {store.attrs.get('rows_hash')})"


def _chunk_check(store: FeatureStore, deep: bool) -> str:
    """Every chunk present (Zarr, with its recorded size); with ``deep`` every unit re-hashed."""
    if not store.complete:
        return "not checked (the store is not sealed)"
    problems = store.verify(deep=deep)
    if problems:
        return f"DAMAGED: {problems[0]} ({len(problems)} problem(s)); delete the store and re-extract"
    if deep and not store.units:
        return "not verifiable: written before store format 2 (no recorded hashes); re-extract to get them"
    what = (
        f"{store.n_units} units re-hashed"
        if deep
        else (
            f"{store.n_units * len(store.shapes)} chunks present"
            if store.format == "zarr"
            else "one HDF5 file"
        )
    )
    return f"ok: {what}" + ("" if deep else " (--deep re-hashes every unit)")


def store_status(path: str | Path, shards: int = 1, *, deep: bool = False) -> StoreStatus:
    """Status of the store at ``path``, per shard for ``shards`` workers (``--shard i/shards``);
    ``deep`` re-hashes every unit against the hashes recorded when it was written."""
    if shards < 1:
        raise TprobeError(f"--shards {shards}: must be at least 1")
    path = Path(path)
    progress = progress_dir(path)
    if progress.exists() and not (progress / "meta.json").exists():
        if _creator_alive(progress):
            raise TprobeError(f"{path}: a worker is creating this store right now; ask again in a moment")
        raise TprobeError(
            f"{path}: the worker that began creating this store is gone ({progress.name} has no meta.json); "
            "rerun the same `tprobe extract` command (it takes over)"
        )
    store = FeatureStore.open(path, allow_incomplete=True, check=False)
    store.row_ids()  # a store without its row ids is damaged beyond a report: one line
    done = store.done_units()
    per_shard = []
    if shards > 1 or not store.complete:
        for i in range(shards):
            units = range(store.n_units)[i::shards]
            per_shard.append(ShardStatus(i, len(units), sum(u in done for u in units)))
    return StoreStatus(
        path=store.path,
        state=seal_state(store),
        format=store.format,
        rows=store.n,
        chunk_rows=store.chunk_rows,
        units=store.n_units,
        units_done=len(done),
        shards=per_shard,
        attrs={k: store.attrs[k] for k in KEY_ATTRS if k in store.attrs},
        row_check=_row_check(store),
        chunk_check=_chunk_check(store, deep),
    )


def _creator_alive(progress: Path, grace_s: float = 2.0) -> bool:
    """Whether a worker may still be creating the store: it holds ``create.lock``'s flock (the kernel drops
    it when the worker dies), or made the folder or lock within ``grace_s`` (it may not hold it yet)."""
    import fcntl
    import os
    import time

    lock = progress / "create.lock"
    try:
        if time.time() - max(progress.stat().st_mtime, lock.stat().st_mtime) < grace_s:
            return True
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return progress.exists() and time.time() - progress.stat().st_mtime < grace_s
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or no flock on this file system: it may run
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
