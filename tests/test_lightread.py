"""`tprobe status` without pandas or zarr (issue 20): the light readers give what pandas and zarr give, or
None (and the caller asks pandas / zarr); status reports the same lines either way, damaged stores included."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner
from conftest import copy_subset

import tprobe.cache.store as store_mod
from tprobe.cache.extract import extract
from tprobe.cache.lightread import group_attributes, manifest_keys, string_array
from tprobe.cache.store import FeatureStore, manifest_hash, manifest_path
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.models.backbones import resolve_model

N = 6


def _col(kind: str) -> pd.Series:
    """A manifest column of ``kind`` (N rows)."""
    i = np.arange(N)
    make = {
        "int64": lambda: pd.Series(i, dtype="int64"),
        "int8": lambda: pd.Series(i - 3, dtype="int8"),
        "uint64": lambda: pd.Series(np.uint64(2**63) + i.astype(np.uint64), dtype="uint64"),
        "int32": lambda: pd.Series(i * 1000, dtype="int32"),
        "bool": lambda: pd.Series(i % 2 == 0),
        "str": lambda: pd.Series([f"img_{k}" for k in i]),
        "object": lambda: pd.Series([f"dönor {k} ✓" for k in i], dtype=object),
        "string_pyarrow": lambda: pd.Series([f"v{k}" for k in i], dtype="string[pyarrow]"),
        "string_python": lambda: pd.Series([f"w{k}\t" for k in i], dtype="string[python]"),
        "empty_str": lambda: pd.Series(["" if k % 2 else "x" for k in i]),
        # not provably pandas' formatting: left to pandas
        "Int64": lambda: pd.Series(i, dtype="Int64"),
        "Int64_na": lambda: pd.Series([*i[:-1], None], dtype="Int64"),
        "int_na": lambda: pd.Series([*i[:-1].astype(float), np.nan]),  # pandas: float, "1.0", "nan"
        "float": lambda: pd.Series(i / 4),
        "float_int": lambda: pd.Series(i.astype(float)),
        "float32": lambda: pd.Series((i / 3).astype(np.float32)),
        "bool_na": lambda: pd.Series([True, None, *([False] * (N - 2))], dtype="boolean"),
        "boolean": lambda: pd.Series(i % 2 == 1, dtype="boolean"),
        "str_na": lambda: pd.Series(["a", None, *[f"s{k}" for k in i[2:]]]),
        "object_na": lambda: pd.Series(["a", None, *[f"s{k}" for k in i[2:]]], dtype=object),
        "category": lambda: pd.Series([f"c{k % 2}" for k in i], dtype="category"),
        "category_int": lambda: pd.Series(i % 2, dtype="category"),
        "datetime": lambda: pd.Series(pd.date_range("2024-01-01", periods=N)),
        "bytes": lambda: pd.Series([f"b{k}".encode() for k in i], dtype=object),
    }
    return make[kind]()


FAST_KINDS = [  # the dtypes whose key columns pyarrow reads as pandas does
    "int64",
    "int8",
    "uint64",
    "int32",
    "bool",
    "str",
    "object",
    "string_pyarrow",
    "string_python",
    "empty_str",
]
FAST = set(FAST_KINDS)


def _lines(m) -> list[str]:
    """What :func:`manifest_hash` hashes, line by line, and the ids :meth:`FeatureStore.verify_rows` compares."""
    ids = m["image_id"].tolist() if hasattr(m["image_id"], "tolist") else m["image_id"]
    return [f"{i}\t{lab}\t{d}" for i, lab, d in zip(m["image_id"], m["label"], m["donor"], strict=True)] + [
        str(i) for i in ids
    ]


def _check(path: Path, expect_fast: bool | None) -> None:
    """pyarrow's values are pandas' (``expect_fast``: they are given; False: left to pandas; None: either)."""
    ref = pd.read_parquet(path)
    fast = manifest_keys(path)
    assert expect_fast is None or (fast is not None) == expect_fast, (path.name, ref.dtypes.to_dict())
    if fast is not None:
        assert _lines(fast) == _lines(ref), path.name
        assert manifest_hash(fast) == manifest_hash(ref), path.name


def _frame(image_id: str, label: str, donor: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"p/{k}.png" for k in range(N)],
            "image_id": _col(image_id),
            "label": _col(label),
            "donor": _col(donor),
            "entropy": [
                np.nan,
                *np.linspace(0, 1, N - 1),
            ],  # other columns: floats with NaN, an int with nulls
            "plate": pd.Series([1.0, None, *range(N - 2)]),
            "kept": True,
        }
    )


KINDS = [
    *FAST_KINDS,
    "Int64",
    "Int64_na",
    "int_na",
    "float",
    "float_int",
    "float32",
    "bool_na",
    "boolean",
    "str_na",
    "object_na",
    "category",
    "category_int",
    "datetime",
    "bytes",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("column", ["image_id", "label", "donor"])
def test_manifest_keys_are_pandas_values_or_none_for_every_dtype(tmp_path, kind, column):
    """Each dtype in each key column (the others plain), written by pandas with and without its index
    and by pyarrow without pandas' metadata: pyarrow's values where they format as pandas' do, else None."""
    cols = {"image_id": "str", "label": "int64", "donor": "str", column: kind}
    m = _frame(cols["image_id"], cols["label"], cols["donor"])
    m.to_parquet(tmp_path / "plain.parquet", index=False)
    _check(tmp_path / "plain.parquet", kind in FAST)
    m.to_parquet(tmp_path / "index.parquet")  # a RangeIndex in pandas' metadata: left to pandas
    _check(tmp_path / "index.parquet", False)
    table = pa.Table.from_pandas(m, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "arrow.parquet")
    _check(
        tmp_path / "arrow.parquet", True if kind in FAST else None
    )  # no dtype metadata: e.g. Int64 is int64


def test_manifest_keys_over_combinations_of_the_fast_dtypes(tmp_path):
    kinds = ["int64", "uint64", "bool", "str", "object", "string_pyarrow"]
    for n, (a, b, c) in enumerate(itertools.product(kinds, repeat=3)):
        path = tmp_path / f"{n}.parquet"
        _frame(a, b, c).to_parquet(path, index=False)
        _check(path, True)


def test_manifest_keys_leave_odd_files_to_pandas(tmp_path):
    m = _frame("str", "int64", "str")
    m.drop(columns="donor").to_parquet(tmp_path / "no_donor.parquet", index=False)
    assert manifest_keys(tmp_path / "no_donor.parquet") is None
    m.assign(when=_col("datetime")).to_parquet(tmp_path / "other.parquet", index=False)
    assert manifest_keys(tmp_path / "other.parquet") is None  # another column of a type not checked
    m.attrs = {"note": "x"}
    m.to_parquet(tmp_path / "attrs.parquet", index=False)
    _check(
        tmp_path / "attrs.parquet", False
    )  # DataFrame.attrs (PANDAS_ATTRS, which pandas parses): to pandas
    table = pa.Table.from_pandas(m, preserve_index=False)
    dup = pa.table(
        [table["image_id"], table["label"], table["donor"], table["donor"]], names=[*"abc", "donor"]
    )
    pq.write_table(dup.rename_columns(["image_id", "label", "donor", "donor"]), tmp_path / "dup.parquet")
    assert manifest_keys(tmp_path / "dup.parquet") is None
    renamed = json.loads(table.schema.metadata[b"pandas"])
    renamed["columns"][1]["name"] = "label"  # pandas would call field "image_id" "label"
    pq.write_table(
        table.replace_schema_metadata({b"pandas": json.dumps(renamed).encode()}), tmp_path / "renamed.parquet"
    )
    assert manifest_keys(tmp_path / "renamed.parquet") is None
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not parquet")
    assert manifest_keys(tmp_path / "bad.parquet") is None
    assert manifest_keys(tmp_path / "missing.parquet") is None


# row ids: a one-chunk vlen-utf8 (+ zstd) string array ------------------------------------------------
IDS = [
    ["only"],
    ["a", "é", "日本語", "🙂", "", "tab\tand\nnewline"],
    [f"r{i:05d}_orig" for i in range(3000)],
    ["x" * 100_000, "y"],
]


@pytest.mark.parametrize("compressors", ["auto", None], ids=["zstd", "none"])
@pytest.mark.parametrize("ids", IDS, ids=["one", "unicode", "many", "long"])
def test_string_array_reads_what_zarr_reads(tmp_path, ids, compressors):
    path = tmp_path / "row_ids"
    arr = zarr.create_array(
        path,
        shape=(len(ids),),
        dtype=str,
        chunks=(len(ids),),
        compressors=compressors,
        dimension_names=("rows",),
    )
    arr[:] = np.asarray(ids, dtype=str)
    codecs = [c["name"] for c in json.loads((path / "zarr.json").read_text())["codecs"]]
    assert codecs == (["vlen-utf8", "zstd"] if compressors else ["vlen-utf8"])
    got = string_array(path)
    assert got is not None and got == zarr.open_array(path, mode="r")[:].tolist() == ids


def test_string_array_leaves_other_layouts_and_damage_to_zarr(tmp_path):
    ids = [f"r{i}" for i in range(10)]
    zarr.create_array(tmp_path / "two_chunks", shape=(10,), dtype=str, chunks=(5,))[:] = np.asarray(ids)
    zarr.create_array(tmp_path / "v2", shape=(10,), dtype=str, chunks=(10,), zarr_format=2)[:] = np.asarray(
        ids
    )
    zarr.create_array(tmp_path / "ints", shape=(10,), dtype="int64", chunks=(10,))[:] = np.arange(10)
    for name in ("two_chunks", "v2", "ints", "absent"):
        assert string_array(tmp_path / name) is None, name
    good = tmp_path / "good"
    zarr.create_array(good, shape=(10,), dtype=str, chunks=(10,))[:] = np.asarray(ids)
    assert string_array(good) == ids
    chunk = (good / "c" / "0").read_bytes()
    raw = zarr.create_array(tmp_path / "raw", shape=(10,), dtype=str, chunks=(10,), compressors=None)
    raw[:] = np.asarray(ids)
    raw_chunk = (tmp_path / "raw" / "c" / "0").read_bytes()
    for i, (folder, data) in enumerate(
        [
            (good, chunk[: len(chunk) // 2]),  # truncated
            (good, b"garbage"),
            (tmp_path / "raw", raw_chunk[:-1]),  # an item cut short
            (tmp_path / "raw", raw_chunk + b"\x00"),  # bytes after the last item
            (tmp_path / "raw", raw_chunk.replace(b"r9", b"\xff9")),  # not UTF-8
        ]
    ):
        copy = tmp_path / f"damaged{i}"
        shutil.copytree(folder, copy)
        (copy / "c" / "0").write_bytes(data)
        assert string_array(copy) is None, i
    meta = json.loads((good / "zarr.json").read_text())
    for i, change in enumerate(
        [
            {"shape": [10.0]},
            {"fill_value": "x"},
            {"zarr_format": 3.0},
            {"dimension_names": [1]},
            {"codecs": [*meta["codecs"], {"name": "crc32c"}]},
            {
                "codecs": [
                    meta["codecs"][0],
                    {"name": "zstd", "configuration": {"level": 23, "checksum": False}},
                ]
            },
            {"storage_transformers": [{"name": "x"}]},
            {"extra": True},
        ]
    ):
        copy = tmp_path / f"meta{i}"
        shutil.copytree(good, copy)
        (copy / "zarr.json").write_text(json.dumps({**meta, **change}))
        assert string_array(copy) is None, change
    (good / "c" / "0").unlink()  # Zarr reads a missing chunk as the fill value
    assert string_array(good) is None


@pytest.mark.refuses("a row_ids chunk whose item count is damaged (refused before Zarr allocates it)")
@pytest.mark.parametrize("count", [11, 9, 0xF0000000])
def test_a_row_ids_chunk_whose_item_count_is_damaged_is_refused_without_zarr(tmp_path, monkeypatch, count):
    """A chunk of tprobe's layout that decodes but says another item count than the array's length:
    Zarr fails on it only after allocating that many items (30 GiB of object pointers for 0xF0000000:
    a MemoryError, or the process killed), so the light reader refuses it (ValueError) instead."""
    ids = [f"r{i}" for i in range(10)]
    store = FeatureStore.create(
        tmp_path / "s.zarr", row_ids=ids, hidden=2, registers=0, patches=1, chunk_rows=10, compression="none"
    )
    store.write_unit(0, {"cls": np.ones((10, 2)), "patches": np.ones((10, 1, 2))})
    assert store.finalize()
    chunk = store.path / "row_ids" / "c" / "0"
    from numcodecs.zstd import Zstd

    raw = bytes(Zstd().decode(chunk.read_bytes()))
    chunk.write_bytes(Zstd(level=0).encode(count.to_bytes(4, "little") + raw[4:]))
    with pytest.raises(ValueError, match="items"):
        string_array(store.path / "row_ids")
    monkeypatch.setattr(zarr, "open_array", lambda *a, **k: pytest.fail("zarr was asked"))
    with pytest.raises(TprobeError, match="row_ids array is missing or unreadable .*re-extract"):
        FeatureStore.open(store.path).row_ids()


def test_group_attributes_are_zarrs(tmp_path):
    g = zarr.open_group(tmp_path / "g.zarr", mode="w", attributes={"a": [1, 2.5, None], "b": {"c": "é"}})
    assert group_attributes(tmp_path / "g.zarr") == dict(zarr.open_group(tmp_path / "g.zarr", mode="r").attrs)
    g.create_array("x", shape=(2,), dtype="int8")
    assert group_attributes(tmp_path / "g.zarr" / "x") is None  # an array
    zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2, attributes={"a": 1})
    assert group_attributes(tmp_path / "v2.zarr") is None
    assert group_attributes(tmp_path / "missing.zarr") is None


# status: the same lines with and without the light readers ------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_reg) -> Path:
    data = copy_subset(tmp_path_factory.mktemp("light") / "data", per_class=3)
    pre = preprocess(discover(data))
    kw = dict(chunk_rows=8, batch_size=8, progress=False, check_disk=False)
    return extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path_factory.mktemp("lightstore"), **kw).path


def _edit_manifest(fn):
    def edit(store: Path) -> None:
        mpath = manifest_path(store)
        fn(pd.read_parquet(mpath)).to_parquet(mpath, index=False)

    return edit


def _chunk(fn):
    def edit(store: Path) -> None:
        path = store / "row_ids" / "c" / "0"
        path.write_bytes(fn(path.read_bytes()))

    return edit


def _flip(b: bytes) -> bytes:
    b = bytearray(b)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def _set(frame, **kw):
    frame = frame.copy()
    for col, (row, value) in kw.items():
        frame.loc[row, col] = value
    return frame


DAMAGE = {
    "intact": lambda s: None,
    "label edited": _edit_manifest(lambda m: _set(m, label=(3, 1 - m.loc[3, "label"]))),
    "donor edited": _edit_manifest(lambda m: _set(m, donor=(5, "donor_9"))),
    "rows reversed": _edit_manifest(lambda m: m.iloc[::-1]),
    "label nullable": _edit_manifest(lambda m: m.assign(label=m["label"].astype("Int64"))),
    "label float": _edit_manifest(lambda m: m.assign(label=m["label"].astype(float))),
    "donor category": _edit_manifest(lambda m: m.assign(donor=m["donor"].astype("category"))),
    "label text": _edit_manifest(lambda m: m.assign(label=m["label"].astype(str))),  # hashes as ints
    "label int8": _edit_manifest(lambda m: m.assign(label=m["label"].astype("int8"))),
    # pandas writes categories of integers as the integers (they read back as int64)
    "label int categories": _edit_manifest(lambda m: m.assign(label=m["label"].astype("category"))),
    "no donor": _edit_manifest(lambda m: m.drop(columns="donor")),
    "manifest missing": lambda s: manifest_path(s).unlink(),
    "manifest truncated": lambda s: manifest_path(s).write_bytes(manifest_path(s).read_bytes()[:100]),
    "row_ids truncated": _chunk(lambda b: b[: len(b) // 2]),
    "row_ids byte flipped": _chunk(_flip),
    "row_ids garbage": _chunk(lambda b: b"garbage"),
    "row_ids chunk missing": lambda s: (s / "row_ids" / "c" / "0").unlink(),
    "row_ids zarr.json missing": lambda s: (s / "row_ids" / "zarr.json").unlink(),
    "row_ids missing": lambda s: shutil.rmtree(s / "row_ids"),
    "group zarr.json missing": lambda s: (s / "zarr.json").unlink(),
    "group zarr.json broken": lambda s: (s / "zarr.json").write_text("{"),
    "tprobe_meta garbage": lambda s: zarr.open_group(s, mode="r+").attrs.update({"tprobe_meta": "x"}),
    "cls chunk missing": lambda s: (s / "cls" / "c" / "0" / "0").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_status_says_the_same_with_and_without_the_light_readers(tmp_path, built, damage, monkeypatch):
    outputs, answered = [], []
    for light in (True, False):
        store = tmp_path / str(light) / built.name
        shutil.copytree(built, store)
        shutil.copy(manifest_path(built), manifest_path(store))
        DAMAGE[damage](store)
        with monkeypatch.context() as m:
            for name in ("group_attributes", "string_array", "manifest_keys"):
                if light:  # note which light readers answered (not None)
                    fn = getattr(store_mod, name)
                    m.setattr(store_mod, name, lambda *a, fn=fn, name=name: _note(answered, name, fn(*a)))
                else:  # today's reading: pandas and zarr
                    m.setattr(store_mod, name, lambda *a: None)
            r = CliRunner().invoke(main, ["status", str(store)])
        outputs.append((r.exit_code, r.output.replace(str(tmp_path / str(light)), "<dir>")))
    assert outputs[0] == outputs[1]
    if damage in ("intact", "label int8", "label int categories"):
        assert outputs[0][0] == 0 and "ok: " in outputs[0][1]
    if damage == "label text":
        assert outputs[0][0] == 2 and "label column holds" in outputs[0][1], outputs[0][1]
        assert {"group_attributes", "string_array", "manifest_keys"} <= set(answered)


def _note(answered: list, name: str, value):
    if value is not None:
        answered.append(name)
    return value


def test_row_ids_of_stores_of_one_row_with_and_without_compression(tmp_path):
    for n, compression in ((1, "none"), (1, "zstd"), (5, "none"), (5, "lz4")):
        ids = [f"ïd-{k}" for k in range(n)]
        store = FeatureStore.create(
            tmp_path / f"{n}{compression}.zarr",
            row_ids=ids,
            hidden=4,
            registers=0,
            patches=2,
            chunk_rows=2,
            compression=compression,
        )
        for u in range(store.n_units):
            rows = store.unit_slice(u).stop - store.unit_slice(u).start
            store.write_unit(u, {"cls": np.ones((rows, 4)), "patches": np.ones((rows, 2, 4))})
        assert store.finalize()
        assert string_array(store.path / "row_ids") == ids
        opened = FeatureStore.open(store.path)
        assert opened.meta == dict(zarr.open_group(store.path, mode="r").attrs)["tprobe_meta"]
        assert opened.row_ids().tolist() == ids
