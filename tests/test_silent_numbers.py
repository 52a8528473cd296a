"""Silent wrong numbers in probing and reporting (second review): each case is refused or counted, never scored."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import copy_subset, donor_features

from tprobe.errors import TprobeError
from tprobe.features.sources import FeatureSet


# ---- 1. --all-table-rows: unreadable and duplicate images are never scored ------------------------------
def test_all_table_rows_never_scores_unreadable_or_duplicate_images(tmp_path):
    """An unreadable image (no image id, no group) and a duplicate file (another image's cell) were scored
    with --all-table-rows: a row with an empty id and group, and one cell counted twice."""
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.features.sources import from_table, table_note

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2"), per_class=3)
    first = sorted((data / "donor_1" / "activated").glob("*.png"))[0]
    shutil.copy(first, data / "donor_2" / "activated" / "copy_of_first.png")  # the same cell, another donor
    (data / "donor_2" / "quiescent" / "broken.png").write_bytes(b"not a png")
    manifest = preprocess(discover(data), progress=False).manifest
    orig = manifest[manifest["view"] == "orig"]
    assert set(orig["drop_reason"]) >= {"unreadable", "duplicate"}
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "FileName": orig["path"].map(lambda p: "/".join(p.split("/")[-3:])).to_numpy(),
            "Intensity_A": rng.normal(size=len(orig)),
            "Texture_B": rng.normal(size=len(orig)),
        }
    )
    table.to_csv(tmp_path / "cp.csv", index=False)
    fs = from_table(tmp_path / "cp.csv", manifest, all_rows=True)
    assert (fs.meta["image_id"] != "").all() and (fs.meta["group"] != "").all()
    assert not fs.meta["group"].duplicated().any()  # each cell scored once
    assert len(fs.meta) == len(orig) - 2
    unused = fs.source.unused_rows
    assert unused["filtered"] == {"activated": 1, "quiescent": 1}
    assert unused["not_scorable"] == {"duplicate": 1, "unreadable": 1}
    note = " ".join(table_note(fs.source))
    assert "2 name unreadable or duplicate images" in note and "never scored" in note
    # the same rows without --all-table-rows: filtered, as before
    plain = from_table(tmp_path / "cp.csv", manifest)
    assert len(plain.meta) == int(orig["kept"].sum()) and "not_scorable" not in plain.source.unused_rows
    # a manifest saved without drop_reason: the ids tell
    fs2 = from_table(tmp_path / "cp.csv", manifest.drop(columns="drop_reason"), all_rows=True)
    assert fs2.meta["image_id"].tolist() == fs.meta["image_id"].tolist()
    assert fs2.source.unused_rows == unused


# ---- 2. one donor: no split holds a donor out ----------------------------------------------------------
def _features(n_donors=4, cells=20, seed=0, donor=None, labels=(0, 1)):
    """Two shifted classes per donor (``labels``: the two values written to the label column); every row
    in donor ``donor`` when it is given."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(1, n_donors + 1):
        for c in range(cells):
            k = c % 2
            X.append(rng.normal(0, 1, 6) + 1.0 * k)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "path": f"donor_{d}/c{c}.png",
                    "label": labels[k],
                    "donor": donor or f"donor_{d}",
                    "group": f"d{d}c{c}",
                    "view": "orig",
                }
            )
    return FeatureSet(np.asarray(X, np.float32), pd.DataFrame(rows), {"kind": "table", "name": "syn"})


ONE_DONOR = (
    r"the data has one donor \(donor_unknown\), so no split holds a donor out.*give each image its donor"
)
SPLITS = [
    ("leave-one-donor-out", {}),
    ("group-kfold", {"n_splits": 2}),
    ("test-donor", {"test_donor": "donor_unknown"}),
]


@pytest.mark.refuses(
    "data from a single donor (probe, curve, baselines, finetune: no split holds a donor out)"
)
@pytest.mark.parametrize("split, kw", SPLITS)
def test_one_donor_is_refused_by_probe_and_curve_with_the_fix(split, kw):
    """With every image in one donor, leave-one-donor-out pointed to group-kfold, which check_plan then
    refused as 'donor on both sides'; test-donor stopped on an IndexError (nothing left to train on)."""
    from tprobe.probing.run import ProbeRun
    from tprobe.science.curve import LabelCurve

    fs = _features(donor="donor_unknown")
    with pytest.raises(TprobeError, match=ONE_DONOR):
        ProbeRun(split=split, final_head=False, **kw).fit(fs)
    if split != "group-kfold":  # curves hold out whole donors only
        with pytest.raises(TprobeError, match=ONE_DONOR):
            LabelCurve(shots=(1, "all"), repeats=1, split=split, test_donor=kw.get("test_donor")).fit(fs)


def test_check_plan_says_a_one_donor_plan_has_one_donor():
    from tprobe.probing.evaluate import Fold, check_plan

    meta = _features(donor="donor_unknown").meta
    idx = np.arange(len(meta))
    plan = [Fold(0, ["donor_unknown"], idx[idx % 2 == 0], idx[idx % 2 == 1])]  # cells split, one donor
    with pytest.raises(TprobeError, match=ONE_DONOR) as exc:
        check_plan(plan, meta)
    assert "\n" not in str(exc.value)


@pytest.mark.refuses("a manifest without donors given to probe")
def test_cli_probe_refuses_a_manifest_without_donors_in_one_line(tmp_path):
    from click.testing import CliRunner

    from tprobe.cli import main
    from tprobe.data.dataset import DEFAULT_DATA

    paths = [
        p
        for d in ("donor_1", "donor_2")
        for c in ("activated", "quiescent")
        for p in sorted((DEFAULT_DATA / d / c).glob("*.png"))[:4]
    ]
    pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]}).to_csv(
        tmp_path / "manifest.csv", index=False
    )
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {"FileName": ["/".join(p.parts[-3:]) for p in paths], "Intensity_A": rng.normal(size=len(paths))}
    ).to_csv(tmp_path / "cp.csv", index=False)
    base = ["--features", str(tmp_path / "cp.csv"), "--data", str(tmp_path / "manifest.csv")]
    for args in (
        ["probe", *base, "--no-final-head", "--out", str(tmp_path / "runs")],
        ["probe", *base, "--split", "group-kfold", "--folds", "2", "--out", str(tmp_path / "runs")],
        ["curve", *base, "--shots", "1", "--repeats", "1", "--out", str(tmp_path / "curve")],
    ):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        last = res.output.strip().splitlines()[-1]  # after the table's notes: the refusal, one line
        assert "give each image its donor" in last and res.output.count("give each image") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))


@pytest.mark.refuses(
    "a run whose random projection, rebuilt at predict, differs from the trained one (its checksum)"
)
# ---- 3. predict's rebuilt random projection is checked against the run's checksum ------------------------
def test_a_rebuilt_projection_that_differs_from_the_trained_one_is_refused(tmp_path, monkeypatch):
    """predict rebuilt the projection from scikit-learn and the seed alone: another random stream (a
    scikit-learn change) would have changed every prediction without a word."""
    import json

    import tprobe.probing.run as run_module
    from tprobe.probing.heads import projection
    from tprobe.probing.run import ProbeRun, load_head

    fs = _features(n_donors=3)
    fitted = ProbeRun(max_dims=4, n_boot=10).fit(fs)
    run = fitted.save(tmp_path)
    record = json.loads((run / "config.json").read_text())
    assert record["projection"]["checksum"].startswith("xxh3_128:")
    # the same matrix: loads, and scores as the fitted model does
    assert np.allclose(load_head(run).predict_proba(fs.X), fitted.final_["model"].predict_proba(fs.X))

    def other_stream(n_features, n_components, seed):  # another scikit-learn: another matrix, same seed
        return projection(n_features, n_components, seed + 1)

    monkeypatch.setattr(run_module, "projection", other_stream)
    with pytest.raises(
        TprobeError, match=r"random projection rebuilt from its seed .* is not the one"
    ) as exc:
        load_head(run)
    assert "\n" not in str(exc.value)
    del record["projection"]["checksum"]  # a run written before the checksum: loads as before
    (run / "config.json").write_text(json.dumps(record))
    assert load_head(run).predict_proba(fs.X).shape == (len(fs.X), 2)


# ---- 4. report: n_donors counts the donors of the means; a one-donor run is never the unmarked best ----------
def _uneven(one_class=(), seed=0):
    """Four donors; donor_1's classes far apart (AUC ~1 when it is held out), the others' barely."""
    shift = lambda d: 4.0 if d == 1 else 0.3  # noqa: E731
    return donor_features(4, 30, seed, one_class, shift, {"kind": "table", "name": "uneven"})


def test_report_n_donors_is_the_donors_its_means_cover(tmp_path):
    """n_donors counted one-class held-out donors, whose metrics every mean beside it leaves out."""
    from tprobe.probing.run import ProbeRun
    from tprobe.runs.report import build_report, collect_runs

    fitted = ProbeRun(n_boot=10, final_head=False).fit(_uneven(one_class=("donor_4",)))
    fitted.save(tmp_path / "runs", "lodo")
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert row["n_donors"] == fitted.summary_["roc_auc"]["n_donors"] == 3
    assert row["n_donors"] == fitted.summary_["accuracy"]["n_donors"]
    assert row["n_held_out"] == 4
    table = build_report(tmp_path / "runs").table
    assert table[["n_donors", "n_held_out"]].iloc[0].tolist() == [3, 4]


def test_report_best_run_is_never_a_one_donor_run_unannounced(tmp_path):
    """The headline's 'best run' was the highest mean AUC whatever its donors: a test-donor run on the
    easiest donor (one AUC, no spread) beat every leave-one-donor-out run."""
    from tprobe.probing.run import ProbeRun
    from tprobe.runs.report import build_report

    fs = _uneven()
    one = ProbeRun(split="test-donor", test_donor="donor_1", n_boot=10, final_head=False).fit(fs)
    lodo = ProbeRun(n_boot=10, final_head=False).fit(fs)
    assert one.summary_["roc_auc"]["mean"] > lodo.summary_["roc_auc"]["mean"]  # the trap is set
    one.save(tmp_path / "runs", "easy-donor")
    lodo.save(tmp_path / "runs", "all-donors")
    report = build_report(tmp_path / "runs")
    assert "all-donors" in report.headline[0] and "easy-donor" not in report.headline[0]
    assert any("Not ranked" in line and "easy-donor" in line for line in report.headline)
    # only one-donor runs: the best is named, with the warning
    only = tmp_path / "only"
    one.save(only, "easy-donor")
    lines = build_report(only).headline
    assert "easy-donor" in lines[0] and any("ranks nothing" in line for line in lines)


@pytest.mark.refuses("labels other than 0/1 in a FeatureSet (probe, curve)")
# ---- 5. labels other than 0/1 are one line ---------------------------------------------------------------
@pytest.mark.parametrize("labels", [(1, 2), (-1, 1), ("quiescent", "activated"), (0.0, 0.5)])
def test_labels_other_than_0_and_1_are_one_line(labels):
    """A hand-built FeatureSet with labels 1/2, -1/1 or text stopped on pandas' or scikit-learn's own errors."""
    from tprobe.probing.run import ProbeRun
    from tprobe.science.curve import LabelCurve

    fs = _features(labels=labels)
    for fit in (
        lambda: ProbeRun(n_boot=10, final_head=False).fit(fs),
        lambda: LabelCurve(shots=(1, "all"), repeats=1).fit(fs),
    ):
        with pytest.raises(TprobeError, match=r"labels must be 0 \(quiescent\) or 1 \(activated\)") as exc:
            fit()
        assert "\n" not in str(exc.value)
    ok = _features(labels=(False, True))  # booleans and 0.0/1.0 are 0 and 1
    assert ProbeRun(n_boot=10, final_head=False).fit(ok).summary_["roc_auc"]["mean"] > 0.5
