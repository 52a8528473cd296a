"""Stores out to AnnData (.h5ad), Parquet and xarray, rows and provenance intact."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tprobe.cache.export import export, pools_of
from tprobe.cache.extract import extract, manifest_path
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, preprocess
from tprobe.errors import TprobeError
from tprobe.features.sources import from_store
from tprobe.models.backbones import resolve_model


def _store(model, data, cache, fmt="zarr", chunk_rows=8):
    pre = preprocess(discover(data), PreprocessConfig(views="orig"), progress=False)
    return extract(
        pre,
        resolve_model(str(model)),
        cache=cache,
        fmt=fmt,
        chunk_rows=chunk_rows,
        progress=False,
        device="cpu",
    ).path


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_h5ad_holds_manifest_pools_and_provenance(tiny_reg, small_data, tmp_path, fmt):
    # hdf5 with fewer rows than --chunk-rows: the store is still written (chunks clipped to the rows)
    path = _store(tiny_reg, small_data, tmp_path / "c", fmt, chunk_rows=64)
    r = CliRunner().invoke(main, ["export", str(path), "--to", "anndata", str(tmp_path / "cells.h5ad")])
    assert r.exit_code == 0, r.output
    store = FeatureStore.open(path)
    manifest = pd.read_parquet(manifest_path(path))
    with h5py.File(tmp_path / "cells.h5ad", "r") as f:  # the AnnData on-disk format, read without anndata
        assert f.attrs["encoding-type"] == "anndata"
        obs = f["obs"]
        assert obs.attrs["_index"] == "image_id"
        assert obs["image_id"].asstr()[:].tolist() == store.row_ids().tolist()
        assert list(obs.attrs["column-order"]) == [c for c in manifest.columns if c != "image_id"]
        assert obs["donor"].asstr()[:].tolist() == manifest["donor"].tolist()
        np.testing.assert_array_equal(obs["label"][:], manifest["label"].to_numpy())
        assert sorted(f["obsm"]) == ["X_cls", "X_cls_mean", "X_mean", "X_registers"]
        for key, pool in [
            ("X_cls", "cls"),
            ("X_mean", "mean"),
            ("X_registers", "registers"),
            ("X_cls_mean", "cls+mean"),
        ]:
            np.testing.assert_array_equal(f["obsm"][key][:], from_store(path, pool).X)
        uns = f["uns"]["tprobe"]
        assert bool(uns["model_random_init"][()]) is True
        assert uns["rows_hash"].asstr()[()] == store.attrs["rows_hash"]
        assert uns["resolved_revision"].asstr()[()] == store.attrs["resolved_revision"]
        assert int(uns["preprocess"]["canvas"][()]) == 140


def test_anndata_round_trip(tiny_reg, small_data, tmp_path):
    ad = pytest.importorskip("anndata")
    path = _store(tiny_reg, small_data, tmp_path / "c")
    a = ad.read_h5ad(export(path, "anndata", tmp_path / "cells.h5ad"))
    assert a.obs_names.tolist() == FeatureStore.open(path).row_ids().tolist()
    fs = from_store(path, "cls")
    np.testing.assert_array_equal(a.obsm["X_cls"], fs.X)
    np.testing.assert_array_equal(a.obsm["X_cls_mean"], from_store(path, "cls+mean").X)
    assert a.obs["donor"].tolist() == fs.meta["donor"].tolist()
    assert a.obs["label"].tolist() == fs.meta["label"].tolist()
    assert a.uns["tprobe"]["model_random_init"] and a.uns["tprobe"]["pools"]["X_cls_mean"] == "cls+mean"


def test_parquet_has_manifest_and_one_list_column_per_pool(tiny_plain, small_data, tmp_path):
    import pyarrow.parquet as pq

    path = _store(tiny_plain, small_data, tmp_path / "c")
    assert pools_of(FeatureStore.open(path)) == ["cls", "mean", "cls+mean"]  # no registers, no register pool
    r = CliRunner().invoke(main, ["export", str(path), "--to", "parquet", str(tmp_path / "cells.parquet")])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "cells.parquet")
    manifest = pd.read_parquet(manifest_path(path))
    assert df.columns.tolist() == [*manifest.columns, "X_cls", "X_mean", "X_cls_mean"]
    assert df["image_id"].tolist() == manifest["image_id"].tolist()
    np.testing.assert_array_equal(np.stack(df["X_mean"]), from_store(path, "mean").X)
    assert np.stack(df["X_cls_mean"]).shape == (len(df), 64)
    meta = json.loads(pq.read_schema(tmp_path / "cells.parquet").metadata[b"tprobe"])
    assert (
        meta["model_random_init"] is True and meta["rows_hash"] == FeatureStore.open(path).attrs["rows_hash"]
    )


def test_xarray_opens_the_store_with_named_dims_and_row_ids(tiny_reg, small_data, tmp_path):
    xr = pytest.importorskip("xarray")
    path = _store(tiny_reg, small_data, tmp_path / "c")
    store = FeatureStore.open(path)
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["cls"].dims == ("rows", "hidden")
    assert ds["registers"].dims == ("rows", "register", "hidden")
    assert ds["patches"].dims == ("rows", "patch", "hidden")
    assert dict(ds.sizes) == {"rows": store.n, "register": 4, "patch": 100, "hidden": 32}
    assert sorted(ds.data_vars) == ["cls", "patches", "registers"]
    assert ds["row_ids"].values.tolist() == store.row_ids().tolist()
    assert "row_ids" in ds["cls"].coords  # each row's image_id travels with the tokens
    np.testing.assert_array_equal(ds["patches"].values, store.read("patches"))
    one = ds.swap_dims(rows="row_ids").sel(row_ids=store.row_ids()[3])
    np.testing.assert_array_equal(one["cls"].values, store.read("cls")[3])
    np.testing.assert_allclose(
        ds["patches"].astype("float32").mean("patch").values, store.pooled("mean"), rtol=1e-6
    )
    assert ds.attrs["model_random_init"] is True


def test_export_refuses_what_it_cannot_write(tiny_reg, small_data, tmp_path):
    path = _store(tiny_reg, small_data, tmp_path / "c")
    with pytest.raises(TprobeError, match="--to 'csv' is not one of anndata, parquet"):
        export(path, "csv", tmp_path / "x.csv")
    manifest_path(path).rename(tmp_path / "moved.parquet")
    r = CliRunner().invoke(main, ["export", str(path), "--to", "parquet", str(tmp_path / "x.parquet")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "manifest" in r.output
    assert not (tmp_path / "x.parquet").exists()
