"""Numbers tprobe prints or saves, recomputed independently (scikit-learn, by hand) on odd but legal inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import donor_features

from tprobe.features.sources import FeatureSet


def _features(n_donors=4, cells=40, seed=0, one_class=()):
    """Two separable-ish classes per donor; donors in ``one_class`` hold activated cells only."""
    return donor_features(n_donors, cells, seed, one_class)


def test_report_bound_line_counts_the_donors_the_paired_test_used(tmp_path):
    """A one-class held-out donor has no AUC: the paired test runs on the other donors, so the floor
    the report states (2/2^n) is that of n = the donors with an AUC, not of every held-out donor."""
    from tprobe.probing.run import ProbeRun
    from tprobe.runs.report import build_report

    fs = _features(n_donors=4, one_class=("donor_4",))
    for head in ("logreg", "prototype"):
        ProbeRun(head=head, final_head=False, n_jobs=1).fit(fs).save(tmp_path / "runs")
    rep = build_report(tmp_path / "runs")
    auc = rep.pairs[rep.pairs["metric"] == "roc_auc"]
    assert auc["n_donors"].tolist() == [3] and auc["p"].iloc[0] >= 2 / 2**3
    assert "With 3 held-out donors" in rep.bound_line and "2/2^3 = 0.250" in rep.bound_line


@pytest.mark.refuses("curve --shots above a class's cells in a fold's training donors")
def test_curve_refuses_more_shots_than_a_class_has_cells():
    """k cells per class cannot be drawn when the training donors hold fewer cells of a class: the point
    was plotted and tabled at k while it used fewer (every cell of the rare class)."""
    from tprobe.errors import TprobeError
    from tprobe.science.curve import LabelCurve

    fs = _features(n_donors=3, cells=40)
    meta = fs.meta.assign(label=((np.arange(len(fs.meta)) % 8) == 1).astype(int))  # 5 activated per donor
    rare = FeatureSet(fs.X, meta, fs.source)
    with pytest.raises(TprobeError, match=r"--shots 16: .*10 activated cells.*--shots up to 10"):
        LabelCurve(shots=(4, 16, "all"), repeats=1).fit(rare)
    res = LabelCurve(shots=(4, 10, "all"), repeats=1).fit(rare).results_
    drawn = res[res["shots"] == "10"]
    assert (drawn["n_train_activated"] == 10).all() and (drawn["n_train_quiescent"] == 10).all()


def test_one_held_out_donor_has_no_sd_over_donors(tmp_path):
    """With one held-out donor the sd over donors is undefined: it was saved as 0.0 and printed
    "0.812 ± 0.000" (no spread) in the run's table, the sweep summary and the report."""
    from tprobe.probing.sweep import run_sweep
    from tprobe.runs.report import build_report

    fs = _features(n_donors=3)
    res = run_sweep(
        [("syn", lambda name: fs)],
        ["logreg", "prototype"],
        out=tmp_path / "runs",
        probe_kwargs={"split": "test-donor", "test_donor": "2", "final_head": False, "n_jobs": 1},
    )
    assert res.summary["roc_auc_sd"].isna().all() and res.summary["roc_auc_mean"].notna().all()
    assert (res.out / "sweep_auc.png").stat().st_size > 0
    rep = build_report(res.out)
    assert not rep.table["roc_auc"].str.contains("±").any()
    assert rep.table["roc_auc"].str.fullmatch(r"\d\.\d{3}").all()


def test_table_mean_row_averages_prevalence_over_the_donors_of_its_metrics():
    """The mean row's metrics average the donors with both classes (auc_donors); its prevalence averaged
    every donor, a one-class donor's 1.0 too, so the AP mean sat beside another set of donors' prevalence."""
    from tprobe.probing.run import ProbeRun

    run = ProbeRun(head="logreg", final_head=False, n_jobs=1).fit(
        _features(n_donors=4, one_class=("donor_4",))
    )
    per = run.per_donor_.set_index("donor")
    mean = run.table().set_index("donor").loc["mean"]
    two = per.drop(index="donor_4")
    assert mean["prevalence"] == pytest.approx(two["prevalence"].mean())
    assert mean["average_precision"] == pytest.approx(two["average_precision"].mean())
    assert mean["accuracy"] == pytest.approx(two["accuracy"].mean())


def _store_with(tmp_path, bad: float):
    """A finished 6-row store (with its manifest) whose row 3 holds ``bad`` in one CLS value."""
    from tprobe.cache.store import FeatureStore, manifest_path

    ids = [f"c{i}_orig" for i in range(6)]
    store = FeatureStore.create(
        tmp_path / "s.zarr", row_ids=ids, hidden=4, registers=0, patches=2, chunk_rows=2
    )
    rng = np.random.default_rng(0)
    cls = rng.standard_normal((6, 4)).astype(np.float16)
    cls[3, 1] = bad
    for u in range(store.n_units):
        sl = slice(2 * u, 2 * u + 2)
        store.write_unit(u, {"cls": cls[sl], "patches": np.ones((2, 2, 4), np.float16)})
    assert store.finalize()
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"donor_{i % 2}/c{i}.png" for i in range(6)],
            "label": [0, 1] * 3,
            "donor": [f"donor_{i % 2}" for i in range(6)],
            "group": [f"c{i}" for i in range(6)],
            "view": "orig",
        }
    )
    manifest.to_parquet(manifest_path(store.path))
    return store.path


@pytest.mark.refuses("store features with NaN or infinity")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_store_with_non_finite_features_is_refused_in_one_line(tmp_path, bad):
    """Tokens that overflowed (float16) reached the heads: XGBoost scored NaN as missing values (a number
    from a broken feature), the other heads stopped on scikit-learn's ValueError (exit 1)."""
    from tprobe.errors import TprobeError
    from tprobe.features.sources import from_store
    from tprobe.probing.sweep import pool_store

    path = _store_with(tmp_path, bad)
    with pytest.raises(
        TprobeError, match=r"s\.zarr: 1 of 6 rows .*NaN or infinite cls.*c3_orig.*--precision fp32"
    ):
        from_store(path, "cls")
    assert isinstance(pool_store(path, ["cls"])["cls"], TprobeError)
    assert from_store(path, "mean").X.shape == (6, 4)  # the patches are finite: that pooling is usable


def _brute_sign_flip(d: np.ndarray) -> float:
    """The exact two-sided sign-flip p-value, every pattern enumerated (chunked), as the definition reads."""
    n, hits = len(d), 0
    observed = abs(d.sum())
    for start in range(0, 2**n, 2**16):
        codes = np.arange(start, min(2**n, start + 2**16))
        signs = 1.0 - 2.0 * ((codes[:, None] >> np.arange(n)) & 1)
        hits += int((np.abs(signs @ d) >= observed - 1e-12 * n).sum())
    return hits / 2**n


def test_sign_flip_test_is_exact_beyond_20_donors():
    """`tprobe report` on runs with more than 20 held-out donors stopped on a ValueError (exit 1): the
    exact test enumerated all 2^n patterns in memory. It counts them exactly without listing them."""
    from tprobe.stats import sign_flip_test

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9, 13, 22):
        d = rng.normal(0.01, 0.03, n)
        d[: n // 3] = np.round(d[: n // 3], 2)  # ties between patterns
        assert sign_flip_test(d) == pytest.approx(_brute_sign_flip(d), abs=1e-15)
    assert sign_flip_test(np.full(24, 0.1)) == pytest.approx(2 / 2**24)
    assert sign_flip_test(np.zeros(30)) == 1.0
    p = sign_flip_test(rng.normal(0.02, 0.05, 36))
    assert 0 < p <= 1


def test_sign_flip_test_above_40_donors_uses_seeded_random_patterns_and_says_so(tmp_path):
    """Above 40 donors the exact count stopped on a ValueError (`tprobe report` exit 1). It now draws 100,000
    seeded sign patterns, p = (1 + k) / (1 + draws): close to the exact p where both exist, the same on
    every call, never 0, and the paired table says how it was computed."""
    from tprobe.stats import SIGN_FLIP_NOTE, sign_flip_test, sign_flip_test_mc

    rng = np.random.default_rng(1)
    for n in (12, 22, 30):  # the Monte Carlo p against the exact one (binomial sd <= 0.0016 at 100k draws)
        d = rng.normal(0.01, 0.03, n)
        assert sign_flip_test_mc(d) == pytest.approx(sign_flip_test(d), abs=0.01)
    d = rng.normal(0.02, 0.05, 50)
    p = sign_flip_test(d)
    assert p == sign_flip_test(d) == sign_flip_test_mc(d) and 0 < p <= 1
    assert sign_flip_test(np.full(50, 0.1)) == pytest.approx(1 / 100_001)  # never 0
    assert sign_flip_test(np.zeros(45)) == 1.0
    assert "random sign patterns" in SIGN_FLIP_NOTE


@pytest.mark.refuses("a probe fold whose training donors hold one class")
@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_a_fold_whose_training_donors_hold_one_class_is_refused(head):
    """Two donors, one with activated cells only: holding out the other trains on one class. The MLP
    fitted it anyway and its per-donor AUC and accuracy were reported (P(activated) from a model that
    never saw a quiescent cell); the other heads stopped on scikit-learn's or an IndexError (exit 1)."""
    from tprobe.errors import TprobeError
    from tprobe.probing.run import ProbeRun

    fs = _features(n_donors=2, one_class=("donor_2",))
    with pytest.raises(
        TprobeError, match=r"held out donor_1\): its training donors \(donor_2\) hold only activated"
    ):
        ProbeRun(head=head, final_head=False, n_jobs=1).fit(fs)


def test_a_table_keyed_by_image_id_joins_when_the_data_holds_unreadable_images(tmp_path):
    """Unreadable images have no image id (""): two of them made the id lookup non-unique and the join
    stopped on pandas' InvalidIndexError (exit 1)."""
    from tprobe.features.sources import from_table

    rows = [
        {"path": f"d/donor_{d}/{c}/x{i}.png", "label": int(c == "activated"), "donor": f"donor_{d}"}
        for d in (1, 2)
        for c in ("activated", "quiescent")
        for i in range(3)
    ]
    manifest = pd.DataFrame(rows)
    manifest["image_id"] = [f"s{i}_orig" for i in range(len(manifest))]
    manifest["group"] = [f"s{i}" for i in range(len(manifest))]
    manifest["view"], manifest["kept"], manifest["drop_reason"] = "orig", True, ""
    broken = manifest.iloc[:2].assign(image_id="", group="", kept=False, drop_reason="unreadable")
    broken["path"] = ["d/donor_1/activated/bad0.png", "d/donor_2/quiescent/bad1.png"]
    manifest = pd.concat([manifest, broken], ignore_index=True)
    kept = manifest[manifest["kept"]]
    table = pd.DataFrame({"image_id": kept["image_id"], "Intensity_A": np.arange(len(kept), dtype=float)})
    table.to_csv(tmp_path / "t.csv", index=False)
    fs = from_table(tmp_path / "t.csv", manifest)
    assert fs.meta["image_id"].tolist() == kept["image_id"].tolist()
    assert fs.X[:, 0].tolist() == list(range(len(kept)))


@pytest.mark.refuses("a curve fold whose training donors hold one class")
def test_curve_refuses_a_fold_whose_training_donors_hold_one_class():
    """The curve left such a fold out without a word (no draw has both classes): its held-out donor was
    missing from every mean and band."""
    from tprobe.errors import TprobeError
    from tprobe.science.curve import LabelCurve

    fs = _features(n_donors=3, one_class=("donor_2", "donor_3"))
    with pytest.raises(TprobeError, match=r"held out donor_1\): its training donors \(donor_2, donor_3\)"):
        LabelCurve(shots=(2, "all"), repeats=1).fit(fs)


@pytest.mark.refuses("fine-tuning folds left with one class once the early-stopping donor is taken out")
def test_early_stopping_leaves_both_classes_to_train_on():
    """Fine-tuning (and LeNet, Inception) hold out one two-class training donor for early stopping and
    train on the rest: when the rest held one class, the network learned from one class and its
    held-out AUC was reported."""
    from tprobe.errors import TprobeError
    from tprobe.train.loop import pick_validation_donor

    rows = _features(n_donors=3, cells=10, one_class=("donor_2", "donor_3")).meta
    train = rows[rows["donor"] != "donor_3"]  # donor_1 (both classes) and donor_2 (activated only)
    with pytest.raises(TprobeError, match=r"fold 0: .*donor_1 .*donor_2.* hold only activated"):
        pick_validation_donor(train, 0)
    mixed = _features(n_donors=3, cells=10, one_class=("donor_3",)).meta
    assert pick_validation_donor(mixed, 0) == "donor_1" and pick_validation_donor(mixed, 1) == "donor_2"
