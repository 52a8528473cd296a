"""tprobe's torch-only DINOv2 (tprobe.models.dinov2_torch) against the installed transformers: the same
tokens to the bit, its refusals (it hands everything it does not reproduce to transformers), and
extraction without importing transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_subset

from tprobe.errors import TprobeError
from tprobe.models import dinov2_torch
from tprobe.models.backbones import Backbone, resolve_model
from tprobe.testing import save_random_dinov2, save_random_vit

ROOT = Path(__file__).resolve().parents[1]


def _hf(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()


def _ours(folder: Path):
    model = dinov2_torch.load(dinov2_torch.read_config(folder / "config.json"), folder)
    assert model is not None
    return model


def _same_tokens(a, b, x, **kw):
    with torch.inference_mode():
        ours = a(pixel_values=x, output_hidden_states=True, **kw)
        theirs = b(pixel_values=x, output_hidden_states=True)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for u, v in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("registers", [4, 0])
def test_defaults_are_transformers_defaults(registers):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    theirs = (Dinov2WithRegistersConfig() if registers else Dinov2Config()).to_dict()
    mtype = "dinov2_with_registers" if registers else "dinov2"
    for key, value in dinov2_torch.DEFAULTS[mtype].items():
        assert theirs[key] == value, key


@pytest.mark.parametrize("registers", [4, 0])
@pytest.mark.parametrize("side", [140, 112, 518, 224])
def test_tokens_are_transformers_tokens_to_the_bit(tmp_path, registers, side):
    folder = save_random_dinov2(tmp_path / "m", shape="tiny-deep", registers=registers, seed=3)
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(side))
    _same_tokens(_ours(folder), _hf(folder), x)


def test_small_shape_batch_of_one_and_bf16_autocast(tmp_path):
    folder = save_random_dinov2(tmp_path / "m", shape="small", registers=4, seed=1)
    ours, theirs = _ours(folder), _hf(folder)
    _same_tokens(ours, theirs, torch.rand(1, 3, 140, 140))
    x = torch.rand(2, 3, 140, 140)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(pixel_values=x).last_hidden_state, theirs(pixel_values=x).last_hidden_state
    assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("registers", [4, 0])
def test_swiglu_and_no_qkv_bias(tmp_path, registers):
    """The giant checkpoints' SwiGLU MLP (saved fused as weights_in / weights_out) and qkv without bias."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        patch_size=14,
        image_size=518,
        use_swiglu_ffn=True,
        qkv_bias=False,
        layerscale_value=0.5,
    )
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    model.save_pretrained(tmp_path / "m")
    _same_tokens(_ours(tmp_path / "m"), _hf(tmp_path / "m"), torch.randn(2, 3, 140, 140))


def test_hub_names_and_sharded_weights(tmp_path):
    """Checkpoint names under a model prefix and weights split over shards load to the same model."""
    from safetensors.torch import load_file, save_file

    folder = save_random_dinov2(tmp_path / "m", shape="tiny", registers=4)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _same_tokens(_ours(folder), _hf(folder), torch.randn(2, 3, 140, 140))


def test_what_it_does_not_reproduce_goes_to_transformers(tmp_path, caplog):
    folder = save_random_dinov2(tmp_path / "m", shape="tiny", registers=4)
    config = dinov2_torch.read_config(folder / "config.json")
    # another activation or model type, a malformed value: not read as a DINOv2 config at all
    for change in ({"hidden_act": "gelu_new"}, {"hidden_size": "32"}, {"model_type": "vit"}):
        values = {**json.loads((folder / "config.json").read_text()), **change}
        (tmp_path / "c.json").write_text(json.dumps(values))
        assert dinov2_torch.read_config(tmp_path / "c.json") is None, change
    # half-precision weights, a weight it does not know, pickle weights only
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    for name, changed in (
        ("half", {k: v.half() for k, v in state.items()}),
        ("extra", {**state, "encoder.layer.0.mlp.extra.weight": torch.zeros(2)}),
        ("missing", {k: v for k, v in state.items() if not k.startswith("layernorm.")}),
    ):
        save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
        assert dinov2_torch.load(config, folder) is None, name
    (folder / "model.safetensors").unlink()
    assert dinov2_torch.load(config, folder) is None


def test_backbone_engines(tmp_path, tiny_reg):
    auto = Backbone.from_pretrained(str(tiny_reg), device="cpu", engine="auto")
    assert auto.engine == "torch" and isinstance(auto.model, dinov2_torch.Dinov2Torch)
    assert Backbone.from_pretrained(str(tiny_reg), device="cpu").engine == "transformers"  # the default
    eager = Backbone.from_pretrained(str(tiny_reg), device="cpu", engine="auto", attn_implementation="eager")
    assert eager.engine == "transformers"  # attention maps: transformers' eager attention
    x = torch.rand(2, 140, 140)
    with torch.inference_mode(), auto.fixed_canvas(140), eager.fixed_canvas(140):
        a = auto.layer_outputs(auto.pixel_values(x), (-1, -2))
        b = eager.layer_outputs(eager.pixel_values(x), (-1, -2))
    assert all(torch.allclose(a[v], b[v], atol=1e-5) for v in (-1, -2))
    vit = save_random_vit(tmp_path / "vit", model_type="vit")
    assert Backbone.from_pretrained(str(vit), device="cpu", engine="auto").engine == "transformers"
    with pytest.raises(TprobeError, match="torch-only forward"):
        Backbone.from_pretrained(str(vit), device="cpu", engine="torch")
    with pytest.raises(TprobeError, match="inference only"):
        auto.model.train()
    assert isinstance(resolve_model(str(tiny_reg)).config, dinov2_torch.Dinov2Config)


def test_hub_snapshot_loads_without_transformers(tmp_path, tiny_reg, monkeypatch):
    import shutil

    from huggingface_hub import constants as hf_constants

    commit = "c" * 40
    repo = tmp_path / "hub" / "models--facebook--dinov2-with-registers-small"
    shutil.copytree(tiny_reg, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = resolve_model("dinov2-small-reg", offline=True)
    assert ref.resolved == commit and isinstance(ref.config, dinov2_torch.Dinov2Config)
    bb = Backbone.from_pretrained(ref, device="cpu", offline=True, engine="auto")
    assert bb.engine == "torch"
    x = torch.rand(2, 3, 140, 140)
    _same_tokens(bb.model, _hf(tiny_reg), x)


def _extract(data, cache, model, env):
    code = (
        "import sys; from tprobe.cli import main\n"
        "try:\n    main(sys.argv[1:], prog_name='tprobe')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TRANSFORMERS', 'transformers' in sys.modules); sys.exit(code)"
    )
    cmd = [
        sys.executable,
        "-c",
        code,
        "extract",
        "--model",
        str(model),
        "--data",
        str(data),
        "--cache",
        str(cache),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_extract_without_transformers_writes_transformers_tokens(tmp_path, tiny_reg):
    from tprobe.cache.store import FeatureStore

    data = copy_subset(tmp_path / "data", per_class=3)
    stores = {}
    for engine in ("auto", "transformers"):
        out = _extract(data, tmp_path / engine, tiny_reg, {"TPROBE_FORWARD": engine})
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"TRANSFORMERS {engine == 'transformers'}" in out.stdout
        stores[engine] = FeatureStore.open(next((tmp_path / engine).rglob("*.zarr")))
    auto, hf = stores["auto"], stores["transformers"]
    assert auto.attrs["forward"] == "torch" and hf.attrs["forward"] == "transformers"
    assert auto.path.relative_to(tmp_path / "auto") == hf.path.relative_to(
        tmp_path / "transformers"
    )  # one key
    for token in ("cls", "registers", "patches"):
        assert np.array_equal(auto.read(token), hf.read(token)), token


def test_bad_forward_setting_is_one_line(tmp_path, tiny_reg):
    out = _extract(
        copy_subset(tmp_path / "data", per_class=1), tmp_path / "c", tiny_reg, {"TPROBE_FORWARD": "fast"}
    )
    assert out.returncode == 2
    assert "TPROBE_FORWARD='fast' is not one of transformers, auto, torch" in out.stderr


@pytest.mark.parametrize("where", ["dtype", "torch_dtype", "index"])
def test_a_dtype_the_files_name_is_what_transformers_runs(tmp_path, where):
    """transformers 5 loads in the dtype config.json names (else a sharded index's metadata), casting float32
    weights: the torch forward must not run those in float32 under the same store key."""
    from safetensors.torch import load_file, save_file

    folder = save_random_dinov2(tmp_path / "m", shape="tiny", registers=4, seed=2)
    values = json.loads((folder / "config.json").read_text())
    values.pop("dtype", None)
    if where == "index":
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        save_file(state, folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
        index = {
            "metadata": {"dtype": "bfloat16"},
            "weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors"),
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        values[where] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(values))
    bb = Backbone.from_pretrained(str(folder), device="cpu", engine="auto")
    x = torch.rand(2, 3, 140, 140)
    with torch.inference_mode():
        ours, theirs = bb(x).last_hidden_state, _hf(folder)(pixel_values=x).last_hidden_state
    assert theirs.dtype == torch.bfloat16
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert bb.engine == "transformers"


def test_a_quantization_config_goes_to_transformers(tmp_path):
    """transformers quantizes float32 weights as it loads them when config.json asks; the torch forward must not
    run them unquantized under the same store key."""
    folder = save_random_dinov2(tmp_path / "m", shape="tiny", registers=4)
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**values, "quantization_config": {"quant_method": "fp8"}})
    )
    assert dinov2_torch.load(dinov2_torch.read_config(folder / "config.json"), folder) is None


def test_a_peft_adapter_in_the_folder_goes_to_transformers(tmp_path):
    """With peft installed, transformers' from_pretrained applies an adapter saved beside the weights."""
    folder = save_random_dinov2(tmp_path / "m", shape="tiny", registers=4)
    config = dinov2_torch.read_config(folder / "config.json")
    assert dinov2_torch.load(config, folder) is not None
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert dinov2_torch.load(config, folder) is None


def test_bad_forward_setting_is_refused_with_every_store_complete(tmp_path, tiny_reg):
    data = copy_subset(tmp_path / "data", per_class=1)
    assert _extract(data, tmp_path / "c", tiny_reg, {}).returncode == 0
    out = _extract(data, tmp_path / "c", tiny_reg, {"TPROBE_FORWARD": "fast"})
    assert out.returncode == 2 and "TPROBE_FORWARD='fast'" in out.stderr


def test_configs_compare_by_value(tiny_reg):
    assert resolve_model(str(tiny_reg)) == resolve_model(str(tiny_reg))
