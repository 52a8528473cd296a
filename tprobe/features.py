"""Feature matrices for the heads: pooled tokens from a store, or a user's own table.

A :class:`FeatureSet` is ``X (N, F) float32`` plus ``meta`` (one row per X row: ``image_id``,
``path``, ``label``, ``donor``, ``group``, ``view``) and a typed :class:`FeatureSource` that the run
record keeps. Rows from a store are verified against the store's own row ids.

Bring-your-own tables (CellProfiler, pixel baselines, ...) have one row per image and are joined
to the manifest's original views by image id, or by path: a value may be the file name, or any
trailing part of its path (``donor_1/activated/x.png``), and must name exactly one image — a file
name that several donors share is refused rather than guessed. Feature columns are the
numeric columns, minus ``--exclude`` and minus, by rule, identifiers and positions: names equal to
ImageNumber, ObjectNumber, label, donor, group, batch, plate, cell, row; names containing
Location, Center, Centroid or BoundingBox; names ending in _X, _Y or _Z.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from tprobe.errors import TprobeError
from tprobe.store import FeatureStore

__all__ = [
    "FeatureSet",
    "FeatureSource",
    "from_store",
    "verified_manifest",
    "store_source",
    "from_table",
    "feature_columns",
    "read_table",
]

META = ["image_id", "path", "label", "donor", "group", "view"]
_ID_NAMES = {"imagenumber", "objectnumber", "label", "donor", "group", "batch", "plate", "cell", "row"}
_POSITION = re.compile(r"location|center|centroid|boundingbox|_[xyz]$", re.IGNORECASE)


@dataclass
class FeatureSource:
    """Where a feature matrix came from: enough to rebuild it (``predict``) and to label results."""

    kind: str  # store | table | pixels | finetune | baseline
    name: str
    pool: str | None = None
    store: str | None = None
    model: str | None = None
    model_source: str | None = None
    model_id: str | None = None
    resolved_revision: str | None = None
    random_init: bool = False
    precision: str | None = None
    dtype: str | None = None
    format: str | None = None
    rows_hash: str | None = None
    preprocess: dict | None = None
    preprocess_hash: str | None = None
    dataset_fingerprint: str | None = None
    table: str | None = None
    id_column: str | None = None
    columns: list | None = None
    unmatched_images: int | None = None
    canvas: int | None = None
    image_mean: list | None = None  # the model's input normalisation (store key; predict checks it)
    image_std: list | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSource:
        known = {f.name for f in fields(cls)}
        d = {"kind": "store", "name": "features", **d}
        if d.get("model_random_init"):  # the store attribute's name, in records written before RunRecord
            d["random_init"] = True
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    def get(self, key: str, default=None):
        value = getattr(self, key, None)
        return default if value is None else value

    def __getitem__(self, key: str):
        return getattr(self, key)


@dataclass
class FeatureSet:
    X: np.ndarray
    meta: pd.DataFrame
    source: FeatureSource = field(default_factory=lambda: FeatureSource("table", "features"))

    def __post_init__(self):
        if isinstance(self.source, dict):
            self.source = FeatureSource.from_dict({"kind": "table", "name": "features", **self.source})

    @property
    def name(self) -> str:
        return self.source.name


def verified_manifest(store: FeatureStore, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The manifest of ``store``'s rows, row identity verified.

    ``manifest`` defaults to the store's own (``<store>.manifest.parquet``); any manifest given must
    list exactly the store's rows, in order, with the labels and donors it was extracted with, or this raises.
    """
    from tprobe.store import manifest_path  # not tprobe.extract: importing it loads torch (~1 s)

    source_name = "the manifest given"
    if manifest is None:
        mpath = manifest_path(store.path)
        if not mpath.exists():
            raise TprobeError(f"{store.path}: its manifest {mpath.name} is missing; re-extract the store")
        manifest, source_name = pd.read_parquet(mpath), mpath.name
    store.verify_manifest(manifest, source_name)
    return manifest


def store_source(store: FeatureStore, pool: str) -> FeatureSource:
    """The feature source of ``pool`` from ``store``, from its key attributes."""
    a = store.attrs
    return FeatureSource(
        kind="store", name=f"{Path(str(a.get('model'))).name}-{pool}", pool=pool, store=str(store.path),
        model=a.get("model"), model_source=a.get("model_source"), model_id=a.get("model_id"),
        resolved_revision=a.get("resolved_revision"), random_init=bool(a.get("model_random_init", False)),
        precision=a.get("precision"), dtype=a.get("dtype"), format=store.format, rows_hash=a.get("rows_hash"),
        preprocess=a.get("preprocess"), preprocess_hash=a.get("preprocess_hash"),
        dataset_fingerprint=a.get("dataset_fingerprint"), image_mean=a.get("image_mean"), image_std=a.get("image_std"),
    )  # fmt: skip


def from_store(path: str | Path, pool: str = "cls", *, manifest: pd.DataFrame | None = None) -> FeatureSet:
    """Pool a store's tokens (chunk by chunk) with its manifest, verifying row identity
    (:func:`verified_manifest`)."""
    store = FeatureStore.open(path)
    manifest = verified_manifest(store, manifest)
    return FeatureSet(store.pooled(pool), manifest[META].reset_index(drop=True), store_source(store, pool))


def feature_columns(table: pd.DataFrame, id_column: str, exclude=()) -> list[str]:
    """The numeric columns used as features under the documented exclusion rule."""
    drop = set(exclude) | {id_column}
    return [
        c for c in table.columns
        if c not in drop and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        and c.lower() not in _ID_NAMES and not _POSITION.search(c)
    ]  # fmt: skip


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet table; one-line errors for a missing, empty or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise TprobeError(f"{path}: no such table")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise TprobeError(
            f"{path}: the table is empty; it needs a header row and one row per image"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise TprobeError(
            f"{path}: cannot be read as a table ({type(exc).__name__}); save it as CSV or Parquet"
        ) from None


def _path_keys(paths: pd.Series) -> dict[str, list[int]]:
    """Every trailing part of every path (``x.png``, ``activated/x.png``, ...) -> the rows it names."""
    keys: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        parts = Path(p).as_posix().split("/")
        for k in range(1, len(parts) + 1):
            keys.setdefault("/".join(parts[-k:]), []).append(i)
    return keys


def _no_duplicates(path: Path, id_column: str, ids: pd.Series) -> None:
    if ids.duplicated().any():
        raise TprobeError(f"{path}: {id_column} has duplicate values, e.g. {ids[ids.duplicated()].iloc[0]}; "
                          "one row per image")  # fmt: skip


def from_table(path: str | Path, manifest: pd.DataFrame, *, id_column: str | None = None,
               exclude=()) -> FeatureSet:  # fmt: skip
    """Join a CSV/Parquet feature table to the manifest's kept original views (one row per image)."""
    path = Path(path)
    table = read_table(path)
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
        _no_duplicates(path, id_column, ids)
        pos = orig["image_id"].map(pd.Series(np.arange(len(table)), index=ids.to_numpy()))
    else:
        keys = _path_keys(orig["path"])
        norm = ids.map(lambda s: Path(s).as_posix().removeprefix("./"))
        rows = norm.map(lambda s: keys.get(s, []))
        ambiguous = norm[rows.map(len) > 1]
        if len(ambiguous):
            names = keys[ambiguous.iloc[0]]
            raise TprobeError(
                f"{path}: {id_column} value {ambiguous.iloc[0]!r} is not unique in the data ({len(names)} images, "
                f"e.g. {orig['path'][names[0]]} and {orig['path'][names[1]]}); put each image's relative path "
                f"(e.g. donor/class/file.png) or its image_id in {id_column}"
            )
        _no_duplicates(path, id_column, ids)
        table_row = pd.Series([r[0] if r else -1 for r in rows], index=np.arange(len(table)))
        pos = pd.Series(np.nan, index=orig.index)
        hit = table_row[table_row >= 0]
        pos.iloc[hit.to_numpy()] = hit.index.to_numpy()
    if pos.isna().all():
        raise TprobeError(f"{path}: no {id_column} value matches a file name or image id of the data")
    meta = orig[pos.notna()].reset_index(drop=True)
    X = table[cols].to_numpy(np.float32)[pos.dropna().astype(int).to_numpy()]
    bad = ~np.isfinite(X)
    if bad.any():
        col = cols[int(np.flatnonzero(bad.any(0))[0])]
        raise TprobeError(
            f"{path}: feature column {col!r} holds NaN or infinite values; fill them or --exclude {col}"
        )
    source = FeatureSource(kind="table", name=f"table:{path.stem}", table=str(path), id_column=id_column,
                           columns=cols, unmatched_images=int(pos.isna().sum()))  # fmt: skip
    return FeatureSet(X, meta[META], source)
