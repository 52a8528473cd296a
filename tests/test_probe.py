import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.cache.extract import extract
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.features.sources import feature_columns, from_store, from_table
from tprobe.models.backbones import resolve_model
from tprobe.probing.evaluate import Fold, check_plan, donor_metrics, split_plan
from tprobe.probing.predict import predict
from tprobe.probing.run import ProbeRun


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, tiny_reg):
    """A store of the whole bundled sample through a tiny random DINOv2-with-registers."""
    cache = tmp_path_factory.mktemp("cache")
    pre = preprocess(discover())
    return extract(pre, resolve_model(str(tiny_reg)), cache=cache, progress=False).path


@pytest.mark.parametrize("head", ["logreg", "mlp", "xgboost"])
def test_each_head_beats_the_frequency_classifier(sample_store, head):
    run = ProbeRun(head=head, n_boot=200, final_head=False).fit(from_store(sample_store, "cls"))
    auc = run.summary_["roc_auc"]
    assert run.reference_["frequency"]["roc_auc"]["mean"] == pytest.approx(0.5)
    assert auc["mean"] > 0.6 and auc["ci_low"] <= auc["mean"] <= auc["ci_high"]
    assert set(run.per_donor_["donor"]) == {f"donor_{i}" for i in range(1, 7)}
    # AP is reported beside the donor's prevalence
    assert run.per_donor_["prevalence"].between(0, 1).all()


@pytest.mark.parametrize(
    "split, kw",
    [("leave-one-donor-out", {}), ("group-kfold", {"n_splits": 3}), ("test-donor", {"test_donor": "4"})],
)
def test_no_donor_or_cell_crosses_a_split(sample_store, split, kw):
    meta = from_store(sample_store, "cls").meta
    plan = split_plan(meta, split, **kw)
    check_plan(plan, meta)
    for f in plan:
        tr, te = meta.iloc[f.train], meta.iloc[f.test]
        assert not set(tr["group"]) & set(te["group"])
        assert not set(tr["donor"]) & set(te["donor"])
    if split == "test-donor":
        assert plan[0].test_donors == ["donor_4"] and len(plan) == 1
    leaky = Fold(0, ["donor_1"], np.arange(len(meta)), np.arange(10))
    with pytest.raises(TprobeError, match="both sides"):
        check_plan([leaky], meta)


def test_scored_rows_are_original_views_and_tta_averages_views(sample_store):
    fs = from_store(sample_store, "mean")
    plain = ProbeRun(n_boot=50, final_head=False).fit(fs).predictions_
    tta = ProbeRun(n_boot=50, final_head=False, tta=True).fit(fs).predictions_
    n_cells = fs.meta["group"].nunique()
    assert len(plain) == len(tta) == n_cells and plain["image_id"].str.endswith("_orig").all()
    assert not np.allclose(plain["p_activated"], tta["p_activated"])


def test_single_class_donor_gives_nan_auc_with_a_note():
    pred = pd.DataFrame(
        {
            "donor": ["a"] * 4 + ["b"] * 4,
            "label": [1, 1, 1, 1, 0, 1, 0, 1],
            "p_activated": [0.9, 0.8, 0.4, 0.7, 0.1, 0.9, 0.2, 0.6],
            "fold": [0] * 4 + [1] * 4,
        }
    )
    m = donor_metrics(pred).set_index("donor")
    assert np.isnan(m.loc["a", "roc_auc"]) and "single-class" in m.loc["a", "note"]
    assert m.loc["b", "roc_auc"] == 1.0


def test_bad_names_list_the_choices(sample_store):
    with pytest.raises(TprobeError, match="logreg, mlp, xgboost"):
        ProbeRun(head="svm").fit(from_store(sample_store, "cls"))
    with pytest.raises(TprobeError, match="cls, mean, registers, cls\\+mean, concat"):
        from_store(sample_store, "max")
    with pytest.raises(TprobeError, match="donors: donor_1"):
        split_plan(from_store(sample_store, "cls").meta, "test-donor", test_donor="9")


def test_cli_probe_writes_the_run_directory(sample_store, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(sample_store),
            "--head",
            "logreg",
            "--pool",
            "cls+mean",
            "--bootstrap",
            "100",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / res.output.strip().splitlines()[-1].split("/")[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"mean", "sd", "ci_low", "ci_high"} <= set(metrics["summary"]["roc_auc"])
    assert [f["test_donor"] for f in metrics["folds"]] == [f"donor_{i}" for i in range(1, 7)]
    pred = pd.read_parquet(run / "predictions.parquet")
    assert {"image_id", "donor", "label", "p_activated", "fold"} <= set(pred.columns)
    for name in (
        "config.json",
        "splits.json",
        "roc.png",
        "confusion.png",
        "head.skops",
        "per_donor.parquet",
    ):
        assert (run / name).exists(), name
    assert "frequency (mean)" in res.output


def test_cli_missing_store_names_the_extract_command(tmp_path, tiny_plain):
    res = CliRunner().invoke(main, ["probe", "--model", str(tiny_plain), "--cache", str(tmp_path)])
    assert res.exit_code == 2
    assert f"run `tprobe extract --model {tiny_plain}`" in res.output


def test_predict_round_trip(sample_store, tmp_path):
    fs = from_store(sample_store, "cls")
    run = ProbeRun(n_boot=50).fit(fs)
    run_dir = run.save(tmp_path / "runs")
    new = copy_subset(tmp_path / "new", donors=("donor_3",), per_class=4)
    (new / "donor_3" / "activated" / "broken.png").write_bytes(b"nope")
    cache = sample_store.parents[3]
    table = predict(run_dir, new, cache=cache)
    assert len(table) == 9 and table["kept"].sum() >= 1
    assert table.loc[table["path"].str.endswith("broken.png"), "drop_reason"].item() == "unreadable"
    # same image, same model, same head -> the probability the final head gives on the store
    row = table[table["kept"]].iloc[0]
    i = fs.meta.index[(fs.meta["view"] == "orig") & fs.meta["path"].str.endswith(row["path"].split("/")[-1])][
        0
    ]
    expected = run.final_["model"].predict_proba(fs.X[[i]])[0, 1]
    assert row["p_activated"] == pytest.approx(expected, abs=1e-6)
    assert set(table.loc[table["kept"], "label_name"]) <= {"activated", "quiescent"}


def test_bring_your_own_feature_table(tmp_path):
    pre = preprocess(discover())
    src = pre.manifest[pre.manifest["view"] == "orig"]
    table = pd.DataFrame(
        {
            "FileName": src["path"].map(lambda p: p.split("/")[-1]),
            "Intensity_Mean": src["total_intensity"] / (src["height"] * src["width"]),
            "AreaShape_Area": src["height"] * src["width"],
            "Entropy": src["entropy"],
            "Location_Center_X": np.arange(len(src)),
            "ObjectNumber": 1,
        }
    )
    table.to_csv(tmp_path / "cp.csv", index=False)
    fs = from_table(tmp_path / "cp.csv", pre.manifest)
    assert fs.source["columns"] == ["Intensity_Mean", "AreaShape_Area", "Entropy"]
    assert len(fs.meta) == pre.manifest["kept"].sum() // 6
    run = ProbeRun(n_boot=50, final_head=False).fit(fs)
    assert run.summary_["roc_auc"]["mean"] > 0.6
    assert feature_columns(table, "FileName", exclude=["Entropy"]) == ["Intensity_Mean", "AreaShape_Area"]
    with pytest.raises(TprobeError, match="unknown column"):
        from_table(tmp_path / "cp.csv", pre.manifest, exclude=["nope"])


def test_run_json_writes_nan_as_null_but_keeps_strings(tmp_path):
    from tprobe.runs.record import read_json, write_json

    write_json(
        tmp_path / "m.json",
        {"auc": float("nan"), "v": [np.float32("nan"), 1.5], "note": "AUC undefined (NaN)"},
    )
    assert read_json(tmp_path / "m.json") == {"auc": None, "v": [None, 1.5], "note": "AUC undefined (NaN)"}
