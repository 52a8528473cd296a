"""Feature matrices for the heads: pooled tokens from a store, or a user's own table.

A :class:`FeatureSet` is ``X (N, F) float32`` plus ``meta`` (one row per X row: ``image_id``,
``path``, ``label``, ``donor``, ``group``, ``view``) and a typed :class:`FeatureSource` that the run
record keeps. Rows from a store are verified against the store's own row ids.

Bring-your-own tables (CellProfiler, pixel baselines, ...) have one row per image and are joined
to the manifest's original views by image id, or by path: a value may be the file name, or any
trailing part of its path (``donor_1/activated/x.png``), and must name exactly one image — a file
name that several donors share is refused rather than guessed.

Feature columns (:func:`column_rule`) are the numeric columns, minus ``--drop-columns`` and minus, by
rule, identifiers and positions named as CellProfiler names them (with or without an object prefix
such as ``Cells_``): ``ImageNumber``, ``ObjectNumber``, ``Number_Object_Number``, ``Metadata_*``,
``FileName_*``, ``PathName_*``, ``URL_*``, ``Parent_*``, ``Children_*``, ``Group_Index``,
``Group_Number``, ``Group_Length``, ``Series_*``, ``Frame_*``, ``TrackObjects_Label_*``, any name
holding ``ImageNumber`` or ``ObjectNumber`` (``Neighbors_FirstClosestObjectNumber_5``,
``TrackObjects_ParentImageNumber_50``), the pipeline's ``ExecutionTime_*`` and ``ModuleError_*``;
pandas' row index as written to a CSV (``Unnamed: 0``, ``index``, ``level_0``); the names label,
donor, group, batch, plate, cell, row; names containing Location, Center, Centroid or BoundingBox
(``*_Center_X``, ``Location_*``), or ending in _X, _Y or _Z. Non-numeric and boolean columns are
never features.
``--keep-columns`` overrides the identifier and position rule for the columns it names. Every
column left out is recorded with its reason (``FeatureSource.dropped_columns``).

Only table rows whose image passed the quality filters are scored; the rows left unused are
counted by class (``FeatureSource.unused_rows``). ``all_rows=True`` (``--all-table-rows``) scores
every table row that names an image of the data, filtered or not, except unreadable images (no id, no
donor group) and duplicates (another image's cell, which would be counted twice): those stay unused,
counted by class and by reason (``unused_rows["not_scorable"]``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from tprobe.cache.store import FeatureStore, manifest_path, verified_manifest
from tprobe.data.dataset import table_rows
from tprobe.errors import TprobeError

__all__ = [
    "FeatureSet",
    "FeatureSource",
    "from_store",
    "store_meta",
    "verified_manifest",
    "store_source",
    "from_table",
    "feature_columns",
    "column_rule",
    "table_note",
    "read_table",
    "CLASS_NAMES",
    "NORMALIZE",
    "donor_center",
    "check_finite",
]

META = ["image_id", "path", "label", "donor", "group", "view"]
_ID_NAMES = {"label", "donor", "group", "batch", "plate", "cell", "row"}
# CellProfiler's bookkeeping columns, bare or after an object prefix (Cells_Number_Object_Number)
_IDENTIFIER = re.compile(
    r"imagenumber|objectnumber"  # also inside longer names: a neighbour's, a track parent's
    r"|(^|_)(number_object_number|group_index|group_number|group_length)$"
    r"|(^|_)(metadata|filename|pathname|url|parent|children|series|frame|executiontime|moduleerror)_"
    r"|(^|_)trackobjects_label_"
    r"|^(index|level_0|unnamed: \d+(\.\d+)?)$",  # pandas' row index, written by to_csv or reset_index
    re.IGNORECASE,
)
_POSITION = re.compile(r"location|center|centroid|boundingbox|_[xyz]$", re.IGNORECASE)
CLASS_NAMES = {1: "activated", 0: "quiescent"}
# --normalize: none (each head sees the features as given), standard (the head's in-fold
# standardisation; the default), donor-center (each donor centred on its own mean, then standard)
NORMALIZE = ("none", "standard", "donor-center")


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
    pixel_type: str | None = None  # the training images' raw pixel type (uint8, uint16); predict checks it
    table: str | None = None
    id_column: str | None = None
    columns: list | None = None
    dropped_columns: dict | None = None  # column -> why it is not a feature
    unmatched_images: int | None = None  # images of the data with no table row
    unused_rows: dict | None = None  # table rows not scored: {"filtered": {class: n}, "no_image": n}
    all_rows: bool | None = None  # --all-table-rows: rows of images the quality filters removed scored too
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


def store_source(store: FeatureStore, pool: str) -> FeatureSource:
    """The feature source of ``pool`` from ``store``, from its key attributes."""
    a = store.attrs
    return FeatureSource(
        kind="store",
        name=f"{Path(str(a.get('model'))).name}-{pool}",
        pool=pool,
        store=str(store.path),
        model=a.get("model"),
        model_source=a.get("model_source"),
        model_id=a.get("model_id"),
        resolved_revision=a.get("resolved_revision"),
        random_init=bool(a.get("model_random_init", False)),
        precision=a.get("precision"),
        dtype=a.get("dtype"),
        format=store.format,
        rows_hash=a.get("rows_hash"),
        preprocess=a.get("preprocess"),
        preprocess_hash=a.get("preprocess_hash"),
        dataset_fingerprint=a.get("dataset_fingerprint"),
        pixel_type=a.get("pixel_type"),
        image_mean=a.get("image_mean"),
        image_std=a.get("image_std"),
    )


def from_store(path: str | Path, pool: str = "cls", *, manifest: pd.DataFrame | None = None) -> FeatureSet:
    """Pool a store's tokens (chunk by chunk) with its manifest, verifying row identity
    (:func:`verified_manifest`)."""
    store = FeatureStore.open(path)
    meta = store_meta(store, manifest)
    return FeatureSet(check_finite(store, pool, store.pooled(pool), meta), meta, store_source(store, pool))


def check_finite(store: FeatureStore, pool: str, X: np.ndarray, meta: pd.DataFrame, block: int = 4096):
    """``X`` (a store's ``pool`` features), or one line when a row holds NaN or infinity: tokens that
    overflowed (float16 storage or fp16 compute) would reach the heads (XGBoost scores NaN as a missing
    value; the others stop on scikit-learn's ValueError). Read ``block`` rows at a time."""
    bad = np.concatenate(
        [np.empty(0, bool)] + [~np.isfinite(X[lo : lo + block]).all(axis=1) for lo in range(0, len(X), block)]
    )
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise TprobeError(
            f"{store.path}: {int(bad.sum())} of {len(X)} rows have NaN or infinite {pool} features (first: "
            f"row {first}, {meta['image_id'].iloc[first]}): the model's output overflowed; re-extract with "
            "--precision fp32 --dtype float32"
        )
    return X


def store_meta(store: FeatureStore, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """The :data:`META` columns of the store's verified manifest (:func:`verified_manifest`; ``manifest``
    defaults to the store's own), one row per store row; a manifest without one of them is one line."""
    given = manifest is not None
    manifest = verified_manifest(store, manifest)
    missing = [c for c in META if c not in manifest.columns]
    if missing:
        source = "the manifest given" if given else manifest_path(store.path).name
        raise TprobeError(
            f"{store.path}: {source} has no {', '.join(missing)} column; use the store's own manifest "
            "(restore it if edited) or re-extract"
        )
    return manifest[META].reset_index(drop=True)


def column_rule(table: pd.DataFrame, id_column: str, exclude=(), keep=()) -> tuple[list[str], dict[str, str]]:
    """``(feature columns, {dropped column: reason})`` under the documented rule (module docstring).

    ``exclude`` (``--drop-columns``) drops more; ``keep`` (``--keep-columns``) keeps columns the
    identifier and position rule would drop. Unknown names, and a kept column that cannot be a
    feature, are one-line errors.
    """
    for option, names in (("--drop-columns", exclude), ("--keep-columns", keep)):
        missing = [c for c in names if c not in table.columns]
        if missing:
            raise TprobeError(
                f"{option} names unknown column(s) {missing}; the table has "
                f"{', '.join(map(str, table.columns[:10]))}"
            )
    cols, dropped = [], {}
    for c in table.columns:
        name = str(c)
        numeric = pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        if c == id_column:
            why = "id column"
        elif c in exclude:
            why = "--drop-columns"
        elif not numeric:
            why = "boolean" if pd.api.types.is_bool_dtype(table[c]) else "non-numeric"
            if c in keep:
                raise TprobeError(f"--keep-columns {name}: the column is {why}, it cannot be a feature")
        elif c in keep:
            why = None
        elif name.lower() in _ID_NAMES or _IDENTIFIER.search(name):
            why = "identifier (CellProfiler naming); --keep-columns keeps it"
        elif _POSITION.search(name):
            why = "position; --keep-columns keeps it"
        else:
            why = None
        if why is None:
            cols.append(c)
        else:
            dropped[name] = why
    return cols, dropped


def feature_columns(table: pd.DataFrame, id_column: str, exclude=(), keep=()) -> list[str]:
    """The numeric columns used as features under the documented exclusion rule (:func:`column_rule`)."""
    return column_rule(table, id_column, exclude, keep)[0]


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
        later = int(np.flatnonzero(ids.duplicated().to_numpy())[0])
        first = int(np.flatnonzero((ids == ids.iloc[later]).to_numpy())[0])
        raise TprobeError(
            f"{path}: {table_rows(path, first, later)} have the same {id_column} "
            f"{ids.iloc[later]!r}; keep one row per image"
        )


def _one_row_per_image(path: Path, id_column: str, ids: pd.Series, table_row: pd.Series, orig) -> None:
    """Two rows whose ids differ but name one image (``x.png`` and ``activated/x.png``) are refused."""
    first: dict[int, int] = {}
    for row, image in table_row[table_row >= 0].items():
        if image in first:
            raise TprobeError(
                f"{path}: {table_rows(path, first[image], row)} both name {orig['path'][image]} "
                f"({id_column} {ids.iloc[first[image]]!r} and {ids.iloc[row]!r}); keep one row "
                "per image"
            )
        first[image] = row


def from_table(
    path: str | Path,
    manifest: pd.DataFrame,
    *,
    id_column: str | None = None,
    exclude=(),
    keep=(),
    all_rows: bool = False,
) -> FeatureSet:
    """Join a CSV/Parquet feature table to the manifest's original views (one row per image).

    Rows are scored when their image passed the quality filters (``kept``), or with ``all_rows`` when
    it is any image of the data. ``exclude``/``keep``: see :func:`column_rule`. The source records
    the dropped columns and the table rows left unused, by class.
    """
    path = Path(path)
    table = read_table(path)
    if id_column is None:
        id_column = next(
            (c for c in ("file", "filename", "FileName", "image", "path", "image_id") if c in table.columns),
            None,
        )
    if id_column not in table.columns:
        raise TprobeError(
            f"{path}: id column {id_column!r} not found; pass --id-column with one of "
            f"{', '.join(map(str, table.columns[:10]))}"
        )
    try:
        cols, dropped = column_rule(table, id_column, exclude, keep)
    except TprobeError as exc:
        raise TprobeError(f"{path}: {exc}") from None
    if not cols:
        raise TprobeError(
            f"{path}: no numeric feature columns left after the exclusion rule "
            f"(dropped: {', '.join(list(dropped)[:6])}); --keep-columns keeps one"
        )
    orig = manifest[manifest["view"] == "orig"].reset_index(drop=True)  # every image, filtered or not
    ids = table[id_column].astype(str)
    named = orig["image_id"] != ""  # unreadable images have no id (several of them: not a unique key)
    if ids.isin(orig.loc[named, "image_id"]).any():
        _no_duplicates(path, id_column, ids)
        image_of = ids.map(pd.Series(np.flatnonzero(named), index=orig.loc[named, "image_id"].to_numpy()))
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
        image_of = pd.Series([r[0] if r else np.nan for r in rows], index=table.index, dtype=float)
    image_of = image_of.reset_index(drop=True)  # table row -> its image's row in orig (NaN: none)
    _one_row_per_image(path, id_column, ids.reset_index(drop=True), image_of.fillna(-1).astype(int), orig)
    if image_of.isna().all():
        raise TprobeError(f"{path}: no {id_column} value matches a file name or image id of the data")
    # an unreadable image has no id or group, a duplicate is another image's cell: never scored, even with
    # all_rows (counted as filtered, with their reasons in unused_rows["not_scorable"])
    never = _not_scorable(orig)
    kept = orig["kept"].to_numpy(bool) | (all_rows & (never == ""))
    hit = image_of.dropna().astype(int)  # table row -> image row
    used = hit[kept[hit.to_numpy()]]
    if not len(used):
        raise TprobeError(
            f"{path}: every row names an image the quality filters removed; pass --all-table-rows "
            "to score them anyway"
        )
    used = used.sort_values()  # in the manifest's order, as before
    meta = orig.iloc[used.to_numpy()].reset_index(drop=True)
    X = table[cols].to_numpy(np.float32)[used.index.to_numpy()]
    bad = ~np.isfinite(X)
    if bad.any():
        col = cols[int(np.flatnonzero(bad.any(0))[0])]
        raise TprobeError(
            f"{path}: feature column {col!r} holds NaN or infinite values; fill them or --drop-columns {col}"
        )
    _no_label_copy(path, cols, X, meta["label"].to_numpy())
    filtered = orig["label"].iloc[hit[~kept[hit.to_numpy()]].to_numpy()]
    unused = {
        "filtered": {
            CLASS_NAMES.get(int(k), str(k)): int(v)
            for k, v in filtered.value_counts().sort_index(ascending=False).items()
        },
        "no_image": int(image_of.isna().sum()),
    }
    reasons = pd.Series(never[hit.to_numpy()]).value_counts()
    if all_rows and (reasons.index != "").any():
        unused["not_scorable"] = {str(k): int(v) for k, v in reasons.items() if k}
    has_row = np.zeros(len(orig), bool)
    has_row[hit.to_numpy()] = True
    name = f"table:{path.stem}" + ("+all-rows" if all_rows else "")  # both cell counts can be reported
    source = FeatureSource(
        kind="table",
        name=name,
        table=str(path),
        id_column=id_column,
        columns=cols,
        dropped_columns=dropped,
        unmatched_images=int((kept & ~has_row).sum()),
        unused_rows=unused,
        all_rows=bool(all_rows),
    )
    return FeatureSet(X, meta[META], source)


def _not_scorable(orig: pd.DataFrame) -> np.ndarray:
    """Per original image: ``"unreadable"`` (no id, no group), ``"duplicate"`` (the same bytes as an earlier
    image: scoring it would count one cell twice) or ``""``."""
    ids = orig["image_id"].astype(str)
    if "drop_reason" in orig.columns:
        reason = orig["drop_reason"].fillna("").astype(str)
    else:  # a manifest saved without it: the ids tell (preprocess: "" unreadable, "<source>_dup<n>")
        reason = pd.Series(np.where(ids.str.contains(r"_dup\d+$"), "duplicate", ""), index=orig.index)
    reason = reason.where(reason.isin(["unreadable", "duplicate"]), "")
    return np.where(ids == "", "unreadable", reason.to_numpy(str)).astype(object)


def _no_label_copy(path: Path, cols: list, X: np.ndarray, labels: np.ndarray) -> None:
    """A feature column that is the label in every scored row (``activated`` 0/1, ``class`` = 1 - label,
    ``y`` 1/2: two values, one per class) is one line: the probe would read the answer."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) != 2:
        return
    one, zero = X[labels == 1], X[labels == 0]  # per class, every column at once (no sort per column)
    hit = (one.min(0) == one.max(0)) & (zero.min(0) == zero.max(0)) & (one[0] != zero[0])
    if hit.any():
        j = int(np.flatnonzero(hit)[0])
        col = cols[j]
        raise TprobeError(
            f"{path}: column {str(col)!r} is the label ({one[0, j]:g} for every activated cell, "
            f"{zero[0, j]:g} for every quiescent one), not a feature; drop it from the table or pass "
            f"--drop-columns {col}"
        )


def table_note(source: FeatureSource) -> list[str]:
    """The console lines about a table source: columns dropped, table rows left unused."""
    lines = []
    dropped = source.dropped_columns or {}
    if dropped:
        kinds = sorted({why.split(";")[0].split(" (")[0] for why in dropped.values()})
        lines.append(
            f"{source.name}: {len(source.columns or [])} feature columns; {len(dropped)} column(s) dropped "
            f"({', '.join(kinds)}); each with its reason in features.dropped_columns"
        )
    unused = source.unused_rows or {}
    filtered = unused.get("filtered") or {}
    n_filtered, no_image = sum(filtered.values()), unused.get("no_image", 0)
    if n_filtered or no_image:
        by_class = ", ".join(f"{n} {c}" for c, n in filtered.items())
        never = unused.get("not_scorable") or {}
        if source.all_rows:  # only unreadable and duplicate images are left out then
            why = ", ".join(f"{n} {r}" for r, n in never.items())
            what = f"name unreadable or duplicate images ({by_class}; {why}), never scored"
        else:
            what = f"name images the quality filters removed ({by_class}; --all-table-rows scores them)"
        parts = [f"{n_filtered} {what}"] if n_filtered else []
        parts += [f"{no_image} name no image of the data"] if no_image else []
        lines.append(f"{source.name}: {n_filtered + no_image} table rows unused: {'; '.join(parts)}")
    return lines


def donor_center(X: np.ndarray, donors, rows: np.ndarray | None = None) -> np.ndarray:
    """Each row minus the mean of its own donor's rows (``--normalize donor-center``).

    ``rows`` (a boolean mask, e.g. the original views) selects the rows each donor's mean is taken
    over; every row of the donor is centred on it. The result for a donor's rows depends on that
    donor's rows alone and on no label, so it cannot carry information across a donor-held-out
    split: a donor is never on both sides of a fold, hence centring once before the splits gives
    exactly what centring inside every fold would (each training donor on its own mean, the held-out
    donor on its own). Label-free is not free of assumptions: the held-out donor is centred on its
    own cells, which is transductive (all of a new donor's cells must be at hand, unlabelled, before
    any is scored), and a donor's mean moves with its class mix, so part of the activation signal is
    subtracted from donors with many activated cells.
    """
    X = np.asarray(X)
    donors = np.asarray(donors).astype(str)
    use = np.ones(len(X), bool) if rows is None else np.asarray(rows, bool)
    out = np.empty(X.shape, np.float32)
    for d in np.unique(donors):
        mine = donors == d
        base = mine & use if (mine & use).any() else mine
        out[mine] = X[mine] - X[base].mean(axis=0, dtype=np.float64).astype(np.float32)
    return out
