"""Tokens from any layer (issue 21 section 3): `--layers`, the layer axis, cls@<layer>, last4, --pool layers."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.cache.extract import extract, manifest_path
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, load_view, preprocess
from tprobe.errors import TprobeError
from tprobe.models.backbones import Backbone, fit_canvas, parse_layers, resolve_model
from tprobe.testing import save_random_vit


@pytest.fixture(scope="module")
def deep_reg(tmp_path_factory):
    """A tiny DINOv2 with registers and 4 blocks (layers -1 to -4, and the embeddings at -5)."""
    return save_random_vit(
        tmp_path_factory.mktemp("models") / "deep-reg", model_type="dinov2_with_registers", shape="tiny-deep"
    )


def _extract(pre, model, cache, **kw):
    return extract(
        pre, resolve_model(str(model)), cache=cache, chunk_rows=8, batch_size=5, progress=False, **kw
    )


@pytest.mark.refuses("a --layers / --patch-layers index outside the model's blocks, or not an integer")
def test_parse_layers_normalises_sorts_and_refuses_out_of_range(tmp_path, small_data, deep_reg):
    assert parse_layers("-1,-4,-7", 12) == (-7, -4, -1)
    assert parse_layers("12, -1", 12) == (-1,)  # hidden_states[12] is the last block's output
    assert parse_layers([0], 4) == (-5,)  # the embeddings
    with pytest.raises(TprobeError, match="--layers .*outside the model's 4 blocks"):
        parse_layers("-6", 4)
    with pytest.raises(TprobeError, match="not an integer"):
        parse_layers("-1,last", 4)
    args = ["extract", "--data", str(small_data), "--model", str(deep_reg), "--cache", str(tmp_path)]
    r = CliRunner().invoke(main, [*args, "--layers", "-9"])
    assert r.exit_code == 2 and "--layers '-9': layer -9 is outside the model's 4 blocks" in r.output
    r = CliRunner().invoke(main, [*args, "--patch-layers", "-1,x"])
    assert r.exit_code == 2 and "--patch-layers '-1,x': 'x' is not an integer" in r.output
    assert not list(tmp_path.rglob("*.zarr"))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_layers_store_keeps_layer_minus_1_byte_identical(tmp_path, small_data, deep_reg, fmt):
    pre = preprocess(discover(small_data))
    base = _extract(pre, deep_reg, tmp_path / "c", fmt=fmt)
    same = _extract(pre, deep_reg, tmp_path / "c", fmt=fmt, layers="-1")
    assert same.path == base.path and same.status == "up to date"  # --layers -1: today's store and key
    assert "-L" not in base.path.name
    lay = _extract(pre, deep_reg, tmp_path / "c", fmt=fmt, layers="-1,-4")
    assert (
        lay.status == "written"
        and lay.path != base.path
        and lay.path.name.endswith(f"-L-4_-1{base.path.suffix}")
    )
    a, b = FeatureStore.open(base.path), FeatureStore.open(lay.path)
    n = len(pre.kept)
    assert not a.layered and a.shapes["cls"] == (n, 32) and "layers" not in a.attrs
    assert b.layered and b.layers == (-4, -1) and b.patch_layers == (-1,)
    assert b.shapes == {"cls": (n, 2, 32), "registers": (n, 2, 4, 32), "patches": (n, 1, 100, 32)}
    assert b.attrs["layers"] == [-4, -1] and b.attrs["num_hidden_layers"] == 4
    for name, at in (("cls", 1), ("registers", 1), ("patches", 0)):
        old, new = a.read(name), b.read(name)[:, at]
        assert old.dtype == new.dtype == np.float16 and old.tobytes() == new.tobytes(), name
    assert b.read("cls")[:, 0].tobytes() != a.read("cls").tobytes()  # layer -4 is another layer
    np.testing.assert_array_equal(b.pooled("cls"), a.pooled("cls"))  # every old pool reads layer -1
    np.testing.assert_array_equal(b.pooled("cls+mean"), a.pooled("cls+mean"))
    assert json.loads(json.dumps(b.attrs)) == b.attrs


def test_the_layer_axis_is_named_in_the_store(tmp_path, small_data, deep_reg):
    import zarr

    pre = preprocess(discover(small_data))
    path = _extract(pre, deep_reg, tmp_path, layers="-1,-2,-4", patch_layers="-1,-4").path
    assert path.name.endswith("-L-4_-2_-1-P-4_-1.zarr")
    g = zarr.open_group(path, mode="r")
    assert g["cls"].metadata.dimension_names == ("rows", "layer", "hidden")
    assert g["registers"].metadata.dimension_names == ("rows", "layer", "register", "hidden")
    assert g["patches"].metadata.dimension_names == ("rows", "patch_layer", "patch", "hidden")
    assert g["layer"][:].tolist() == [-4, -2, -1] and g["patch_layer"][:].tolist() == [-4, -1]
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(path, consolidated=False)
    np.testing.assert_array_equal(ds["cls"].sel(layer=-2).values, FeatureStore.open(path).pooled("cls@-2"))
    assert ds["patches"].sel(patch_layer=-4).shape == (len(pre.kept), 100, 32)


@pytest.mark.parametrize("model_type", ["dinov2_with_registers", "dinov3_vit", "vit"])
def test_cls_at_layer_is_the_final_layernorm_of_hidden_states(tmp_path, small_data, model_type):
    model = save_random_vit(tmp_path / model_type, model_type=model_type, shape="tiny-deep")
    ref = resolve_model(str(model))
    config = fit_canvas(PreprocessConfig(), ref.patch_size, user_set=False)
    pre = preprocess(discover(small_data), config)
    store = FeatureStore.open(
        _extract(pre, model, tmp_path / "c", dtype="float32", layers="-1,-2,-3,-4").path
    )
    # computed here with the Hugging Face model directly, as DINOv2's get_intermediate_layers(norm=True)
    bb = Backbone.from_pretrained(str(model), device="cpu")
    net, norm = bb.model, (bb.model.norm if model_type == "dinov3_vit" else bb.model.layernorm)
    manifest = pd.read_parquet(manifest_path(store.path))
    rows = [0, 5, len(manifest) - 1]
    imgs = np.stack([load_view(manifest.path[i], manifest.view[i], pre.config) for i in rows])
    with torch.no_grad():
        out = net(pixel_values=bb.pixel_values(imgs), output_hidden_states=True)
        want = {v: norm(out.hidden_states[v]).numpy() for v in (-4, -3, -2, -1)}
    for v in (-4, -2):
        np.testing.assert_allclose(store.pooled(f"cls@{v}")[rows], want[v][:, 0], atol=2e-5)
        assert not np.allclose(
            out.hidden_states[v][:, 0].numpy(), want[v][:, 0], atol=1e-3
        )  # the norm matters
    np.testing.assert_allclose(store.pooled("cls@-1")[rows], out.last_hidden_state[:, 0].numpy(), atol=2e-5)
    last4 = store.pooled("last4")[rows]
    R = ref.num_registers
    mean_patch = out.last_hidden_state[:, 1 + R :].mean(1).numpy()
    np.testing.assert_allclose(
        last4, np.concatenate([want[v][:, 0] for v in (-4, -3, -2, -1)] + [mean_patch], 1), atol=2e-5
    )


@pytest.mark.refuses(
    "a pool of layers the store does not hold (cls@-5, last4 or cls@-4 on a last-block store)"
)
def test_layer_pools_shapes_and_refusals(tmp_path, small_data, deep_reg):
    pre = preprocess(discover(small_data))
    n = len(pre.kept)
    lay = FeatureStore.open(_extract(pre, deep_reg, tmp_path, layers="-4,-3,-2,-1").path)
    got = lay.pooled_many(["cls@-4", "cls@-1", "last4", "cls", "mean", "registers", "concat"])
    assert {k: v.shape for k, v in got.items()} == {
        "cls@-4": (n, 32),
        "cls@-1": (n, 32),
        "last4": (n, 5 * 32),
        "cls": (n, 32),
        "mean": (n, 32),
        "registers": (n, 32),
        "concat": (n, (1 + 4 + 100) * 32),
    }
    np.testing.assert_array_equal(got["last4"][:, 96:128], got["cls@-1"])
    np.testing.assert_array_equal(got["last4"][:, :32], got["cls@-4"])
    np.testing.assert_array_equal(got["last4"][:, 128:], got["mean"])
    assert lay.layer_pools() == ["cls@-4", "cls@-3", "cls@-2", "cls@-1"]
    with pytest.raises(TprobeError, match=r"layer\(s\) -5.*re-extract with --layers"):
        lay.pooled("cls@-5")
    plain = FeatureStore.open(_extract(pre, deep_reg, tmp_path).path)
    np.testing.assert_array_equal(plain.pooled("cls@-1"), plain.pooled("cls"))
    for pool in ("last4", "cls@-4"):
        with pytest.raises(TprobeError, match="re-extract with --layers"):
            plain.pooled(pool)
    early = FeatureStore.open(_extract(pre, deep_reg, tmp_path, layers="-2", patch_layers="-2").path)
    with pytest.raises(TprobeError, match="re-extract with --layers -2,-1"):
        early.pooled("cls")
    with pytest.raises(TprobeError, match="patch tokens of layer -1.*--patch-layers -1"):
        early.pooled("mean")
    with pytest.raises(TprobeError, match="is not one of"):
        plain.pooled("cls@top")


def test_export_carries_the_layer_axis(tmp_path, small_data, deep_reg):
    import h5py
    import pyarrow.parquet as pq

    from tprobe.cache.export import export

    pre = preprocess(discover(small_data))
    path = _extract(pre, deep_reg, tmp_path, layers="-1,-2,-3,-4").path
    store = FeatureStore.open(path)
    out = export(path, "anndata", tmp_path / "cells.h5ad")
    with h5py.File(out, "r") as f:
        keys = set(f["obsm"])
        np.testing.assert_array_equal(f["obsm"]["X_cls_layer-3"][:], store.pooled("cls@-3"))
        assert f["obsm"]["X_last4"].shape == (len(pre.kept), 160)
    assert {"X_cls", "X_mean", "X_cls_layer-4", "X_cls_layer-3", "X_cls_layer-2", "X_last4"} <= keys
    assert "X_cls_layer-1" not in keys  # that is X_cls
    table = pq.read_table(export(path, "parquet", tmp_path / "cells.parquet"))
    meta = json.loads(table.schema.metadata[b"tprobe"])
    assert meta["layers"] == [-4, -3, -2, -1] and "X_cls_layer-4" in table.column_names


def test_probe_pool_layers_draws_auc_by_layer(tmp_path, deep_reg):
    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=4)
    args = ["--data", str(data), "--model", str(deep_reg), "--cache", str(tmp_path / "c")]
    r = CliRunner().invoke(main, ["extract", *args, "--layers", "-1,-2,-4", "--tokens", "cls,registers"])
    assert r.exit_code == 0, r.output
    store = r.output.strip().splitlines()[-1]
    assert "-L-4_-2_-1" in store
    r = CliRunner().invoke(
        main,
        [
            "probe",
            *args,
            "--pool",
            "layers",
            "--head",
            "logreg",
            "--bootstrap",
            "20",
            "--no-final-head",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    sweep = Path(r.output.strip().splitlines()[-1])
    summary = pd.read_parquet(sweep / "summary.parquet")
    assert summary["pool"].tolist() == ["cls@-4", "cls@-2", "cls@-1"]
    assert (sweep / "auc_by_layer.png").stat().st_size > 1000


def test_predict_extracts_the_layer_a_cls_at_layer_run_was_trained_on(tmp_path, deep_reg):
    import shutil

    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=3)
    args = ["--data", str(data), "--model", str(deep_reg), "--cache", str(tmp_path / "c")]
    r = CliRunner().invoke(main, ["extract", *args, "--layers", "-1,-3"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "probe",
            *args,
            "--pool",
            "cls@-3",
            "--head",
            "logreg",
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    run = Path(r.output.strip().splitlines()[-1])
    new = tmp_path / "new"
    shutil.copytree(data / "donor_1", new)
    r = CliRunner().invoke(
        main, ["predict", "--run", str(run), str(new), "--cache", str(tmp_path / "new-cache")]
    )
    assert r.exit_code == 0, r.output
    stores = [p.name for p in (tmp_path / "new-cache").rglob("*.zarr")]
    assert len(stores) == 1 and stores[0].endswith("-L-3.zarr"), stores
    assert (run / f"predictions-{new.name}.csv").exists()


def test_per_channel_layers_store_has_channel_then_layer_axes(tmp_path, deep_reg):
    import zarr

    from tprobe.testing import SYNTHETIC_CHANNELS, make_multichannel

    data = make_multichannel(tmp_path / "mc", layout="chw", donors=("donor_1",), per_class=2)
    cfg = PreprocessConfig(
        channels=SYNTHETIC_CHANNELS,
        channel_mode="per-channel",
        use=("fad", "nadh"),
        max_value=(4095.0, 4095.0, 65535.0),
        views="orig",
    )
    pre = preprocess(discover(data), cfg)
    n = len(pre.kept)
    base = FeatureStore.open(_extract(pre, deep_reg, tmp_path / "c").path)
    lay = FeatureStore.open(_extract(pre, deep_reg, tmp_path / "c", layers="-1,-2").path)
    assert lay.shapes["cls"] == (n, 2, 2, 32) and lay.shapes["patches"] == (n, 2, 1, 100, 32)
    g = zarr.open_group(lay.path, mode="r")
    assert g["cls"].metadata.dimension_names == ("rows", "channel", "layer", "hidden")
    assert g["patches"].metadata.dimension_names == ("rows", "channel", "patch_layer", "patch", "hidden")
    assert lay.read("cls")[:, :, 1].tobytes() == base.read("cls").tobytes()
    assert lay.read("patches")[:, :, 0].tobytes() == base.read("patches").tobytes()
    at2 = lay.pooled("cls@-2")  # per channel, concatenated in channel order
    assert at2.shape == (n, 64)
    np.testing.assert_array_equal(at2[:, 32:], lay.read("cls")[:, 1, 0].astype(np.float32))
    np.testing.assert_array_equal(lay.pooled("mean"), base.pooled("mean"))
