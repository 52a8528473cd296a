import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tprobe.errors import TprobeError
from tprobe.models.backbones import ALIASES, Backbone, resolve_model


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(TprobeError, match="not a known alias.*dinov2-small-reg"):
        resolve_model("dinov2-tiny")


def test_unreachable_hub_without_cache_gives_one_clear_error(tmp_path):
    """A hub that refuses connections (closed local port) and an empty HF cache."""
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tprobe.cli", "extract", "--model", "dinov2-small-reg"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    # one line saying it is trying, then one line with the fix (the hub id is known)
    assert len(lines) == 2 and "contacting the Hugging Face hub" in lines[0]
    assert "weights not reachable" in lines[1] and "--model /path/to/local" in lines[1]
    assert "`hf download facebook/dinov2-with-registers-small`" in lines[1]
    assert "Traceback" not in proc.stderr


def test_offline_flag_never_touches_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(TprobeError, match="weights not reachable"):
        resolve_model("dinov2-base", offline=True)


@pytest.mark.parametrize("fixture, registers", [("tiny_reg", 4), ("tiny_plain", 0)])
def test_layout_read_from_config(request, fixture, registers):
    path = request.getfixturevalue(fixture)
    bb = Backbone.from_pretrained(str(path), device="cpu")
    assert bb.num_registers == registers and bb.patch_size == 14 and bb.hidden_size == 32
    assert bb.ref.slug.startswith(f"local--{path.name}@")
    x = bb.pixel_values(np.random.default_rng(0).random((2, 28, 28)))
    assert x.shape == (2, 3, 28, 28)
    assert torch.allclose(x[:, 0] * 0.229 + 0.485, x[:, 2] * 0.225 + 0.406, atol=1e-6)
    with torch.inference_mode():
        hidden = bb(x).last_hidden_state
    cls, regs, patches = bb.layout(28).split(hidden)
    assert cls.shape == (2, 32) and regs.shape == (2, registers, 32) and patches.shape == (2, 4, 32)
    with pytest.raises(TprobeError, match="multiple of the patch size 14; set --canvas to 140"):
        bb.grid(134)


def test_aliases_cover_every_variant():
    assert {a for a in ALIASES if a.startswith("dinov2")} == {
        f"dinov2-{s}{r}" for s in ("small", "base", "large", "giant") for r in ("", "-reg")
    }
    assert {a for a in ALIASES if a.startswith("dinov3")} == {
        f"dinov3-vit{s}16{p}"
        for s, p in (("s", ""), ("s", "plus"), ("b", ""), ("l", ""), ("h", "plus"), ("7b", ""))
    }
    assert ALIASES["dinov2-small-reg"] == "facebook/dinov2-with-registers-small"
