"""Export a store's pooled features to AnnData (``.h5ad``) and Parquet, for scverse, pandas, R and the rest.

Both exports take the store's own manifest (``<store>.manifest.parquet``, verified against the
store's ``row_ids``) as the per-row table, and one matrix per pooling the store can give
(:func:`pools_of`): ``cls``, ``mean`` (patch mean), ``registers`` (register mean) and ``cls+mean``; a
store of several layers (``--layers``) also ``cls@<layer>`` per stored layer (``X_cls_layer-4``) and
``last4``, with the layer indices in ``uns["tprobe"]["layers"]`` (the store's attributes).
``concat`` (every token, flattened) is left out: read the token arrays themselves for that.

- **AnnData**: ``obs`` = the manifest (index ``image_id``, in store order); ``obsm["X_<pool>"]``
  (``X_cls``, ``X_mean``, ``X_registers``, ``X_cls_mean``) float32; no ``X`` (``n_vars`` is 0: give
  scanpy ``use_rep="X_cls"``); ``uns["tprobe"]`` = the store's attributes (model, resolved revision,
  ``model_random_init``, preprocessing, rows hash, ...) plus ``store`` and ``pools``. The file is
  written with h5py following the AnnData on-disk format (anndata 0.8+ reads it), so exporting
  needs no anndata install.
- **Parquet**: the manifest columns, then one column per pooling named like the obsm keys
  (``X_cls`` ...), each a fixed-size list of float32 (one vector per row: ``np.stack(df["X_cls"])``);
  the store's attributes as JSON under the schema metadata key ``tprobe``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from tprobe.cache.keys import EXPORT_FORMATS, manifest_path, progress_dir
from tprobe.cache.store import FeatureStore, verified_manifest
from tprobe.errors import TprobeError
from tprobe.models.tokens import POOL_NEEDS, pool_needs

__all__ = [
    "EXPORT_FORMATS",
    "pools_of",
    "obsm_key",
    "store_table",
    "export_anndata",
    "export_parquet",
    "export",
    "check_target",
    "require_store",
]
EXPORT_POOLS = ("cls", "mean", "registers", "cls+mean")


def obsm_key(pool: str) -> str:
    """``cls`` -> ``X_cls``, ``cls+mean`` -> ``X_cls_mean``, ``cls@-4`` -> ``X_cls_layer-4`` (a key every tool accepts)."""
    return "X_" + pool.replace("+", "_").replace("@", "_layer")


def pools_of(store: FeatureStore) -> list[str]:
    """The poolings the store's token arrays can give (``registers`` only when it holds registers); a store
    with a layer axis adds ``cls@<layer>`` for each stored layer but -1 (that is ``cls``) and ``last4``."""
    held = set(store.shapes)
    pools = [p for p in EXPORT_POOLS if all(t in held for t in POOL_NEEDS[p])]
    if not store.layered:
        return pools
    pools += [p for p in store.layer_pools() if p != "cls@-1"] + ["last4"]
    return [p for p in pools if _gives(store, p)]


def _gives(store: FeatureStore, pool: str) -> bool:
    try:
        store.check_pool(pool)
    except TprobeError:
        return False
    return all(t in store.shapes for t in pool_needs(pool))


def store_table(path: str | Path) -> tuple[FeatureStore, pd.DataFrame, dict[str, np.ndarray]]:
    """The store, its own manifest (rows verified) and ``{pool: X (N, F) float32}`` for every exportable pool."""
    store = FeatureStore.open(path)
    manifest = verified_manifest(store)
    pools = pools_of(store)
    if not pools:
        raise TprobeError(
            f"{path}: holds {', '.join(store.shapes)} tokens, from which no pooling can be made"
        )
    return store, manifest.reset_index(drop=True), {p: store.pooled(p) for p in pools}


def check_target(store: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an export target that is the store, a file of the store (its manifest, progress folder),
    a folder, or (without ``overwrite``) any existing file; links are followed."""
    out, store = Path(out), Path(store)
    real = out.resolve()
    own = [store, manifest_path(store), progress_dir(store)]
    for p in own:
        rp = p.resolve()
        same = (
            real == rp
            or real.is_relative_to(rp)
            or (out.exists() and p.exists() and os.path.samefile(out, p))
        )
        if same:
            what = "the store itself" if p == store else f"the store's {p.name[len(store.name) + 1 :]}"
            raise TprobeError(f"{out}: is {what} ({store}); export to another path")
    if out.is_dir():
        raise TprobeError(f"{out}: is a folder; give a file path such as {out / 'cells.h5ad'}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise TprobeError(f"{out}: already exists; pass --overwrite to replace it, or choose another path")
    return out


def _write_target(out: Path, write) -> None:
    """Write ``out`` through a private temp file beside it (fsynced, renamed into place); on any failure
    the temp file is removed, and an unwritable target is one line."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TprobeError(
            f"{out}: cannot be written ({exc.strerror or type(exc).__name__}); choose a writable file path"
        ) from None
    finally:
        if tmp.is_file():
            tmp.unlink()


def _provenance(store: FeatureStore, path, pools) -> dict:
    attrs = {k: v for k, v in store.attrs.items() if k not in ("tprobe_meta", "complete")}
    return {
        **attrs,
        "store": str(Path(path).resolve()),
        "format": store.format,
        "pools": {obsm_key(p): p for p in pools},
    }


# ---- AnnData (h5ad written with h5py, after the AnnData on-disk format spec) ------------------------
def _enc(obj, kind: str, version: str):
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = version
    return obj


def _strings(group, name: str, values) -> None:
    import h5py

    data = np.asarray([str(v) for v in values], dtype=object)
    _enc(group.create_dataset(name, data=data, dtype=h5py.string_dtype()), "string-array", "0.2.0")


def _column(group, name: str, col: pd.Series) -> None:
    if pd.api.types.is_bool_dtype(col) and not col.isna().any():
        _enc(group.create_dataset(name, data=col.to_numpy(bool)), "array", "0.2.0")
    elif pd.api.types.is_numeric_dtype(col):
        _enc(group.create_dataset(name, data=col.to_numpy()), "array", "0.2.0")
    else:  # text (missing values as ""), the way a table tool reads it back
        _strings(group, name, col.astype(object).where(col.notna(), "").tolist())


def _dataframe(group, df: pd.DataFrame, index: list[str], index_name: str = "_index") -> None:
    import h5py

    _enc(group, "dataframe", "0.2.0")
    group.attrs["_index"] = index_name
    group.attrs.create("column-order", np.asarray(list(df.columns), dtype=object), dtype=h5py.string_dtype())
    _strings(group, index_name, index)
    for c in df.columns:
        _column(group, str(c), df[c])


def _value(group, name: str, value) -> None:
    """One uns entry: dicts as groups, strings and numbers as scalars, lists as arrays (JSON otherwise)."""
    import h5py

    if isinstance(value, dict):
        sub = _enc(group.create_group(name), "dict", "0.1.0")
        for k, v in value.items():
            _value(sub, str(k), v)
    elif isinstance(value, str):
        _enc(group.create_dataset(name, data=value, dtype=h5py.string_dtype()), "string", "0.2.0")
    elif isinstance(value, bool | int | float | np.number | np.bool_):
        _enc(group.create_dataset(name, data=np.asarray(value)), "numeric-scalar", "0.2.0")
    elif isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        _strings(group, name, value)
    elif isinstance(value, list | tuple) and value and all(isinstance(v, bool | int | float) for v in value):
        _enc(group.create_dataset(name, data=np.asarray(value)), "array", "0.2.0")
    elif value is not None:
        _value(group, name, json.dumps(value))


def export_anndata(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the store as an AnnData ``.h5ad``: obs = manifest, obsm = each pooling, uns = provenance.

    An existing ``out`` is replaced only with ``overwrite``; the store and its manifest never.
    """
    import h5py

    out = check_target(path, out, overwrite=overwrite)
    store, manifest, X = store_table(path)
    index = manifest["image_id"].astype(str).tolist()

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            _enc(f, "anndata", "0.1.0")
            _dataframe(f.create_group("obs"), manifest.drop(columns=["image_id"]), index, "image_id")
            _dataframe(f.create_group("var"), pd.DataFrame(index=[]), [])
            obsm = _enc(f.create_group("obsm"), "dict", "0.1.0")
            for pool, x in X.items():
                _enc(obsm.create_dataset(obsm_key(pool), data=x.astype(np.float32)), "array", "0.2.0")
            for empty in ("varm", "obsp", "varp", "layers"):
                _enc(f.create_group(empty), "dict", "0.1.0")
            uns = _enc(f.create_group("uns"), "dict", "0.1.0")
            _value(uns, "tprobe", _provenance(store, path, X))

    _write_target(out, write)
    return out


# ---- Parquet ----------------------------------------------------------------------------------------
def export_parquet(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the manifest plus one fixed-size-list float32 column per pooling; provenance in the metadata.

    An existing ``out`` is replaced only with ``overwrite``; the store and its manifest never.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = check_target(path, out, overwrite=overwrite)
    store, manifest, X = store_table(path)
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    for pool, x in X.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        table = table.append_column(obsm_key(pool), col)
    meta = {**(table.schema.metadata or {}), b"tprobe": json.dumps(_provenance(store, path, X)).encode()}
    table = table.replace_schema_metadata(meta)
    _write_target(out, lambda p: pq.write_table(table, p))
    return out


def require_store(path: str | Path) -> Path:
    """``path`` if it is a feature store (a Zarr folder or an ``.h5`` file, sealed or in progress); else one
    line saying it is not one and how to find the stores (the fix is the path, not re-extracting)."""
    path = Path(path)
    in_progress = progress_dir(path).exists()
    zarr_group = path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup"))
    hdf5 = path.is_file() and path.suffix in (".h5", ".hdf5")
    if not (in_progress or zarr_group or hdf5):
        what = "a folder" if path.is_dir() else "a file"
        raise TprobeError(
            f"{path}: is {what}, not a feature store (a .zarr folder or .h5 file `tprobe extract` "
            "writes; its path is the last line extract prints); list the stores with "
            "`find cache -name '*.zarr' -o -name '*.h5'`"
        )
    return path


def export(path: str | Path, to: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """``to`` = ``anndata`` (``.h5ad``) or ``parquet``; an existing ``out`` is replaced only with ``overwrite``."""
    if to not in EXPORT_FORMATS:
        raise TprobeError(f"--to {to!r} is not one of {', '.join(EXPORT_FORMATS)}")
    require_store(path)
    return (export_anndata if to == "anndata" else export_parquet)(path, out, overwrite=overwrite)
