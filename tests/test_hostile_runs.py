"""Run folders that hold hostile or odd names, interrupted runs, and resumes (issue 18, items 6, 13, 14)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SAMPLE

from tprobe.cli import main


def _manifest(root, donors=("lab/A", "lab/B", "lab/C"), per_class=4):
    """A CSV manifest of sample images whose donor names hold a slash."""
    rows = []
    for i, donor in enumerate(donors):
        for cls in ("activated", "quiescent"):
            for f in sorted((SAMPLE / f"donor_{i + 1}" / cls).glob("*.png"))[:per_class]:
                rows.append({"path": str(f), "label": cls, "donor": donor})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def slash_run(tmp_path_factory, tiny_reg):
    """A finished finetune run on donors named lab/A, lab/B, lab/C, started with a relative `--model ./m`."""
    root = tmp_path_factory.mktemp("slash")
    shutil.copytree(tiny_reg, root / "m")
    manifest = _manifest(root)
    args = [
        "finetune",
        "--model",
        "./m",
        "--data",
        str(manifest),
        "--pool",
        "cls",
        "--freeze",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--saliency-n",
        "2",
        "--out",
        "runs",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        r = CliRunner().invoke(main, args)
    return root, r


@pytest.mark.refuses("a donor name with a slash (written inside the run, never as a path)")
def test_finetune_with_a_slash_in_donor_names_writes_inside_the_run(slash_run):
    root, r = slash_run
    assert r.exit_code == 0, r.output
    run = next((root / "runs").iterdir())
    pngs = sorted(p.name for p in run.glob("saliency_*.png"))
    assert len(pngs) == 3 and all(p.startswith("saliency_lab-") for p in pngs), pngs
    assert not (run / "saliency_lab").exists()  # no sub-folder made from the donor name


def test_resume_accepts_an_unmodified_run_started_with_a_relative_model(slash_run, monkeypatch):
    root, _ = slash_run
    run = next((root / "runs").iterdir())
    monkeypatch.chdir(root)
    r = CliRunner().invoke(main, ["finetune", "--resume", str(run), "--saliency-n", "0"])
    assert r.exit_code == 0, r.output
    assert "other options" not in r.output


def test_resume_accepts_a_run_started_with_an_alias(tmp_path, tiny_reg, monkeypatch):
    import tprobe.models.backbones as backbones

    monkeypatch.setitem(backbones.ALIASES, "tiny-test-alias", str(tiny_reg))
    monkeypatch.chdir(tmp_path)
    manifest = _manifest(tmp_path, donors=("d1", "d2", "d3"), per_class=3)
    args = [
        "finetune",
        "--model",
        "tiny-test-alias",
        "--data",
        str(manifest),
        "--pool",
        "cls",
        "--freeze",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--saliency-n",
        "0",
        "--out",
        "runs",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").iterdir())
    r = CliRunner().invoke(main, ["finetune", "--resume", str(run), "--saliency-n", "0"])
    assert r.exit_code == 0, r.output


@pytest.mark.refuses("a received run whose donor names point outside it (saliency)")
@pytest.mark.parametrize("donor", ["/../../x", "../../escaped", "a/../../../b"])
def test_saliency_never_writes_outside_a_received_run(slash_run, tmp_path, donor):
    root, _ = slash_run
    src = next((root / "runs").iterdir())
    run = tmp_path / "nest" / "received"
    shutil.copytree(src, run)
    for p in run.glob("saliency_*.png"):
        p.unlink()
    pred = pd.read_parquet(run / "predictions.parquet")
    pred["donor"] = donor
    pred.to_parquet(run / "predictions.parquet", index=False)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the run records --data relative to where it was made
        r = CliRunner().invoke(main, ["saliency", "--run", str(run), "--n", "2"])
    assert r.exit_code == 0, r.output
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new and all(p.parent == run and p.name.startswith("saliency_") for p in new), new
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "escaped.png").exists()


# probe runs on a small synthetic feature set (no model, seconds) ------------------------------
def _features(name="feats", n=60, one_class_donor=False):
    import numpy as np

    from tprobe.features.sources import FeatureSet

    rng = np.random.default_rng(0)
    label = np.arange(n) % 2
    donor = np.array([f"donor_{i % 3}" for i in range(n)])
    if one_class_donor:
        label[donor == "donor_0"] = 1
    meta = pd.DataFrame(
        {
            "image_id": [f"i{i}_orig" for i in range(n)],
            "path": "x",
            "label": label,
            "donor": donor,
            "group": [f"i{i}" for i in range(n)],
            "view": "orig",
        }
    )
    X = rng.normal(size=(n, 5)).astype(np.float32) + label[:, None]
    return FeatureSet(X, meta, {"kind": "table", "name": name})


def _probe_run(out, name="feats", **kw):
    from tprobe.probing.run import ProbeRun

    return ProbeRun(n_boot=10, n_jobs=1, **kw).fit(_features(name)).save(out)


@pytest.mark.refuses("a run folder whose head.skops is missing")
def test_a_missing_head_file_is_named_as_missing_not_blamed_on_no_final_head(tmp_path):
    from tprobe.errors import TprobeError
    from tprobe.probing.run import load_head

    run = _probe_run(tmp_path)
    (run / "head.skops").unlink()
    with pytest.raises(TprobeError, match="missing from the run folder") as err:
        load_head(run)
    assert "--no-final-head" not in str(err.value)


@pytest.mark.refuses("a run record naming a head file outside the run")
def test_a_head_file_outside_the_run_is_refused(tmp_path):
    import json

    from tprobe.errors import TprobeError
    from tprobe.probing.run import load_head

    run = _probe_run(tmp_path / "runs")
    shutil.copy(run / "head.skops", tmp_path / "outside.skops")
    cfg = json.loads((run / "config.json").read_text())
    cfg["head_file"] = "../../outside.skops"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TprobeError, match="outside"):
        load_head(run)


@pytest.mark.refuses("a sweep summary naming a run outside the sweep")
def test_a_sweep_summary_cannot_point_outside_the_sweep(tmp_path):
    from tprobe.errors import TprobeError
    from tprobe.probing.predict import resolve_run

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    _probe_run(tmp_path / "elsewhere")
    pd.DataFrame({"run": ["../elsewhere"], "roc_auc_mean": [0.9]}).to_parquet(sweep / "summary.parquet")
    with pytest.raises(TprobeError, match="outside"):
        resolve_run(sweep)


@pytest.mark.refuses("a damaged sweep summary.parquet")
def test_a_damaged_sweep_summary_is_one_line(tmp_path):
    from tprobe.errors import TprobeError
    from tprobe.probing.predict import resolve_run

    (tmp_path / "summary.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TprobeError, match="summary.parquet: unreadable"):
        resolve_run(tmp_path)
    r = CliRunner().invoke(main, ["predict", "--run", str(tmp_path), str(tmp_path)])
    assert r.exit_code == 2 and "unexpected" not in r.output and len(r.output.strip().splitlines()) == 1


def test_a_dollar_sign_in_a_name_is_drawn_as_text(tmp_path):
    runs = tmp_path / "runs"
    _probe_run(runs, name="m$\\bad{$x")  # mathtext would fail to parse this title and legend
    _probe_run(runs, name="plain")
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "donor_auc.png").exists()


@pytest.mark.refuses("an interrupted run in a report folder (listed as incomplete; the report goes on)")
def test_an_interrupted_run_is_listed_as_incomplete_and_the_report_goes_on(tmp_path):
    runs = tmp_path / "runs"
    done = _probe_run(runs, name="done")
    cut = _probe_run(runs, name="cut")
    (cut / "per_donor.parquet").unlink()  # config and metrics written, results not
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert f"incomplete run {cut}" in r.output
    summary = pd.read_parquet(tmp_path / "rep" / "summary.parquet")
    assert summary["run_name"].tolist() == [done.name]


def test_a_one_class_donor_prints_its_note():
    from tprobe.probing.run import ProbeRun

    run = ProbeRun(n_boot=10, n_jobs=1, final_head=False).fit(_features(one_class_donor=True))
    table = run.table()
    note = table.set_index("donor").loc["donor_0", "note"]
    assert "single-class donor" in note
    assert table.set_index("donor").loc["donor_1", "note"] == ""


def test_probe_records_the_data_it_was_given(tmp_path):
    import json

    import numpy as np
    from conftest import copy_subset

    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess

    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=4)
    src = preprocess(discover(data)).manifest.query("view == 'orig'")
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "FileName": src["path"].map(lambda p: p.split("/")[-1]),
            "f1": rng.normal(size=len(src)),
            "f2": src["entropy"],
        }
    )
    table.to_csv(tmp_path / "feats.csv", index=False)
    r = CliRunner().invoke(
        main,
        [
            "probe",
            "--features",
            str(tmp_path / "feats.csv"),
            "--data",
            str(data),
            "--bootstrap",
            "10",
            "--no-final-head",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "config.json").read_text())["data"] == str(data)


def test_curve_with_the_mlp_head_fits_one_and_two_cells_per_class():
    from tprobe.science.curve import LabelCurve

    c = LabelCurve(head="mlp", shots=(1, 2, "all"), repeats=2).fit(_features(n=36))
    res = c.results_
    assert set(res["shots"]) == {"1", "2", "all"}
    assert (res.loc[res["shots"] == "1", "n_train_cells"] == 2).all()
    assert res["roc_auc"].notna().all()


@pytest.mark.refuses("a run figure linked to a file outside the run (not embedded)")
def test_report_does_not_embed_a_figure_linked_from_outside_the_run(tmp_path):
    runs = tmp_path / "runs"
    run = _probe_run(runs, name="linked")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG SECRET-BYTES")
    (run / "roc.png").unlink()
    (run / "roc.png").symlink_to(secret)
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    import base64

    assert (
        base64.b64encode(secret.read_bytes()).decode()[:16]
        not in (tmp_path / "rep" / "report.html").read_text()
    )


def test_a_run_file_rewrite_that_fails_on_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    """Fine-tuning rewrites config.json after its last fold, when checkpoints may have filled the disk: a
    write that fails there leaves the record whole (before: cut, so `finetune --resume` refused the run
    as not valid JSON and every trained fold was lost)."""
    import errno
    from pathlib import Path

    from tprobe.runs.record import read_json, write_json

    path = tmp_path / "config.json"
    write_json(path, {"command": "finetune", "options": {"pool": "cls"}, "n": 1})

    def disk_full(self, data, *a, **kw):
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", disk_full)
        with pytest.raises(OSError):
            write_json(path, {"command": "finetune", "options": {"pool": "cls"}, "n": 2})
    assert read_json(path) == {"command": "finetune", "options": {"pool": "cls"}, "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
