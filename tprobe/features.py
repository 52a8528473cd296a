"""Feature matrices for the heads: pooled tokens from a store, or a user's own table.

A :class:`FeatureSet` is ``X (N, F) float32`` plus ``meta`` (one row per X row: ``image_id``,
``path``, ``label``, ``donor``, ``group``, ``view``) and a ``source`` dict for the run's config.

Bring-your-own tables (CellProfiler, pixel baselines, ...) have one row per image and are joined
to the manifest's original views by file name (basename) or image id. Feature columns are the
numeric columns, minus ``--exclude`` and minus, by rule, identifiers and positions: names equal to
ImageNumber, ObjectNumber, label, donor, group, batch, plate, cell, row; names containing
Location, Center, Centroid or BoundingBox; names ending in _X, _Y or _Z.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tprobe.errors import TprobeError
from tprobe.store import FeatureStore

__all__ = ["FeatureSet", "from_store", "from_table", "feature_columns"]

META = ["image_id", "path", "label", "donor", "group", "view"]
_ID_NAMES = {"imagenumber", "objectnumber", "label", "donor", "group", "batch", "plate", "cell", "row"}
_POSITION = re.compile(r"location|center|centroid|boundingbox|_[xyz]$", re.IGNORECASE)


@dataclass
class FeatureSet:
    X: np.ndarray
    meta: pd.DataFrame
    source: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.get("name", "features")


def from_store(path: str | Path, pool: str = "cls") -> FeatureSet:
    """Pool a store's tokens (chunk by chunk) and attach its row-aligned manifest."""
    store = FeatureStore.open(path)
    manifest = pd.read_parquet(Path(path).parent / "manifest.parquet")
    if len(manifest) != store.n:
        raise TprobeError(f"{path}: manifest has {len(manifest)} rows, store {store.n}; re-extract")
    X = store.pooled(pool)
    a = store.attrs
    source = {"kind": "store", "store": str(path), "pool": pool, "model": a.get("model"),
              "model_id": a.get("model_id"), "model_source": a.get("model_source"), "resolved_revision": a.get("resolved_revision"),
              "model_random_init": a.get("model_random_init"),
              "preprocess_hash": a.get("preprocess_hash"), "preprocess": a.get("preprocess"),
              "dataset_fingerprint": a.get("dataset_fingerprint"), "dtype": a.get("dtype"),
              "format": store.format, "name": f"{Path(str(a.get('model'))).name}-{pool}"}  # fmt: skip
    return FeatureSet(X, manifest[META].reset_index(drop=True), source)


def feature_columns(table: pd.DataFrame, id_column: str, exclude=()) -> list[str]:
    """The numeric columns used as features under the documented exclusion rule."""
    drop = set(exclude) | {id_column}
    return [
        c for c in table.columns
        if c not in drop and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        and c.lower() not in _ID_NAMES and not _POSITION.search(c)
    ]  # fmt: skip


def from_table(path: str | Path, manifest: pd.DataFrame, *, id_column: str | None = None,
               exclude=()) -> FeatureSet:  # fmt: skip
    """Join a CSV/Parquet feature table to the manifest's kept original views."""
    path = Path(path)
    if not path.exists():
        raise TprobeError(f"{path}: no such feature table")
    table = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    if id_column is None:
        id_column = next((c for c in ("file", "filename", "FileName", "image", "path", "image_id")
                          if c in table.columns), None)  # fmt: skip
    if id_column not in table.columns:
        raise TprobeError(f"{path}: id column {id_column!r} not found; pass --id-column with one of "
                          f"{', '.join(map(str, table.columns[:10]))}")  # fmt: skip
    missing = [c for c in exclude if c not in table.columns]
    if missing:
        raise TprobeError(f"{path}: --exclude names unknown column(s) {missing}")
    cols = feature_columns(table, id_column, exclude)
    if not cols:
        raise TprobeError(f"{path}: no numeric feature columns left after the exclusion rule")
    orig = manifest[(manifest["kept"]) & (manifest["view"] == "orig")].reset_index(drop=True)
    ids = table[id_column].astype(str)
    if ids.isin(orig["image_id"]).any():
        key = orig["image_id"]
    else:
        ids = ids.map(lambda s: Path(s).name)
        key = orig["path"].map(lambda s: Path(s).name)
    if ids.duplicated().any():
        raise TprobeError(f"{path}: {id_column} has duplicate values, e.g. {ids[ids.duplicated()].iloc[0]}")
    lookup = pd.Series(np.arange(len(table)), index=ids.to_numpy())
    pos = key.map(lookup)
    if pos.isna().all():
        raise TprobeError(f"{path}: no {id_column} value matches a file name or image id of the data")
    meta = orig[pos.notna()].reset_index(drop=True)
    X = table[cols].to_numpy(np.float32)[pos.dropna().astype(int).to_numpy()]
    if np.isnan(X).any():
        raise TprobeError(f"{path}: feature columns contain NaN; fill or --exclude them")
    source = {"kind": "table", "table": str(path), "id_column": id_column, "columns": cols,
              "unmatched_images": int(pos.isna().sum()), "name": f"table:{path.stem}"}  # fmt: skip
    return FeatureSet(X, meta[META], source)
