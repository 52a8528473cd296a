"""Read what ``tprobe status`` needs from a store without importing pandas or zarr (~0.5 s together).

Each reader takes its fast path only for the exact layout tprobe writes, where its result is provably
the one pandas or zarr gives, and returns None for anything else (or anything unexpected), so the caller
falls back to pandas / zarr and their own results and errors:

* :func:`group_attributes`: a Zarr v3 group's attributes, from its ``zarr.json`` as plain JSON (what
  ``zarr.open_group(path, mode="r").attrs`` parses it with).
* :func:`string_array`: a one-chunk Zarr v3 ``string`` array with codecs ``vlen-utf8`` (then ``zstd``),
  Zarr's defaults for ``dtype=str`` (the store's ``row_ids``), decoded as the Zarr v3 spec says; a chunk
  of that layout saying another item count is a ValueError (Zarr would allocate that many items first).
* :func:`manifest_keys`: a manifest's ``image_id``, ``label`` and ``donor`` columns read with pyarrow, as
  lists of the Python values that iterating ``pd.read_parquet(path)[column]`` gives (the same
  ``f"{v}"``), so :func:`tprobe.cache.store.manifest_hash` and the row check come out the same.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

__all__ = ["group_attributes", "string_array", "manifest_keys", "MANIFEST_KEYS"]

MANIFEST_KEYS = ("image_id", "label", "donor")


def _json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _is_int(v) -> bool:
    return type(v) is int


def group_attributes(path: Path) -> dict | None:
    """The attributes of the Zarr v3 group at ``path`` (``zarr.json``), or None to ask Zarr."""
    meta = _json(path / "zarr.json")
    if (
        not isinstance(meta, dict)
        or set(meta) != {"zarr_format", "node_type", "attributes"}
        or not _same(meta["zarr_format"], 3)
        or not _same(meta["node_type"], "group")
        or not isinstance(meta["attributes"], dict)
        or (path / ".zgroup").exists()  # Zarr warns of both formats (and takes v3)
    ):
        return None
    return meta["attributes"]


_ARRAY_KEYS = {
    "shape",
    "data_type",
    "chunk_grid",
    "chunk_key_encoding",
    "fill_value",
    "codecs",
    "attributes",
    "zarr_format",
    "node_type",
    "storage_transformers",
}  # and, optionally, "dimension_names"


def _same(a, b) -> bool:
    """JSON equality that tells 3 from 3.0 and 1 from true (Python's == does not)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _string_layout(meta) -> dict | None:
    """The zstd configuration (``{}`` when there is no zstd) of a one-chunk vlen-utf8 string array, or None."""
    if not isinstance(meta, dict) or set(meta) - {"dimension_names"} != _ARRAY_KEYS:
        return None
    shape, codecs, dims = meta["shape"], meta["codecs"], meta.get("dimension_names")
    if not (isinstance(shape, list) and len(shape) == 1 and _is_int(shape[0]) and shape[0] >= 1):
        return None
    ok = (
        _same(meta["zarr_format"], 3)
        and _same(meta["node_type"], "array")
        and _same(meta["data_type"], "string")
        and _same(meta["chunk_grid"], {"name": "regular", "configuration": {"chunk_shape": shape}})
        and _same(meta["chunk_key_encoding"], {"name": "default", "configuration": {"separator": "/"}})
        and _same(meta["fill_value"], "")
        and _same(meta["storage_transformers"], [])
        and isinstance(meta["attributes"], dict)
        and (dims is None or (isinstance(dims, list) and len(dims) == 1 and isinstance(dims[0], str | None)))
        and isinstance(codecs, list)
        and 1 <= len(codecs) <= 2
        and _same(codecs[0], {"name": "vlen-utf8", "configuration": {}})
    )
    if not ok:
        return None
    if len(codecs) == 1:
        return {}
    zstd = codecs[1]
    conf = zstd.get("configuration") if isinstance(zstd, dict) else None
    if (
        not isinstance(conf, dict)
        or set(zstd) != {"name", "configuration"}
        or not _same(zstd["name"], "zstd")
        or set(conf) != {"level", "checksum"}
        or not _is_int(conf["level"])
        or not 0 <= conf["level"] <= 22  # what Zarr's ZstdCodec accepts (it refuses 23 and above)
        or type(conf["checksum"]) is not bool
    ):
        return None
    return conf


def _vlen_utf8(data: bytes, n: int) -> list[str] | None:
    """Decode vlen-utf8 (uint32 LE item count, then per item a uint32 LE length and its UTF-8 bytes);
    None unless ``data`` holds exactly ``n`` well-formed items and nothing after them."""
    if len(data) < 4 or struct.unpack_from("<I", data, 0)[0] != n:
        return None
    out, pos, end = [], 4, len(data)
    for _ in range(n):
        if pos + 4 > end:
            return None
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if pos + size > end:
            return None
        try:
            out.append(data[pos : pos + size].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        pos += size
    return out if pos == end else None


def string_array(path: Path) -> list[str] | None:
    """The values of the Zarr v3 string array at ``path`` (one chunk, ``vlen-utf8`` then optionally
    ``zstd``: what ``zarr.create_array(dtype=str, chunks=shape)`` writes), or None to ask Zarr (another
    layout, a missing chunk, which Zarr reads as the fill value, or any chunk it may refuse).

    Raises ValueError for a chunk of this layout whose item count is not the array's length: Zarr
    refuses it as well, but allocates that many items first (a damaged count: tens of GiB, or the
    process killed), so it is not asked.
    """
    meta = _json(path / "zarr.json")
    conf = _string_layout(meta)
    if conf is None:
        return None
    try:
        data = (path / "c" / "0").read_bytes()
    except OSError:
        return None
    if conf:
        from numcodecs.zstd import Zstd  # as zarr's ZstdCodec decodes (~20 ms to import, zarr ~200 ms)

        try:
            data = bytes(Zstd(level=conf["level"], checksum=conf["checksum"]).decode(data))
        except Exception:  # noqa: BLE001 - Zarr decodes it again and fails its own way
            return None
    n = meta["shape"][0]
    said = struct.unpack_from("<I", data, 0)[0] if len(data) >= 4 else n
    if said != n:  # Zarr fails on it too, but only after allocating that many items (up to 2**32: 32 GiB)
        raise ValueError(f"its chunk says {said} items, the array holds {n} (a damaged chunk)")
    return _vlen_utf8(data, n)


# per kind of pyarrow column, the dtypes named in pandas' metadata (``numpy_type``) with which pandas
# converts it as it would without metadata: int64 & co., bool, object / str / StringDtype of str, float
_NUMPY_TYPES = {
    "int": {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "object"},
    "bool": {"bool", "object"},
    "string": {"object", "str", "string"},  # "string": StringDtype, whose values are str too
    "float": {"float32", "float64", "object"},  # not a key column: it only has to convert
}


def _kind(t) -> str | None:
    import pyarrow as pa

    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_float32(t) or pa.types.is_float64(t):
        return "float"
    return None


def _plain_pandas_metadata(schema) -> bool:
    """Whether the ``pandas`` schema metadata (if any) makes ``to_pandas`` keep every column's name and
    its default dtype: no index columns, one plain column index, no renamed or extension-typed column."""
    meta = schema.pandas_metadata  # raises on unparseable JSON: the caller falls back
    if meta is None:
        return True
    if (
        not isinstance(meta, dict)
        or meta.get("index_columns") != []
        or not isinstance(meta.get("attributes", {}), dict)  # pandas 3 sets DataFrame.attrs from it
    ):
        return False
    col_index = meta.get("column_indexes", [])
    if col_index != [] and not (
        isinstance(col_index, list)
        and len(col_index) == 1
        and isinstance(col_index[0], dict)
        and col_index[0].get("name") is None
        and col_index[0].get("pandas_type") == "unicode"
        and col_index[0].get("numpy_type") in ("object", "str")
    ):
        return False
    columns = meta.get("columns")
    if not isinstance(columns, list) or len(columns) != len(schema.names):
        return False
    for col, field in zip(columns, schema, strict=True):
        if not isinstance(col, dict) or col.get("metadata") is not None:
            return False
        if col.get("name") != field.name or col.get("field_name", col.get("name")) != field.name:
            return False
        kind = _kind(field.type)
        if kind is None or col.get("numpy_type") not in _NUMPY_TYPES[kind]:
            return False
    return True


def manifest_keys(path: Path) -> dict[str, list] | None:
    """``{"image_id": [...], "label": [...], "donor": [...]}`` of the manifest at ``path`` as
    ``pd.read_parquet(path)`` would give them, or None to ask pandas.

    Only for a manifest of plain columns (integers, floats, bools, strings; no extension types, no
    index in its pandas metadata) whose three key columns are integers, bools or strings without a
    null: pandas then gives, row for row, the Python int, bool or str that pyarrow does. Every column
    is read, as pandas reads them, so a file pandas could not read is left to pandas.
    """
    try:
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as f:  # pq.read_table would import pandas (via pyarrow.dataset)
            table = f.read()
        schema = table.schema
        if b"PANDAS_ATTRS" in (schema.metadata or {}):  # pandas parses it into DataFrame.attrs
            return None
        if len(set(schema.names)) != len(schema.names) or not _plain_pandas_metadata(schema):
            return None
        if any(_kind(f.type) is None for f in schema):
            return None
        out = {}
        for name in MANIFEST_KEYS:
            if name not in schema.names:
                return None
            col = table.column(name)
            if _kind(col.type) not in ("int", "bool", "string") or col.null_count:
                return None
            out[name] = col.to_pylist()
        return out
    except Exception:  # noqa: BLE001 - pandas reads it again and fails its own way
        return None
