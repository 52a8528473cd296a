"""Inception v3 baselines: timm-compatible weights, safe loading, offline errors, end-to-end runs (random init)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import copy_subset
from safetensors.torch import save_file

from tprobe.cli import main
from tprobe.errors import TprobeError
from tprobe.models.inception import check_size, load_inception, resolve_weights, to_input
from tprobe.runs.record import RunRecord
from tprobe.runs.report import RANDOM_MARK

# (key, shape) pairs of timm's inception_v3 (= torchvision's Inception3), read off the layer
# definitions in timm/models/inception_v3.py: one per block type, the asymmetric kernels included
TIMM_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}
# timm's InceptionAux (present in the tv_in1k checkpoint, not built here): conv0 768->128 1x1 + BN,
# conv1 128->768 5x5 + BN, fc 768->1000
AUX_PARAMS = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)


@pytest.fixture(scope="module")
def net():
    return load_inception(resolve_weights("random"), seed=1)


def test_state_dict_has_timm_names_and_shapes(net):
    state = net.state_dict()
    for key, shape in TIMM_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # 94 conv + BN layers (conv weight; BN weight, bias, running mean/var, count) + fc weight and bias
    assert len(state) == 94 * 6 + 2
    assert not [k for k in state if k.endswith("conv.bias")]  # convolutions carry no bias
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    n = sum(p.numel() for p in net.parameters())
    assert n == 23_834_568  # timm inception_v3 (no aux): 23.8 M
    assert n + AUX_PARAMS == 27_161_264  # torchvision Inception3 with AuxLogits


def test_input_size_and_normalisation(net):
    x = to_input(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]).repeat(2, 1, 1), size=2)
    assert x.shape == (2, 3, 2, 2) and x.min() == -1 and x.max() == 1  # (v - 0.5) / 0.5, grey as R, G, B
    assert torch.equal(x[:, 0], x[:, 2])
    up = to_input(torch.rand(1, 20, 20), size=75)
    assert up.shape == (1, 3, 75, 75) and up.min() >= -1 and up.max() <= 1  # bicubic overshoot clamped
    with torch.no_grad():
        assert net.pooled(up).shape == (1, 2048)
    assert check_size(75) == 75
    with pytest.raises(TprobeError, match="at least 75 px"):
        check_size(74)


def test_saved_safetensors_folder_loads_back_identical(net, tmp_path):
    torch.manual_seed(0)
    for m in net.modules():  # running statistics a checkpoint would hold, so eval mode uses them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    # as in a torchvision-era checkpoint: AuxLogits weights, no num_batches_tracked
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    ref = resolve_weights(str(folder))
    assert not ref.random_init and len(ref.resolved) == 64 and ref.source == str(folder.resolve())
    loaded = load_inception(ref, seed=99)  # another seed: every weight must come from the file
    x = to_input(torch.rand(2, 30, 30), size=80)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    state["Mixed_9z.conv.weight"] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(TprobeError, match="1 unexpected .e.g. Mixed_9z.conv.weight") as err:
        load_inception(resolve_weights(str(folder)))
    assert "\n" not in str(err.value)


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader executed the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_weights_are_refused_unread(tmp_path):
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Payload(marker))
    (tmp_path / "pth").mkdir()
    (tmp_path / "pth" / "inception_v3_google.pth").write_bytes(payload)
    with pytest.raises(TprobeError, match="only from model.safetensors.*pickle"):
        resolve_weights(str(tmp_path / "pth"))
    with pytest.raises(TprobeError, match="only from model.safetensors.*pickle"):
        resolve_weights(str(tmp_path / "pth" / "inception_v3_google.pth"))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "model.safetensors").write_bytes(payload)  # a pickle under the safe name
    with pytest.raises(TprobeError, match="not a readable safetensors file"):
        load_inception(resolve_weights(str(tmp_path / "fake")))
    assert not marker.exists()
    with pytest.raises(TprobeError, match="not a hub id .owner/name., a folder"):
        resolve_weights("inception")


def test_unreachable_hub_is_one_line(tmp_path, small_data):
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tprobe.cli",
            "baseline",
            "--name",
            "inception-frozen",
            "--data",
            str(small_data),
            "--out",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "contacting the Hugging Face hub" in lines[0]
    assert "weights not reachable" in lines[1] and "--inception-weights /path/to/folder" in lines[1]
    assert "`hf download timm/inception_v3.tv_in1k model.safetensors`" in lines[1]
    assert not (tmp_path / "runs").exists()  # refused before any work


def _one_run(runs: Path) -> tuple[Path, RunRecord]:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run, RunRecord.load(run)


def test_frozen_random_end_to_end_and_labelled(tmp_path, small_data):
    runs = tmp_path / "runs"
    res = CliRunner().invoke(
        main,
        [
            "baseline",
            "--name",
            "inception-frozen",
            "--inception-weights",
            "random",
            "--inception-size",
            "75",
            "--data",
            str(small_data),
            "--out",
            str(runs),
            "--bootstrap",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "RANDOM WEIGHTS" in res.output  # on the console too, not only in the run record and report
    run, record = _one_run(runs)
    assert record.command == "baseline" and record.random_init and record.random_weights
    assert record.options["baseline"] == "inception-frozen" and record.options["inception_size"] == 75
    assert record.features.resolved_revision == "random" and record.n_features == 2048
    assert record.title.endswith("(random weights: plumbing check)")
    pred = pd.read_parquet(run / "predictions.parquet")
    # every kept cell scored once, by a head that never saw its donor
    assert len(pred) == record.n_rows == pred["image_id"].nunique() and set(pred["donor"]) == {
        "donor_1",
        "donor_2",
    }
    assert (pred["fold"] == pred["donor"].map({"donor_1": 0, "donor_2": 1})).all()
    res = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    (row,) = [line for line in md.splitlines() if "inception-frozen" in line and "|" in line]
    assert RANDOM_MARK in row


def test_finetuned_random_end_to_end(tmp_path):
    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=3)
    runs = tmp_path / "runs"
    res = CliRunner().invoke(
        main,
        [
            "baseline",
            "--name",
            "inception-finetuned",
            "--inception-weights",
            "random",
            "--inception-size",
            "75",
            "--epochs",
            "1",
            "--split",
            "test-donor",
            "--test-donor",
            "3",
            "--data",
            str(data),
            "--out",
            str(runs),
            "--bootstrap",
            "20",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    run, record = _one_run(runs)
    assert record.random_init and record.options["train"]["epochs"] == 1 and record.features.canvas == 75
    curves = pd.read_csv(run / "curves.csv")
    assert len(curves) == 1 and curves["validation_donor"].iloc[0] in ("donor_1", "donor_2")
    pred = pd.read_parquet(run / "predictions.parquet")
    assert set(pred["donor"]) == {"donor_3"} and pred["p_activated"].between(0, 1).all()
    assert not (run / "checkpoints").exists()  # baseline runs are never resumed: no 0.4 GB per fold
    assert json.loads((run / "metrics.json").read_text())["folds"][0]["test_donor"] == "donor_3"
    # two donors cannot give each fold a validation donor and a training donor
    res = CliRunner().invoke(
        main,
        [
            "baseline",
            "--name",
            "inception-finetuned",
            "--inception-weights",
            "random",
            "--data",
            str(copy_subset(tmp_path / "two")),
            "--out",
            str(runs),
        ],
    )
    assert res.exit_code == 2 and "needs at least 2 training donors per fold" in res.output
