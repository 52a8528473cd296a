"""ViTs beyond DINOv2: DINOv3, ViT, ViT-MSN layouts read from their configs; other models refused."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tprobe.cache.extract import extract, manifest_path
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, load_view, preprocess
from tprobe.errors import TprobeError
from tprobe.models.backbones import ALIASES, Backbone, resolve_model, round_canvas
from tprobe.testing import save_random_vit


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    root = tmp_path_factory.mktemp("vits")
    return {
        "dinov3_vit": save_random_vit(root / "dinov3", model_type="dinov3_vit"),
        # google's ViTs normalise with 0.5 / 0.5: read from preprocessor_config.json
        "vit": save_random_vit(root / "vit", model_type="vit", image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
        "vit_msn": save_random_vit(root / "vit-msn", model_type="vit_msn"),
    }


def test_configs_have_their_hub_shapes(vits, tmp_path):
    cfg = {k: json.loads((p / "config.json").read_text()) for k, p in vits.items()}
    assert cfg["dinov3_vit"]["model_type"] == "dinov3_vit"
    assert cfg["dinov3_vit"]["patch_size"] == 16 and cfg["dinov3_vit"]["num_register_tokens"] == 4
    assert cfg["vit"]["patch_size"] == 16 and cfg["vit_msn"]["model_type"] == "vit_msn"
    d2 = json.loads((save_random_vit(tmp_path / "d2", model_type="dinov2") / "config.json").read_text())
    assert d2["patch_size"] == 14 and d2["image_size"] == 518


@pytest.mark.parametrize("kind, registers", [("dinov3_vit", 4), ("vit", 0), ("vit_msn", 0)])
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_stored_tokens_equal_the_models_own_last_hidden_state(
    vits, kind, registers, fmt, tmp_path, small_data
):
    from transformers import AutoModel

    path = vits[kind]
    pre = preprocess(discover(small_data), PreprocessConfig(canvas=144, views="orig"))
    res = extract(
        pre,
        resolve_model(str(path)),
        cache=tmp_path / "c",
        fmt=fmt,
        dtype="float32",
        chunk_rows=8,
        batch_size=3,
        progress=False,
        device="cpu",
    )
    store = FeatureStore.open(res.path)
    n = len(pre.kept)
    assert store.attrs["model_type"] == kind and store.attrs["patch_grid"] == [9, 9]
    assert store.attrs["patch_size"] == 16 and store.num_registers == registers
    assert store.shapes["patches"] == (n, 81, 32) and ("registers" in store.shapes) == bool(registers)
    assert store.attrs["model_random_init"] is True
    assert store.attrs["image_mean"] == ([0.5] * 3 if kind == "vit" else [0.485, 0.456, 0.406])
    # the model called directly (no tprobe code): normalised by hand, position embeddings interpolated
    net = AutoModel.from_pretrained(str(path)).eval()
    mean, std = (0.5, 0.5) if kind == "vit" else (0.485, 0.229)  # channel 0 of the processor config
    manifest = pd.read_parquet(manifest_path(res.path))
    rows = [0, n // 2, n - 1]
    grey = torch.from_numpy(
        np.stack([load_view(manifest.path[i], manifest.view[i], pre.config) for i in rows])
    )
    bb = Backbone.from_pretrained(str(path), device="cpu")
    pixels = bb.pixel_values(grey)
    assert torch.allclose(pixels[:, 0], (grey - mean) / std, atol=1e-6)
    kw = {} if kind == "dinov3_vit" else {"interpolate_pos_encoding": True}
    with torch.inference_mode():
        hidden = net(pixel_values=pixels, **kw).last_hidden_state.numpy()
    assert hidden.shape == (3, 1 + registers + 81, 32)
    np.testing.assert_allclose(store.read("cls")[rows], hidden[:, 0], atol=1e-5)
    np.testing.assert_allclose(store.read("patches")[rows], hidden[:, 1 + registers :], atol=1e-5)
    if registers:
        np.testing.assert_allclose(store.read("registers")[rows], hidden[:, 1 : 1 + registers], atol=1e-5)
    np.testing.assert_allclose(store.pooled("mean")[rows], hidden[:, 1 + registers :].mean(1), atol=1e-5)


def _config_only(folder, model_type, **kw):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **kw).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "model_type, lacks",
    [
        ("swin", "lacks a CLS token and a single patch grid"),
        ("ijepa", "lacks a CLS token"),
        ("convnext", "lacks tokens"),
        ("bert", "lacks a token layout tprobe knows"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(tmp_path, model_type, lacks):
    folder = _config_only(tmp_path / model_type, model_type)
    with pytest.raises(TprobeError, match=f"is a '{model_type}' model: its last_hidden_state {lacks}"):
        resolve_model(folder)
    r = CliRunner().invoke(main, ["extract", "--model", folder])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "dinov3_vit, vit, vit_msn" in r.output


def test_non_square_patches_are_refused(tmp_path):
    folder = _config_only(tmp_path / "d3", "dinov3_vit", patch_size=[16, 8])
    with pytest.raises(TprobeError, match=r"patch_size \[16, 8\] is not one square patch size"):
        resolve_model(folder)


def test_default_canvas_is_rounded_to_the_patch_size_and_keys_the_store(vits, tmp_path, small_data):
    assert round_canvas(140, 14) == 140 and round_canvas(140, 16) == 144
    args = [
        "extract",
        "--model",
        str(vits["dinov3_vit"]),
        "--data",
        str(small_data),
        "--cache",
        str(tmp_path),
        "--views",
        "orig",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    store = FeatureStore.open(r.output.strip().splitlines()[-1])
    assert store.attrs["preprocess"]["canvas"] == 144 and store.attrs["patch_grid"] == [9, 9]
    assert store.attrs["preprocess_hash"] == PreprocessConfig(canvas=144, views="orig").hash
    # a canvas the user set is kept, and refused with the fix when it does not fit
    r = CliRunner().invoke(main, [*args, "--canvas", "140"])
    assert (
        r.exit_code == 2
        and "canvas 140 px is not a multiple of the patch size 16; set --canvas to 144" in r.output
    )
    # /14 models keep 140
    r = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(save_random_vit(tmp_path / "d2", model_type="dinov2")),
            "--data",
            str(small_data),
            "--cache",
            str(tmp_path),
            "--views",
            "orig",
        ],
    )
    assert r.exit_code == 0, r.output
    assert FeatureStore.open(r.output.strip().splitlines()[-1]).attrs["preprocess"]["canvas"] == 140


def test_probe_finds_the_rounded_store_by_model(vits, tmp_path, small_data):
    base = [
        "--model",
        str(vits["vit"]),
        "--data",
        str(small_data),
        "--cache",
        str(tmp_path),
        "--views",
        "orig",
    ]
    r = CliRunner().invoke(main, ["extract", *base])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main, ["probe", *base, "--head", "logreg", "--pool", "cls", "--out", str(tmp_path / "r")]
    )
    assert r.exit_code == 0, r.output


def test_models_lists_the_new_aliases():
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0
    for alias in ("dinov3-vits16", "dinov3-vits16plus", "dinov3-vitb16", "dinov3-vitl16", "vit-msn-small"):
        assert alias in r.output and ALIASES[alias] in r.output
    assert ALIASES["dinov3-vits16"] == "facebook/dinov3-vits16-pretrain-lvd1689m"
    assert "dinov3_vit" in r.output


@pytest.mark.parametrize(
    "kind, block", [("dinov3_vit", "model.layer"), ("vit", "layers"), ("vit_msn", "layers")]
)
def test_finetune_unfreeze_last_and_attention_saliency_on_other_vits(vits, kind, block):
    from tprobe.train.finetune import DinoClassifier
    from tprobe.train.saliency import saliency_maps

    model = DinoClassifier(
        Backbone.from_pretrained(str(vits[kind]), device="cpu"), canvas=32, pool="cls+mean", unfreeze_last=1
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(f"{block}.1." in n for n in trainable) and not any(f"{block}.0." in n for n in trainable)
    assert any("norm" in n and "layer." not in n for n in trainable)  # the final norm trains too
    imgs = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    maps = saliency_maps(model, imgs)
    assert maps["attention"].shape == (2, 32, 32) and maps["attention"].std() > 0
    assert maps["gradient"].std() > 0


def test_a_preprocessed_folder_on_the_wrong_canvas_names_the_fix(vits, tmp_path, small_data):
    r = CliRunner().invoke(
        main, ["preprocess", "--data", str(small_data), "--views", "orig", "--out", str(tmp_path / "pre")]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(vits["dinov3_vit"]),
            "--data",
            str(tmp_path / "pre"),
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "preprocessed on a 140 px canvas" in r.output and "--canvas 144" in r.output
    r = CliRunner().invoke(
        main,
        [
            "preprocess",
            "--data",
            str(small_data),
            "--views",
            "orig",
            "--canvas",
            "144",
            "--out",
            str(tmp_path / "pre144"),
        ],
    )
    r = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(vits["dinov3_vit"]),
            "--data",
            str(tmp_path / "pre144"),
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert FeatureStore.open(r.output.strip().splitlines()[-1]).attrs["patch_grid"] == [9, 9]


def test_hub_snapshot_normalisation_is_read_from_its_preprocessor_config(vits, tmp_path, monkeypatch, caplog):
    """An offline HF cache (snapshots/<commit>/, refs/main) holding a ViT with 0.5 / 0.5 normalisation."""
    import shutil

    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--google--vit-base-patch16-224-in21k"
    shutil.copytree(vits["vit"], repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    bb = Backbone.from_pretrained("vit-base-in21k", device="cpu", offline=True)
    assert bb.ref.resolved == "a" * 40 and bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5)
    # a snapshot without the file: ImageNet values, said in the log
    (repo / "snapshots" / ("a" * 40) / "preprocessor_config.json").unlink()
    bb = Backbone.from_pretrained("vit-base-in21k", device="cpu", offline=True)
    assert bb.mean == (0.485, 0.456, 0.406) and "normalising with ImageNet mean/std" in caplog.text


def test_map_and_store_checks_mix_patch_sizes(vits, tmp_path, small_data):
    d2 = save_random_vit(tmp_path / "d2", model_type="dinov2_with_registers")
    common = ["--data", str(small_data), "--cache", str(tmp_path / "c"), "--views", "orig"]
    stores = []
    for m in (vits["dinov3_vit"], d2):
        r = CliRunner().invoke(main, ["extract", "--model", str(m), *common])
        assert r.exit_code == 0, r.output
        stores.append(r.output.strip().splitlines()[-1])
    r = CliRunner().invoke(
        main,
        [
            "map",
            "--model",
            str(vits["dinov3_vit"]),
            "--model",
            str(d2),
            "--no-umap",
            "--out",
            str(tmp_path / "maps"),
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    # --store with --data: checked against the data preprocessed at the store's own (rounded) canvas
    r = CliRunner().invoke(
        main,
        [
            "map",
            "--store",
            stores[0],
            "--store",
            stores[1],
            "--no-umap",
            "--out",
            str(tmp_path / "maps"),
            *common,
        ],
    )
    assert r.exit_code == 0, r.output


def test_dinov3_train_mode_computes_what_eval_mode_stores(vits):
    """DINOv3's RoPE coordinate augmentation (on by default in train mode) is switched off."""
    bb = Backbone.from_pretrained(str(vits["dinov3_vit"]), device="cpu")
    x = bb.pixel_values(torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        bb.model.train()
        trained = bb(x).last_hidden_state
        bb.model.eval()
        evaluated = bb(x).last_hidden_state
    assert torch.equal(trained, evaluated)
