"""The public API's training calls: tprobe.finetune, tprobe.baseline, tprobe.saliency, end to end on tiny data."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import copy_subset

import tprobe
from tprobe import api
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.runs.record import RunRecord

FAST = dict(pool="cls", freeze=True, epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return copy_subset(
        tmp_path_factory.mktemp("three"), donors=("donor_1", "donor_3", "donor_6"), per_class=3
    )


@pytest.fixture(scope="module")
def finished(three, tiny_reg, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return api.finetune(three, tiny_reg, out=out, saliency_n=2, log=lambda row: None, **FAST)


@pytest.mark.parametrize("name", ["finetune", "baseline", "saliency"])
def test_the_training_calls_are_public(name):
    assert getattr(tprobe, name) is getattr(api, name) and name in api.__all__


def test_finetune_returns_the_fitted_run_and_writes_its_folder(finished, tiny_reg):
    job = finished
    run = job.run_
    for name in (
        "config.json",
        "metrics.json",
        "predictions.parquet",
        "curves.csv",
        "curves.png",
        "fold0.pt",
    ):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["fold0.pt", "fold1.pt", "fold2.pt"]
    assert set(job.evaluation_.per_donor["donor"]) == {"donor_1", "donor_3", "donor_6"}
    assert job.model.random_init and RunRecord.load(run).random_weights  # a plumbing check, marked so
    assert len(job.saliency_) == 3 and all(p.parent == run and p.exists() for p in job.saliency_)
    record = RunRecord.load(run)
    assert record.command == "finetune" and record.options["train"]["epochs"] == 1
    assert record.options["pool"] == "cls" and record.options["freeze"] is True
    assert json.loads((run / "metrics.json").read_text())["summary"]["roc_auc"]["mean"] is not None


def test_finetune_resume_keeps_the_recorded_options(finished):
    run = finished.run_
    before = pd.read_parquet(run / "predictions.parquet")
    job = api.finetune(resume=run, pool="mean", epochs=5, saliency_n=0, log=lambda row: None)
    assert job.run_ == run and job.pool == "cls" and job.train.epochs == 1 and job.saliency_ == []
    assert len(list(run.parent.iterdir())) == 1  # no new run folder
    pd.testing.assert_frame_equal(pd.read_parquet(run / "predictions.parquet"), before)  # epochs kept


def test_finetune_takes_preprocessed_data_and_a_train_config(tiny_reg, tmp_path):
    from tprobe.data.preprocess import PreprocessConfig
    from tprobe.train.loop import TrainConfig

    # donors whose cells on a 28 px canvas hold both classes: with donor_1 (quiescent cells only there) a
    # fold trained on one class, which the loop refuses
    data = copy_subset(tmp_path / "data", donors=("donor_3", "donor_4", "donor_6"), per_class=3)
    pre = preprocess(discover(data), PreprocessConfig(canvas=28, views="orig"))
    job = api.finetune(
        pre,
        tiny_reg,
        out=tmp_path,
        pool="cls",
        freeze=True,
        train=TrainConfig(epochs=1, batch_size=4, pos_weight="none"),
        saliency_n=0,
        log=lambda row: None,
    )
    record = RunRecord.load(job.run_)
    assert record.preprocess_config().canvas == 28 and record.options["train"]["pos_weight"] is None
    assert record.data is None and job.train.batch_size == 4


def test_finetune_resume_refuses_a_run_of_another_command(tmp_path):
    from tprobe.features.sources import FeatureSource

    run = tmp_path / "probe-run"
    run.mkdir()
    RunRecord(command="probe", name="p", features=FeatureSource(kind="pixels", name="pixels")).save(run)
    with pytest.raises(TprobeError, match="is not a `tprobe finetune` run"):
        api.finetune(resume=run)
    r = CliRunner().invoke(main, ["finetune", "--resume", str(run)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output  # no "resuming" line first


@pytest.mark.parametrize(
    "train, says", [(dict(pos_weight="lots"), "--pos-weight 'lots'"), (dict(precision="fp8"), "--precision")]
)
def test_finetune_refuses_bad_training_options_in_one_line(train, says, tiny_reg, tmp_path):
    with pytest.raises(TprobeError, match=says):
        api.finetune(tmp_path, tiny_reg, **train)


def test_saliency_writes_grids_inside_the_run(finished):
    paths = api.saliency(finished.run_, n=2)
    assert sorted(p.name for p in paths) == [
        "saliency_donor_1.png",
        "saliency_donor_3.png",
        "saliency_donor_6.png",
    ]
    assert all(p.parent == finished.run_ for p in paths)


def test_baseline_returns_one_run_per_name(three, tmp_path):
    runs = api.baseline("frequency", three, out=tmp_path, n_boot=20)
    assert len(runs) == 1
    run, ev = runs[0]  # unpacks as (run folder, evaluation)
    assert run.parent == tmp_path and (run / "metrics.json").exists()
    assert runs[0].name == "frequency" and not runs[0].random_weights
    assert ev.summary["roc_auc"]["mean"] == pytest.approx(0.5)  # the frequency classifier ranks nothing
    assert RunRecord.load(run).options == {
        "baseline": "frequency",
        "split": "leave-one-donor-out",
        "test_donor": None,
        "seed": 0,
    }


def test_baseline_on_preprocessed_data_with_a_test_donor(three, tmp_path):
    pre = preprocess(discover(three))
    (res,) = api.baseline("pixel-logreg", pre, out=tmp_path, split="test-donor", test_donor="3")
    assert list(res.evaluation.per_donor["donor"]) == ["donor_3"]
    assert json.loads((res.path / "metrics.json").read_text())["folds"][0]["test_donor"] == "donor_3"


def test_baseline_refuses_an_unknown_name():
    with pytest.raises(TprobeError, match="--name 'resnet' is not one of frequency, pixel-logreg"):
        api.baseline("resnet")


@pytest.mark.refuses("a LeNet baseline whose folds leave one training donor (early stopping needs two)")
def test_lenet_with_one_training_donor_per_fold_is_one_line(small_data, tmp_path):
    """Two donors leave each leave-one-donor-out fold one training donor, all taken for early stopping:
    LeNet used to crash on an empty training set (ValueError from the DataLoader)."""
    with pytest.raises(TprobeError, match="lenet needs at least 2 training donors per fold"):
        api.baseline("lenet", small_data, out=tmp_path, epochs=1)
    r = CliRunner().invoke(main, ["baseline", "--name", "lenet", "--epochs", "1", "--data", str(small_data)])
    assert r.exit_code == 2 and "add donors" in r.output and len(r.output.strip().splitlines()) == 1


def test_one_check_of_training_donors_for_every_trained_model():
    from tprobe.probing.evaluate import check_train_donors, split_plan

    meta = pd.DataFrame({"donor": ["a", "a", "b", "b"], "group": ["1", "2", "3", "4"]})
    plan = split_plan(meta)
    with pytest.raises(TprobeError) as err:
        check_train_donors(plan, meta, what="fine-tuning", split="leave-one-donor-out")
    assert str(err.value) == (
        "fine-tuning needs at least 2 training donors per fold (one for early stopping, one or more to "
        "train on); with split 'leave-one-donor-out' and 2 donor(s) (a, b) fold 0 has 1 — add donors"
    )
    three = pd.DataFrame({"donor": ["a", "b", "c"], "group": ["1", "2", "3"]})
    check_train_donors(split_plan(three), three, what="lenet", split="leave-one-donor-out")  # passes
