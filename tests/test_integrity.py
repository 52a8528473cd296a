"""Store integrity (issue 18): missing and altered chunks, edited manifests, stale locks, kill leftovers,
fsync coverage, and a fuzz test over kill points in extract and sealing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.backbones import resolve_model
from tprobe.cli import main
from tprobe.dataset import discover
from tprobe.errors import TprobeError
from tprobe.extract import extract, manifest_path
from tprobe.features import from_store
from tprobe.preprocess import preprocess
from tprobe.store import FeatureStore

KW = dict(chunk_rows=8, batch_size=8, progress=False, check_disk=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return copy_subset(tmp_path_factory.mktemp("integrity") / "data", per_class=3)  # 12 images, 2 units


@pytest.fixture(scope="module")
def pre(data):
    return preprocess(discover(data))


@pytest.fixture(scope="module")
def ref(tiny_reg):
    return resolve_model(str(tiny_reg))


@pytest.fixture(scope="module")
def built(tmp_path_factory, pre, ref) -> dict[str, Path]:
    """One uninterrupted store per format, copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("built")
    return {fmt: extract(pre, ref, cache=root / fmt, fmt=fmt, **KW).path for fmt in ("zarr", "hdf5")}


def _copy(store: Path, dst: Path) -> Path:
    """A copy of a store with its manifest, under ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if store.is_dir() else shutil.copy)(store, dst / store.name)
    shutil.copy(manifest_path(store), manifest_path(dst / store.name))
    return dst / store.name


def _one_line_exit_2(r):
    assert r.exit_code == 2, r.output
    assert "unexpected" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under (or beside, for the store's own names) ``root``'s folder, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# 1: a deleted Zarr chunk reads as zeros ----------------------------------------------------------
def test_a_deleted_zarr_chunk_is_refused_by_status_and_readers(tmp_path, built):
    store = _copy(built["zarr"], tmp_path)
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 0 and "chunks check" in r.output and "ok: " in r.output, r.output
    (store / "cls" / "c" / "1" / "0").unlink()
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 2 and "DAMAGED: chunk cls/c/1" in r.output, r.output
    with pytest.raises(TprobeError, match="chunk cls/c/1 is missing.*re-extract"):
        from_store(store, "cls")
    _one_line_exit_2(CliRunner().invoke(main, ["probe", "--store", str(store), "--bootstrap", "5", "--out",
                                               str(tmp_path / "runs")]))  # fmt: skip
    _one_line_exit_2(
        CliRunner().invoke(main, ["export", str(store), "--to", "parquet", str(tmp_path / "x.parquet")])
    )


def test_a_truncated_chunk_is_found_fast_and_an_altered_one_by_deep(tmp_path, built):
    store = _copy(built["zarr"], tmp_path)
    chunk = store / "patches" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    chunk.write_bytes(raw[:-7])  # truncated: the fast check sees the size
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 2 and "DAMAGED: chunk patches/c/0" in r.output, r.output
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # same size, altered bytes
    chunk.write_bytes(raw)
    assert CliRunner().invoke(main, ["status", str(store)]).exit_code == 0  # sizes agree
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 2 and "DAMAGED: unit 0 (rows 0-8)" in r.output, r.output
    assert "units re-hashed" in CliRunner().invoke(main, ["status", str(built["zarr"]), "--deep"]).output


def test_a_zeroed_hdf5_unit_is_found_by_deep(tmp_path, built, pre, ref):
    import h5py

    store = extract(pre, ref, cache=tmp_path / "c", fmt="hdf5", compression="none", **KW).path
    assert CliRunner().invoke(main, ["status", str(store), "--deep"]).exit_code == 0
    with h5py.File(store, "r") as f:
        info = f["cls"].id.get_chunk_info(1)  # unit 1's chunk of cls
    with open(store, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 2 and "DAMAGED: unit 1 " in r.output, r.output


def test_a_store_from_before_format_2_is_checked_for_existence_with_a_note(tmp_path, built):
    import zarr

    store = _copy(built["zarr"], tmp_path)
    group = zarr.open_group(store, mode="r+")
    meta = dict(group.attrs)["tprobe_meta"]
    del meta["units"], meta["store_version"]
    group.attrs["tprobe_meta"] = meta
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 0 and "not verifiable: written before store format 2" in r.output, r.output
    assert from_store(store, "cls").X.shape[0] == FeatureStore.open(store).n
    (store / "registers" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(TprobeError, match="chunk registers/c/0 is missing"):
        from_store(store, "registers")


def test_existence_check_is_fast_on_a_sample_sized_store(tmp_path):
    """The check runs on every open: measure it on a store of the sample's size (852 rows, chunks of 64)."""
    n = 852
    store = FeatureStore.create(tmp_path / "s.zarr", row_ids=[f"r{i}" for i in range(n)], hidden=8, registers=4,
                                patches=4, chunk_rows=64)  # fmt: skip
    for u in range(store.n_units):
        k = store.unit_slice(u).stop - store.unit_slice(u).start
        store.write_unit(
            u, {"cls": np.ones((k, 8)), "registers": np.ones((k, 4, 8)), "patches": np.ones((k, 4, 8))}
        )
    assert store.finalize()
    t0 = time.perf_counter()
    for _ in range(20):
        FeatureStore.open(store.path)
    per_open = (time.perf_counter() - t0) / 20
    print(f"open with the existence check of {store.n_units * 3} chunks: {per_open * 1e3:.1f} ms")
    assert per_open < 0.25


# status one-liners -----------------------------------------------------------------------------
def test_status_of_a_garbage_tprobe_meta_or_no_row_ids_is_one_line(tmp_path, built):
    import zarr

    store = _copy(built["zarr"], tmp_path / "a")
    zarr.open_group(store, mode="r+").attrs["tprobe_meta"] = "garbage"
    r = CliRunner().invoke(main, ["status", str(store)])
    _one_line_exit_2(r)
    assert "tprobe_meta" in r.output and "re-extract" in r.output
    store = _copy(built["zarr"], tmp_path / "b")
    shutil.rmtree(store / "row_ids")
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 0 and "NOT VERIFIED" in r.output and "row_ids" in r.output, r.output
    with pytest.raises(TprobeError, match="row_ids array is missing"):
        from_store(store, "cls")


# 4: labels edited in a store's manifest ---------------------------------------------------------
def test_an_edited_label_in_the_stores_manifest_is_refused_and_extract_restores_it(tmp_path, pre, ref):
    store = extract(pre, ref, cache=tmp_path / "c", **KW).path
    mpath = manifest_path(store)
    original = mpath.read_bytes()
    m = pd.read_parquet(mpath)
    m.loc[3, "label"] = 1 - m.loc[3, "label"]
    m.to_parquet(mpath, index=False)
    with pytest.raises(TprobeError, match="other labels or donors"):
        from_store(store, "cls")
    _one_line_exit_2(CliRunner().invoke(main, ["probe", "--store", str(store), "--bootstrap", "5", "--out",
                                               str(tmp_path / "runs")]))  # fmt: skip
    r = CliRunner().invoke(main, ["status", str(store)])
    assert "NOT VERIFIED" in r.output and "other labels" in r.output, r.output
    m.loc[3, "label"] = 1 - m.loc[3, "label"]
    m.loc[5, "donor"] = "donor_9"
    m.to_parquet(mpath, index=False)
    with pytest.raises(TprobeError, match="other labels or donors"):
        from_store(store, "cls")
    assert extract(pre, ref, cache=tmp_path / "c", **KW).status == "up to date"  # the same data restores it
    assert mpath.read_bytes() == original
    assert from_store(store, "cls").meta["label"].tolist() == pre.kept["label"].tolist()
