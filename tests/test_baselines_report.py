import json

import pandas as pd
import pytest
from click.testing import CliRunner

from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.runs.report import collect_runs
from tprobe.train.baselines import PIXEL_CANVAS, LeNet, pixel_features, run_baseline


@pytest.fixture(scope="module")
def sample_pre():
    return preprocess(discover())


def test_pixel_features_are_the_original_views(sample_pre):
    fs = pixel_features(sample_pre)
    assert fs.X.shape == (len(sample_pre.kept) // 6, PIXEL_CANVAS**2)
    assert (fs.meta["view"] == "orig").all() and 0 <= fs.X.min() and fs.X.max() <= 1


def test_lenet_shapes():
    import torch

    assert LeNet()(torch.zeros(3, PIXEL_CANVAS, PIXEL_CANVAS)).shape == (3,)


@pytest.mark.parametrize("name", ["pixel-logreg", "lenet"])
def test_baselines_beat_the_frequency_classifier(sample_pre, tmp_path, name):
    run, ev = run_baseline(
        name,
        sample_pre,
        tmp_path,
        split="test-donor",
        test_donor="4",
        n_boot=50,
        epochs=8,
        log=lambda r: None,
    )
    assert ev.summary["roc_auc"]["mean"] > ev.reference["frequency"]["roc_auc"]["mean"] + 0.1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["folds"][0]["test_donor"] == "donor_4"
    assert (run / "predictions.parquet").exists() and (run / "roc.png").exists()


def test_report_from_two_runs(sample_pre, tmp_path):
    runs = tmp_path / "runs"
    run_baseline("frequency", sample_pre, runs, n_boot=50)
    run_baseline("pixel-mlp", sample_pre, runs, split="test-donor", test_donor="4", n_boot=50)
    summary = collect_runs(runs)
    assert sorted(summary["model"]) == ["frequency", "pixel-mlp"]
    res = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    rep = tmp_path / "rep"
    page = (rep / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "Published reference numbers" in page
    md = (rep / "report.md").read_text()
    assert "| baseline | frequency |" in md and "not measured here" in md
    assert len(pd.read_parquet(rep / "summary.parquet")) == 2
    # measured rows never include the published block
    assert "Wang" not in summary.to_string()


def test_report_on_an_empty_folder(tmp_path):
    with pytest.raises(TprobeError, match="no run directories"):
        collect_runs(tmp_path)
