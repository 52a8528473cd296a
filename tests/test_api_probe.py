"""tprobe.probe and tprobe.predict, the public API's probing calls, end to end on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import copy_subset

import tprobe
from tprobe import api
from tprobe.errors import TprobeError
from tprobe.probing.run import ProbeRun
from tprobe.probing.sweep import SweepResult, plan_sweep

FAST = {"n_boot": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 donors x 4 cells per class of the bundled sample."""
    return copy_subset(
        tmp_path_factory.mktemp("api-probe") / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=4
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory, data, tiny_reg):
    """The data through a tiny random DINOv2-with-registers (views: orig only)."""
    pre = tprobe.preprocess(data, views="orig", progress=False)
    from tprobe.cache.extract import extract

    cache = tmp_path_factory.mktemp("api-probe-cache")
    return extract(pre, tprobe.resolve_model(tiny_reg), cache=cache, progress=False).path


def test_the_names_resolve_at_the_top_level():
    assert tprobe.probe is api.probe and tprobe.predict is api.predict
    assert {"probe", "predict"} <= set(api.__all__)


def test_one_head_on_one_store_is_a_fitted_probe_run_saved_only_with_out(store, tmp_path):
    run = tprobe.probe(store, head="logreg", pool="cls", final_head=False, **FAST)
    assert isinstance(run, ProbeRun) and not hasattr(run, "path_")
    assert run.features_.source.pool == "cls" and len(run.per_donor_) == 3
    assert 0 <= run.summary_["roc_auc"]["mean"] <= 1
    saved = tprobe.probe(tprobe.open_store(store), pool="mean", out=tmp_path / "runs", seed=1, **FAST)
    assert saved.path_.parent == tmp_path / "runs" and (saved.path_ / "head.skops").exists()
    record = json.loads((saved.path_ / "config.json").read_text())
    assert record["options"]["seed"] == 1 and record["features"]["pool"] == "mean"


def test_several_heads_or_pools_are_a_sweep_with_its_summary(store, tmp_path):
    res = tprobe.probe(store, head=["logreg", "knn"], pool="all", out=tmp_path, final_head=False, **FAST)
    assert isinstance(res, SweepResult) and res.out.parent == tmp_path and not res.collected
    assert len(res.summary) == 10 and set(res.summary["head"]) == {"logreg", "knn"}  # 5 pools x 2 heads
    assert res.random_init  # the tiny model is random
    assert (res.out / "summary.parquet").exists() and len(res.runs) == 10
    # each run's own lines (per-donor table, notes, the random mark) are in its folder, from Python too
    details = (res.runs[0] / "details.txt").read_text()
    assert "RANDOM WEIGHTS" in details and "mean" in details and "grid" in details
    back = SweepResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.out == res.out and back.runs == res.runs and back.random_init
    pd.testing.assert_frame_equal(back.summary, res.summary, check_dtype=False)


def test_feature_sets_are_probed_as_they_are(store, tmp_path):
    sets = tprobe.feature_sets(stores=[store], pool="mean")
    run = tprobe.probe(sets[0], final_head=False, **FAST)
    assert run.features_ is sets[0]
    res = tprobe.probe([sets[0], sets[0]], out=tmp_path, final_head=False, **FAST)
    assert isinstance(res, SweepResult) and len(res.summary) == 2
    with pytest.raises(TprobeError, match="pool does not apply to a feature table or a FeatureSet"):
        tprobe.probe(sets, pool="cls")


@pytest.mark.refuses("a probe head or pool name that is not one")
def test_bad_names_and_options_are_refused_in_one_line(store):
    with pytest.raises(TprobeError, match=r"--head 'nope' is not one of logreg, .*prototype, all$"):
        tprobe.probe(store, head="nope")
    with pytest.raises(TprobeError, match=r"--pool 'max' is not one of cls, .*last4, all, layers$"):
        tprobe.probe(store, pool=["cls", "max"])
    with pytest.raises(TprobeError, match="unknown option\\(s\\) bootstrap"):
        tprobe.probe(store, bootstrap=10)


def test_the_sweep_plan_and_the_request_share_one_name_check(store, tmp_path):
    sweep = plan_sweep(store, ["cls"], ["logreg"], out=tmp_path)
    plan = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**plan, "heads": ["nope"]}))
    with pytest.raises(TprobeError, match=r"sweep.json: head 'nope' is not one of logreg, .*prototype$"):
        tprobe.probe(resume=sweep)


def test_resume_runs_the_missing_tasks_and_collects(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = plan_sweep(
        store, ["cls", "mean"], ["logreg"], out=tmp_path, probe_kwargs={**FAST, "final_head": False}
    )
    path = tprobe.probe(resume=sweep, sweep_task=1)
    assert path.parent == sweep and (path / "per_donor.parquet").exists()
    res = tprobe.probe(resume=sweep)
    assert res.collected and res.out == sweep and list(res.summary["pool"]) == ["cls", "mean"]
    assert path in res.runs
    with pytest.raises(TprobeError, match="--sweep-task i needs --resume SWEEP"):
        tprobe.probe(sweep_task=0)


def test_a_table_sweep_is_not_sent_to_slurm(tmp_path):
    (tmp_path / "t.csv").write_text("FileName,a\nx.png,1\n")
    with pytest.raises(TprobeError, match="without --executor slurm"):
        tprobe.probe(tmp_path / "t.csv", executor="slurm")
    assert not (tmp_path / "runs").exists()


def _table(data, path):
    pre = tprobe.preprocess(data, views="orig", progress=False)
    src = pre.manifest[pre.manifest["view"] == "orig"]
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "FileName": src["path"].map(lambda p: p.split("/")[-1]),
            "Intensity": src["total_intensity"] + rng.normal(size=len(src)),
            "Entropy": src["entropy"],
        }
    ).to_csv(path, index=False)
    return path


@pytest.mark.refuses("predict with a run trained on a feature table or raw pixels")
def test_predict_refuses_a_table_or_pixel_run_in_one_line(data, tmp_path):
    from tprobe.features.pixels import pixel_features

    table_run = tprobe.probe(_table(data, tmp_path / "cp.csv"), data=data, out=tmp_path / "runs", **FAST)
    assert table_run.features_.source.kind == "table"
    pixel_run = tprobe.probe(
        pixel_features(tprobe.preprocess(data, views="orig", progress=False)), out=tmp_path / "runs", **FAST
    )
    for run, what in ((table_run, "a feature table"), (pixel_run, "raw pixels")):
        with pytest.raises(TprobeError) as e:
            tprobe.predict(run.path_, data, out=tmp_path / "p.csv")
        line = str(e.value)
        assert "\n" not in line and f"was trained on {what}, not a feature store" in line
        assert "`tprobe predict` needs a run trained on a store" in line
    assert not (tmp_path / "p.csv").exists()


def test_predict_returns_the_table_and_writes_the_csv_with_out(store, data, tmp_path):
    run = tprobe.probe(store, out=tmp_path / "runs", **FAST)
    cache = store.parents[3]
    table = tprobe.predict(run.path_, data / "donor_1", cache=cache, threshold=0.0)
    kept = table[table["kept"]]
    assert len(table) == 8 and len(kept) and (kept["label"] == 1).all()  # threshold 0: every scored image
    assert not list(tmp_path.glob("*.csv")) and not list(run.path_.glob("predictions-*.csv"))
    out = tmp_path / "p.csv"
    again = tprobe.predict(run.path_, data / "donor_1", cache=cache, out=out)
    written = pd.read_csv(out)
    assert list(written.columns) == list(again.columns) and len(written) == 8
    np.testing.assert_allclose(written["p_activated"], again["p_activated"])
    np.testing.assert_allclose(again["p_activated"], table["p_activated"])


@pytest.mark.refuses(
    "a test donor with a split other than test-donor (library calls too; never recorded as used)"
)
def test_a_test_donor_that_does_not_apply_is_refused_not_recorded(store, tmp_path):
    with pytest.raises(TprobeError, match="applies to split 'test-donor' only"):
        tprobe.probe(store, pool="cls", head="logreg", test_donor="2", out=tmp_path / "runs", **FAST)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_preprocessed_object_is_accepted_as_data(store, data):
    pre = tprobe.preprocess(data, views="orig", progress=False)
    run = tprobe.probe(store, pool="cls", head="logreg", data=pre, **FAST)
    assert isinstance(run, ProbeRun) and len(run.per_donor_) == 3
    with pytest.raises(TprobeError, match="preprocessed already"):
        from tprobe.data.preprocess import PreprocessConfig, prepare

        prepare(pre, PreprocessConfig(views="six", canvas=224))


def test_predict_gives_a_dropped_duplicate_no_probability(store, data, tmp_path):
    """A copy of a scored image is dropped as a duplicate and, like every dropped image, has no probability
    (before: the scored copy's, beside an empty label, so counting probabilities counted it twice)."""
    import shutil
    from pathlib import Path

    run = tprobe.probe(store, out=tmp_path / "runs", **FAST)
    folder = tmp_path / "new"
    shutil.copytree(data / "donor_1", folder)
    first = tprobe.predict(run.path_, folder, cache=store.parents[3], threshold=0.0)
    scored = first[first["kept"]].iloc[0]
    src = Path(scored["path"])
    shutil.copy(src, src.with_name("copy_of_" + src.name))
    table = tprobe.predict(run.path_, folder, cache=store.parents[3], threshold=0.0)
    copy = table[table["path"].str.contains("copy_of_")].iloc[0]
    assert copy["drop_reason"] == "duplicate" and not copy["kept"]
    assert pd.isna(copy["p_activated"]) and pd.isna(copy["label"])
    assert table["p_activated"].notna().sum() == first["p_activated"].notna().sum()
