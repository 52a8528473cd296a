"""Issue 17 (statistics and reporting): honest intervals at small n, pre-declared comparisons,
within-class map chance, curve details, calibration and the report's caveats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import donor_features

from tprobe.probing.evaluate import METRICS, summarise
from tprobe.science.curve import all_label, curve_band
from tprobe.stats import CI_METHOD, t_interval


# ---- item 4: intervals honest at 6 donors ----------------------------------------------------
def _old_percentile_bootstrap(v: np.ndarray, rng, n_boot: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """The interval tprobe used before (percentile bootstrap over donors), for many donor sets at once."""
    sets, n = v.shape
    idx = rng.integers(n, size=(sets, n_boot, n))
    boots = v[np.arange(sets)[:, None, None], idx].mean(2)
    return np.percentile(boots, 2.5, axis=1), np.percentile(boots, 97.5, axis=1)


def test_t_interval_covers_at_six_donors_and_the_bootstrap_did_not():
    rng = np.random.default_rng(0)
    mu, sets, n = 0.85, 2000, 6  # 2,000 simulated sets of 6 donor AUCs from a known distribution
    v = rng.normal(mu, 0.06, size=(sets, n))
    t_cover = np.mean([lo <= mu <= hi for lo, hi in map(t_interval, v)])
    lo, hi = _old_percentile_bootstrap(v, rng)
    boot_cover = np.mean((lo <= mu) & (mu <= hi))
    assert t_cover >= 0.93, t_cover
    assert boot_cover < 0.90, boot_cover  # the defect: nominal 95%, about 86% at n = 6
    # summarise (the runs' CIs) uses the t-interval, and names the method in the metrics
    per = pd.DataFrame({m: v[0] for m in METRICS})
    s = summarise(per, n_boot=2000)  # n_boot still accepted (ignored)
    assert (s["roc_auc"]["ci_low"], s["roc_auc"]["ci_high"]) == pytest.approx(t_interval(v[0]))
    assert s["roc_auc"]["ci_method"] == CI_METHOD and "t" in CI_METHOD
    # by hand: mean ± 2.5706 sd / sqrt(6)
    half = 2.5705818 * v[0].std(ddof=1) / np.sqrt(6)
    assert s["roc_auc"]["ci_high"] - s["roc_auc"]["mean"] == pytest.approx(half, rel=1e-5)


def test_t_interval_needs_two_values():
    assert all(np.isnan(t_interval([0.8])))
    s = summarise(pd.DataFrame({m: [0.8, np.nan] for m in METRICS}))
    assert s["roc_auc"]["ci_low"] is None and s["roc_auc"]["n_donors"] == 1


def _curve_results(aucs: np.ndarray, shots="4") -> pd.DataFrame:
    D, R = aucs.shape
    return pd.DataFrame(
        [
            {
                "source": "s",
                "head": "logreg",
                "shots": shots,
                "k": 4,
                "repeat": r,
                "donor": f"donor_{d}",
                "roc_auc": aucs[d, r],
                "n_train_cells": 8,
            }
            for d in range(D)
            for r in range(R)
        ]
    )


def test_curve_band_is_the_t_interval_over_donor_means():
    rng = np.random.default_rng(1)
    aucs = rng.normal(0.8, 0.05, size=(6, 5))
    band = curve_band(_curve_results(aucs)).iloc[0]
    lo, hi = t_interval(aucs.mean(1))
    assert (band["low"], band["high"]) == pytest.approx((lo, hi)) and band["band_method"] == "t over donors"
    # coverage of the band at 6 donors (donor effect + draw noise), as for the runs
    cover = []
    for _ in range(400):
        a = 0.8 + rng.normal(0, 0.05, size=(6, 1)) + rng.normal(0, 0.03, size=(6, 5))
        b = curve_band(_curve_results(a)).iloc[0]
        cover.append(b["low"] <= 0.8 <= b["high"])
    assert np.mean(cover) >= 0.92


# ---- item 7: the curve's AP and its "all" tick -----------------------------------------------
def test_curve_ap_is_nan_for_a_one_class_donor():
    from tprobe.features.sources import FeatureSet
    from tprobe.science.curve import LabelCurve

    rng = np.random.default_rng(0)
    rows, X = [], []
    for d in range(3):
        for c in range(20):
            label = 1 if d == 2 else c % 2  # donor_3: every cell activated
            X.append(rng.normal(size=4) + label)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "label": label,
                    "donor": f"donor_{d + 1}",
                    "group": f"d{d}c{c}",
                    "view": "orig",
                }
            )
    fs = FeatureSet(np.asarray(X, np.float32), pd.DataFrame(rows), {"kind": "table", "name": "t"})
    res = LabelCurve(shots=(2, "all"), repeats=1).fit(fs).results_
    one = res[res["donor"] == "donor_3"]
    assert one["average_precision"].isna().all() and one["roc_auc"].isna().all()
    assert res.loc[res["donor"] != "donor_3", "average_precision"].notna().all()
    # per-class counts: the "all" fit for held-out donor_1 trains on donor_2 (10/10) + donor_3 (20 act)
    a = res[(res["shots"] == "all") & (res["donor"] == "donor_1")].iloc[0]
    assert (a["n_train_activated"], a["n_train_quiescent"]) == (30, 10)


def test_curve_all_tick_names_both_class_counts():
    res = pd.DataFrame(
        [
            {
                "source": "s",
                "head": "h",
                "shots": "all",
                "n_train_cells": 180,
                "n_train_activated": 120,
                "n_train_quiescent": 60,
            }
        ]
    )
    label = all_label(res, "s", "h")
    assert "120 act" in label and "60 qui" in label and "90" not in label  # not "~90/class"
    assert "180 cells" in all_label(res.drop(columns=["n_train_activated", "n_train_quiescent"]), "s", "h")


# ---- item 5 and the report's sentences: comparisons declared in advance ----------------------
def _run(root, name, cfg, aucs):
    run = root / name
    run.mkdir(parents=True)
    donors = [f"donor_{i}" for i in range(1, len(aucs) + 1)]
    pd.DataFrame(
        {"donor": donors, "n": 50, "roc_auc": aucs, "average_precision": aucs, "accuracy": aucs}
    ).to_parquet(run / "per_donor.parquet", index=False)
    summ = {
        m: {"mean": float(np.mean(aucs)), "sd": float(np.std(aucs, ddof=1))}
        for m in ("roc_auc", "average_precision", "accuracy")
    }
    folds = [{"test_donor": d, "n": 50} for d in donors]
    (run / "metrics.json").write_text(json.dumps({"summary": summ, "folds": folds}))
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def _probe(head, pool="cls", model="dinov2-small"):
    return {
        "command": "probe",
        "head": head,
        "split": "leave-one-donor-out",
        "features": {"kind": "store", "model": model, "pool": pool},
    }


FREQ = {"command": "baseline", "baseline": "frequency", "features": {"kind": "baseline", "name": "frequency"}}
WORSE = [0.70, 0.72, 0.69, 0.75, 0.71, 0.73]


@pytest.mark.refuses("a --reference that matches no run, or several")
def test_report_compares_with_the_declared_reference_not_the_winner(tmp_path):
    from click.testing import CliRunner

    from tprobe.cli import main
    from tprobe.runs.report import BATCH_CONFOUND, write_report

    runs = tmp_path / "runs"
    _run(runs, "a-xgb-best", _probe("xgboost"), [0.95, 0.93, 0.96, 0.94, 0.97, 0.92])
    _run(runs, "b-logreg-cls", _probe("logreg"), [0.85, 0.86, 0.88, 0.90, 0.80, 0.87])
    _run(runs, "c-mlp", _probe("mlp"), WORSE)
    _run(runs, "d-freq", FREQ, [0.5] * 6)
    res = write_report(runs, tmp_path / "rep")
    assert res["reference"] == str(runs / "b-logreg-cls")  # not a-xgb-best, the best mean AUC
    pairs = pd.read_csv(tmp_path / "rep" / "paired.csv")
    auc = pairs[pairs["metric"] == "roc_auc"].set_index("run")
    assert set(auc.index) == {str(runs / n) for n in ("a-xgb-best", "c-mlp", "d-freq")}
    assert (auc["reference"] == str(runs / "b-logreg-cls")).all()
    assert auc.loc[str(runs / "a-xgb-best"), "mean_diff"] > 0  # the winner is compared, against the reference
    assert auc.loc[str(runs / "c-mlp"), "p"] == pytest.approx(1 / 32)
    # Holm across the three comparisons: the smallest p (1/32, tied twice) times 3
    assert auc["p_holm"].min() == pytest.approx(3 / 32)
    md, page = (tmp_path / "rep" / "report.md").read_text(), (tmp_path / "rep" / "report.html").read_text()
    for text in (md, page):
        assert "b-logreg-cls" in text and "before the results were read" in text
        assert "pre-declared reference" in text
        assert "2/2^6 = 0.031" in text and "Holm across 3 comparisons" in text
        assert "every imaging batch holds one class" in text
        assert "best run" not in text.split("Paired comparisons")[1].split("\n")[0]
    assert BATCH_CONFOUND in md
    # --reference names another run; a name matching none is one line, exit 2
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "r2"), "--reference", "c-mlp"])
    assert r.exit_code == 0, r.output
    assert (
        "c-mlp, named with --reference (a comparison to fix before looking" in r.output
        and "2/2^6 = 0.031" in r.output
    )
    r = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "r3"), "--reference", "nope"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--reference" in r.output, (
        r.output
    )
    assert not (tmp_path / "r3").exists()


def test_default_reference_falls_back_in_a_fixed_order(tmp_path):
    from tprobe.runs.report import choose_reference, collect_runs

    runs = tmp_path / "runs"
    _run(runs, "a-knn", _probe("knn"), [0.9] * 5 + [0.95])
    _run(runs, "b-logreg-mean", _probe("logreg", pool="mean"), WORSE)
    _run(runs, "c-freq", FREQ, [0.5] * 6)
    ref, why = choose_reference(collect_runs(runs))
    assert ref == str(runs / "c-freq") and "frequency baseline" in why
    (runs / "c-freq" / "metrics.json").unlink()
    ref, why = choose_reference(collect_runs(runs))
    assert ref == str(runs / "a-knn") and "neither" in why  # the first folder by name, said so
    # a random-weights logreg on CLS is never the default reference
    _run(runs, "0-random", {**_probe("logreg", model="models/random-vits14"), "random_init": True}, WORSE)
    assert choose_reference(collect_runs(runs))[0] == str(runs / "a-knn")


def test_donors_bound_line_is_computed_from_n():
    from tprobe.runs.report import donors_bound_line

    assert "2/2^6 = 0.031" in donors_bound_line(6)
    assert "2/2^4 = 0.125" in donors_bound_line(4, 3) and "0.375" in donors_bound_line(4, 3)


# ---- calibration -----------------------------------------------------------------------------
def test_brier_and_ece_by_hand():
    from tprobe.stats import brier_score, expected_calibration_error, reliability_table

    y, p = [0, 0, 1, 1], [0.05, 0.15, 0.85, 0.95]
    assert brier_score(y, p) == pytest.approx((0.05**2 + 0.15**2 + 0.15**2 + 0.05**2) / 4)
    assert expected_calibration_error(y, p) == pytest.approx((0.05 + 0.15 + 0.15 + 0.05) / 4)
    # two cells in one bin: |mean label - mean p| of the bin, weighted by its share of cells
    assert expected_calibration_error([0, 1], [0.52, 0.58]) == pytest.approx(abs(0.5 - 0.55))
    t = reliability_table([1], [1.0])
    assert len(t) == 10 and t.loc[9, "n"] == 1  # p = 1 falls in the last of 10 equal-width bins


def _synthetic(n_donors=3, cells=30, seed=0, source=None):
    return donor_features(n_donors, cells, seed, shift=1.2, source=source)


def test_probe_run_reports_calibration_and_draws_a_reliability_diagram(tmp_path, monkeypatch):
    import tprobe.plot.figures
    from tprobe.probing.run import ProbeRun
    from tprobe.runs.report import write_report

    run = ProbeRun(head="logreg", final_head=False).fit(_synthetic())
    per = run.per_donor_
    for donor, d in run.predictions_.groupby("donor"):
        row = per.set_index("donor").loc[donor]
        assert row["brier"] == pytest.approx(np.mean((d["p_activated"] - d["label"]) ** 2))
        assert 0 <= row["ece"] <= 1
    s = run.summary_
    assert (
        s["brier"]["mean"] == pytest.approx(per["brier"].mean()) and "10 equal-width bins" in s["ece"]["note"]
    )
    assert "fixed threshold 0.5" in s["accuracy"]["note"] and "fixed threshold 0.5" in s["f1"]["note"]
    assert {"brier", "ece"} <= set(run.table().columns)
    path = run.save(tmp_path / "runs")
    assert (path / "reliability.png").stat().st_size > 0
    met = json.loads((path / "metrics.json").read_text())
    assert met["summary"]["ece"]["mean"] == pytest.approx(per["ece"].mean())
    assert met["summary"]["roc_auc"]["ci_method"].startswith("t over donors")
    res = write_report(tmp_path / "runs", tmp_path / "rep")
    assert {"brier", "ece"} <= set(res["table"].columns)
    md, page = (tmp_path / "rep" / "report.md").read_text(), (tmp_path / "rep" / "report.html").read_text()
    for text in (md, page):
        assert "| brier | ece |" in text or "<th>brier</th>" in text
        assert "10 equal-width" in text and "fixed 0.5" in text
    assert "reliability (calibration)" in page
    # the diagram's title describes the run and marks random weights
    titles = []
    monkeypatch.setattr(
        tprobe.plot.figures, "reliability_diagram", lambda pred, out, title="": titles.append(title)
    )
    src = {"kind": "store", "name": "rnd-cls", "pool": "cls", "model": "m", "random_init": True}
    ProbeRun(head="logreg", final_head=False).fit(_synthetic(source=src)).save(tmp_path / "r2")
    assert "random weights" in titles[0] and "logreg" in titles[0] and "cls" in titles[0]


# ---- item 6: map chance levels within class --------------------------------------------------
def _class_only_donors(seed=0):
    """Features carry the class only; donors differ only in class mix (donor_1/2 90% activated,
    donor_3/4 10%), and every batch holds one class, as in the T-cell data."""
    from tprobe.science.embedmap import MapData

    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d, frac in enumerate((0.9, 0.9, 0.1, 0.1), start=1):
        for c in range(40):
            label = int(c < frac * 40)
            X.append(rng.normal(0, 1, 8) + 4.0 * label)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "label": label,
                    "donor": f"donor_{d}",
                    "group": f"d{d}c{c}",
                    "batch": f"donor_{d}·b{label}",
                }
            )
    return MapData(np.asarray(X, np.float32), pd.DataFrame(rows), "class-only")


def test_map_measures_donor_and_batch_within_class():
    from tprobe.science.embedmap import chance_given_class, diagnose

    data = _class_only_donors()
    diag = diagnose(data)
    p, w = diag["predictability"], diag["within_class"]
    # the naive view: donor looks predictable (well above the 0.25 majority rate) ...
    assert p["donor"]["chance"] == pytest.approx(0.25) and p["donor"]["skill"] > 0.2
    # ... but knowing the class alone does as well: (36 + 36) / 160 = 0.45
    assert p["donor"]["chance_given_class"] == pytest.approx(0.45)
    assert chance_given_class(data.meta["donor"], data.meta["label"]) == pytest.approx(0.45)
    assert abs(p["donor"]["accuracy"] - p["donor"]["chance_given_class"]) < 0.08
    # within each class the features say nothing about donor or batch
    assert w["donor"]["chance"] == pytest.approx(0.45) and abs(w["donor"]["skill"]) < 0.1
    assert abs(w["batch"]["skill"]) < 0.1 and set(w["donor"]["per_class"]) == {"activated", "quiescent"}
    assert diag["warning"] is None


def test_map_warns_on_donor_signal_within_class():
    from tprobe.science.embedmap import MapData, diagnose

    rng = np.random.default_rng(1)
    rows, X = [], []
    for d in range(4):
        for c in range(40):
            label = int(c % 2)
            x = rng.normal(0, 1, 8)
            x[d] += 3.0  # donor identity in the features, the class only faintly
            x[5] += 0.3 * label
            X.append(x)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "label": label,
                    "donor": f"donor_{d}",
                    "group": f"d{d}c{c}",
                    "batch": f"donor_{d}·b{label}",
                }
            )
    diag = diagnose(MapData(np.asarray(X, np.float32), pd.DataFrame(rows), "donor-driven"))
    assert diag["within_class"]["donor"]["skill"] > 0.8
    assert diag["warning"] and "donor" in diag["warning"] and "within each class" in diag["warning"]


def test_report_shows_within_class_map_signal(tmp_path):
    from tprobe.runs.record import write_json
    from tprobe.runs.report import write_report
    from tprobe.science.embedmap import diagnose

    runs = tmp_path / "runs"
    _run(runs, "b-logreg-cls", _probe("logreg"), WORSE)
    diag = diagnose(_class_only_donors())
    (runs / "m-map").mkdir()
    write_json(runs / "m-map" / "diagnostics.json", [diag])
    res = write_report(runs, tmp_path / "rep")
    row = res["map_signal"].iloc[0]
    w = diag["within_class"]["donor"]
    assert row["source"] == "class-only" and f"chance {w['chance']:.3f}" in row["donor within class"]
    for name in ("report.md", "report.html"):
        text = (tmp_path / "rep" / name).read_text()
        assert "within each class" in text and "chance 0.450" in text


def test_t_interval_stays_inside_the_metric_range():
    v = [1.0, 1.0, 1.0, 0.6, 1.0, 1.0]  # the raw t-interval's upper end is above 1
    lo, hi = t_interval(v)
    assert hi == 1.0 and lo < np.mean(v)
    assert t_interval(v, bounds=None)[1] > 1.0
