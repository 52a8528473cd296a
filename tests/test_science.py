"""kNN and prototype heads, label-efficiency curves, embedding-map diagnostics, paired tests, report marks."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from tprobe.cache.extract import extract
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.features.sources import FeatureSet, from_store
from tprobe.models.backbones import resolve_model
from tprobe.probing.heads import HEADS, KNNHead, PrototypeHead, make_head, param_grid
from tprobe.probing.run import ProbeRun
from tprobe.runs.record import RunRecord
from tprobe.runs.report import choose_reference, collect_runs, write_report
from tprobe.science.curve import LabelCurve, curve_band
from tprobe.science.embedmap import diagnose, embed, map_data
from tprobe.stats import holm, paired_comparisons, sign_flip_test


def synthetic(n_donors=4, cells=40, views=1, shift=2.5, drive="label", dims=16, seed=0) -> FeatureSet:
    """Cells with ``views`` rows each; ``drive`` = label or donor decides what moves the features."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(n_donors):
        for c in range(cells):
            label = int(c % 2 == 0) if drive == "label" else int(rng.random() < 0.5)
            centre = rng.normal(size=dims)
            if drive == "label":
                centre[0] += shift * label
            else:
                centre[d % dims] += shift * 2
            for v in range(views):
                X.append(centre + 0.2 * rng.normal(size=dims))
                rows.append(
                    {
                        "image_id": f"d{d}c{c}v{v}",
                        "path": f"d{d}/c{c}.png",
                        "label": label,
                        "donor": f"donor_{d + 1}",
                        "group": f"d{d}c{c}",
                        "view": "orig" if v == 0 else f"r{v}",
                        "batch": f"donor_{d + 1}·b{label}",
                    }
                )
    meta = pd.DataFrame(rows)
    return FeatureSet(np.asarray(X, np.float32), meta, {"kind": "table", "name": f"synthetic-{drive}"})


# ---- heads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["knn", "prototype"])
def test_new_heads_separate_separable_data(name):
    fs = synthetic(n_donors=1, cells=200, shift=8.0)  # separable: the class shift dwarfs the noise
    X, y = fs.X, fs.meta["label"].to_numpy()
    order = np.random.default_rng(0).permutation(200)
    tr, te = order[:100], order[100:]
    model = make_head(name).fit(X[tr], y[tr])
    proba = model.predict_proba(X[te])
    assert proba.shape == (100, 2) and np.allclose(proba.sum(1), 1)
    assert roc_auc_score(y[te], proba[:, 1]) > 0.95
    assert (model.predict(X[te]) == y[te]).mean() > 0.9
    # learned state is data only: numpy arrays and plain numbers
    clf = model[-1]
    state = {k: v for k, v in vars(clf).items() if k.endswith("_")}
    assert state and all(isinstance(v, np.ndarray | int | float) for v in state.values())


def test_knn_is_a_temperature_weighted_cosine_vote():
    X = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    y = np.array([1, 1, 0, 0])
    q = np.array([[1.0, 0.2]], dtype=np.float32)
    p = KNNHead(k=3, temperature=0.07).fit(10 * X, y).predict_proba(q)[0]  # scale-free: cosine
    qn = q[0] / np.linalg.norm(q[0])
    sims = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ qn
    top = np.argsort(-sims)[:3]
    w = np.exp(sims[top] / 0.07)
    assert p[1] == pytest.approx(w[y[top] == 1].sum() / w.sum(), rel=1e-5)


def test_prototype_centres_and_normalises():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 5)).astype(np.float32) + 100  # a large common offset: centring removes it
    y = (np.arange(50) < 25).astype(int)
    X[y == 1, 2] += 3
    head = PrototypeHead().fit(X, y)
    assert np.allclose(head.mean_, X.mean(0), atol=1e-4)
    assert np.allclose(np.linalg.norm(head.prototypes_, axis=1), 1, atol=1e-5)
    # the temperature changes the confidence, never the ranking
    p1, p2 = head.predict_proba(X)[:, 1], PrototypeHead(temperature=1.0).fit(X, y).predict_proba(X)[:, 1]
    assert np.array_equal(np.argsort(p1), np.argsort(p2)) and p1.max() > p2.max()
    assert roc_auc_score(y, p1) > 0.9


def test_heads_registered_with_grids():
    assert {"knn", "prototype"} <= set(HEADS)
    assert [g["clf__k"] for g in param_grid("knn")] == [5, 10, 20, 50]
    assert param_grid("prototype") == [{}]


@pytest.fixture(scope="module")
def small_data_store(tmp_path_factory, tiny_reg):
    """Three donors, 6 images per class each, through the tiny random model: (data folder, store)."""
    from conftest import copy_subset

    data = copy_subset(tmp_path_factory.mktemp("data"), donors=("donor_1", "donor_2", "donor_3"), per_class=6)
    pre = preprocess(discover(data))
    cache = tmp_path_factory.mktemp("cache")
    return data, extract(pre, resolve_model(str(tiny_reg)), cache=cache, progress=False).path


@pytest.fixture(scope="module")
def small_store(small_data_store):
    return small_data_store[1]


@pytest.mark.parametrize("head", ["knn", "prototype"])
def test_new_heads_on_a_store_through_probe_run(small_store, tmp_path, head):
    run = ProbeRun(head=head, n_boot=50).fit(from_store(small_store, "cls"))
    assert set(run.per_donor_["donor"]) == {"donor_1", "donor_2", "donor_3"}
    assert run.predictions_["p_activated"].between(0, 1).all()
    if head == "knn":  # k chosen by the inner donor CV from the grid
        assert all(c["params"]["clf__k"] in (5, 10, 20, 50) for c in run.chosen_)
    path = run.save(tmp_path)
    assert RunRecord.load(path).options["head"] == head


def test_new_heads_on_a_feature_table_via_cli(tmp_path):
    from conftest import copy_subset

    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=8)
    rows = []
    for p in sorted(data.rglob("*.png")):
        act = p.parent.name == "activated"
        rows.append({"FileName": p.name, "f1": float(act) + 0.1 * len(rows) % 0.3, "f2": float(len(p.name))})
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    res = CliRunner().invoke(
        main,
        [
            "probe",
            "--data",
            str(data),
            "--features",
            str(tmp_path / "t.csv"),
            "--head",
            "prototype",
            "--out",
            str(tmp_path / "runs"),
            "--bootstrap",
            "20",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "table:t · prototype" in res.output


# ---- curves ----------------------------------------------------------------------------------
def test_curve_draws_respect_donors_and_cells():
    fs = synthetic(n_donors=4, cells=30, views=3)
    c = LabelCurve(head="logreg", shots=(1, 2, 4, "all"), repeats=3, train_views="all").fit(fs)
    meta, draws, res = fs.meta, c.draws_, c.results_
    donor_of = dict(zip(meta["group"], meta["donor"], strict=False))
    # never a test donor's cell
    assert not any(
        donor_of[g] in td.split(",") for g, td in zip(draws["group"], draws["test_donor"], strict=True)
    )
    # k cells per class, distinct, of the right class
    label_of = dict(zip(meta["group"], meta["label"], strict=False))
    for (_, shots, _, lab), d in draws.groupby(["fold", "shots", "repeat", "label"]):
        assert d["group"].is_unique and all(label_of[g] == lab for g in d["group"])
        if shots != "all":
            assert len(d) == int(shots)
    # a drawn cell brings all its views: training rows = every view of every drawn cell
    for r in res.itertuples():
        d = draws[(draws["fold"] == r.fold) & (draws["shots"] == r.shots) & (draws["repeat"] == r.repeat)]
        assert r.n_train_cells == len(d) and r.n_train_rows == 3 * len(d)
    # draws are nested and differ between repeats
    one = draws[(draws["fold"] == 0) & (draws["label"] == 1)]
    assert set(one[(one["shots"] == "2") & (one["repeat"] == 0)]["group"]) < set(
        one[(one["shots"] == "4") & (one["repeat"] == 0)]["group"]
    )
    firsts = {tuple(one[(one["shots"] == "4") & (one["repeat"] == r)]["group"]) for r in range(3)}
    assert len(firsts) > 1
    # "all" is fitted once and uses every training cell
    all_rows = res[res["shots"] == "all"]
    assert set(all_rows["repeat"]) == {0} and len(all_rows) == 4
    assert set(res["donor"]) == set(meta["donor"])


def test_curve_is_deterministic_for_a_seed():
    fs = synthetic(n_donors=3, cells=20)
    a = LabelCurve(shots=(1, 4), repeats=2, seed=3).fit(fs)
    b = LabelCurve(shots=(1, 4), repeats=2, seed=3).fit(fs)
    c = LabelCurve(shots=(1, 4), repeats=2, seed=4).fit(fs)
    pd.testing.assert_frame_equal(a.results_, b.results_)
    pd.testing.assert_frame_equal(a.draws_, b.draws_)
    assert not a.draws_["group"].equals(c.draws_["group"])


def test_curve_band_and_more_labels_help():
    fs = synthetic(n_donors=4, cells=60, shift=1.0, dims=32)
    res = LabelCurve(shots=(1, 32), repeats=4).fit(fs).results_
    band = curve_band(res).set_index("shots")
    assert (band["low"] <= band["mean"]).all() and (band["mean"] <= band["high"]).all()
    assert band.loc["32", "mean"] > band.loc["1", "mean"]
    assert band.loc["32", "n_repeats"] == 4 and band.loc["32", "n_donors"] == 4


def test_curve_cli_puts_a_store_and_pixels_on_one_figure(small_data_store, tmp_path):
    data, store = small_data_store
    res = CliRunner().invoke(
        main,
        [
            "curve",
            "--data",
            str(data),
            "--store",
            str(store),
            "--pixels",
            "--shots",
            "1,2,all",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / res.output.strip().splitlines()[-1].split("/")[-1]
    cur = pd.read_parquet(run / "curve.parquet")
    assert {
        "source",
        "head",
        "k",
        "repeat",
        "donor",
        "roc_auc",
        "average_precision",
        "balanced_accuracy",
        "n_train_cells",
    } <= set(cur.columns)
    assert set(cur["source"]) == {"tiny-reg-cls", "pixels"} and (run / "curve.png").exists()
    # the same cells in both sources: the draws are the same (paired curves)
    draws = pd.read_parquet(run / "draws.parquet")
    a, b = (
        draws[draws["source"] == s].drop(columns="source").reset_index(drop=True)
        for s in ("tiny-reg-cls", "pixels")
    )
    pd.testing.assert_frame_equal(a, b)


def test_random_sources_are_marked():
    from tprobe.models.random_weights import is_random as is_random_source

    assert is_random_source({"kind": "store", "model": "models/random-vits14-reg"})
    assert is_random_source({"kind": "store", "model": "m", "model_random_init": True})
    assert not is_random_source({"kind": "store", "model": "random-ish", "model_random_init": False})
    assert not is_random_source({"kind": "pixels", "name": "pixels"})


# ---- map diagnostics -------------------------------------------------------------------------
def test_map_flags_donor_driven_features_only():
    donor_driven = diagnose(map_data(synthetic(drive="donor", cells=40)))
    label_driven = diagnose(map_data(synthetic(drive="label", cells=40)))
    assert donor_driven["warning"] and "donor and batch are more predictable" in donor_driven["warning"]
    assert label_driven["warning"] is None
    p = donor_driven["predictability"]
    assert p["donor"]["accuracy"] > 0.9 and p["donor"]["chance"] == pytest.approx(0.25)
    assert donor_driven["silhouette"]["donor"] > donor_driven["silhouette"]["label"]
    assert label_driven["silhouette"]["label"] > label_driven["silhouette"]["donor"]
    assert "batch" in p


def test_map_coordinates():
    coords = embed(map_data(synthetic(cells=15)), umap=False)
    assert {"pca1", "pca2", "donor", "label", "batch"} <= set(coords.columns) and len(coords) == 60


# ---- paired test and report ------------------------------------------------------------------
def test_sign_flip_p_matches_hand_computation():
    d = np.array([0.10, 0.05, -0.02, 0.08, 0.03, 0.06])
    # by hand: |mean| of each of the 64 sign patterns against the observed mean 0.05
    hand = sum(abs(np.dot(s, d)) / 6 >= 0.05 - 1e-12 for s in itertools.product((1, -1), repeat=6)) / 64
    assert sign_flip_test(d) == pytest.approx(hand)
    # only flipping the -0.02 (or everything) ties or beats the observed sum 0.30: sums 0.34, 0.30 -> 4/64
    assert sign_flip_test(d) == pytest.approx(4 / 64)
    assert sign_flip_test(np.full(6, 0.1)) == pytest.approx(1 / 32)  # the floor with 6 donors
    assert sign_flip_test(np.zeros(6)) == 1.0


def test_holm():
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.isnan(holm([np.nan, 0.5])[0]) and holm([np.nan, 0.5])[1] == 0.5


def _fake_run(root, name, cfg, aucs):
    run = root / name
    run.mkdir(parents=True)
    donors = [f"donor_{i}" for i in range(1, len(aucs) + 1)]
    per = pd.DataFrame(
        {"donor": donors, "n": 100, "roc_auc": aucs, "average_precision": aucs, "accuracy": aucs}
    )
    per.to_parquet(run / "per_donor.parquet", index=False)
    summ = {
        m: {
            "mean": float(np.mean(aucs)),
            "sd": float(np.std(aucs, ddof=1)),
            "ci_low": min(aucs),
            "ci_high": max(aucs),
        }
        for m in ("roc_auc", "average_precision", "accuracy")
    }
    folds = [{"test_donor": d, "n": 100} for d in donors]
    (run / "metrics.json").write_text(json.dumps({"summary": summ, "folds": folds}))
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_report_marks_random_weights_pairs_runs_and_counts_cells(tmp_path):
    runs = tmp_path / "runs"
    probe = {"command": "probe", "head": "logreg", "split": "leave-one-donor-out"}
    _fake_run(
        runs,
        "a-random",
        {**probe, "random_init": True, "features": {"model": "x", "pool": "cls"}},
        [0.95, 0.9, 0.92, 0.97, 0.91, 0.93],
    )
    # old run without the flag: the model path names it random
    _fake_run(
        runs,
        "b-old",
        {**probe, "features": {"model": "models/random-vits14-reg", "pool": "cls"}},
        [0.8, 0.82, 0.85, 0.79, 0.81, 0.84],
    )
    _fake_run(
        runs,
        "c-real",
        {**probe, "random_init": False, "features": {"model": "dinov2-small", "pool": "cls"}},
        [0.85, 0.86, 0.88, 0.9, 0.8, 0.87],
    )
    _fake_run(
        runs,
        "d-real-again",
        {**probe, "features": {"model": "dinov2-small", "pool": "cls"}},
        [0.84, 0.86, 0.88, 0.9, 0.8, 0.87],
    )
    summary = collect_runs(runs)
    assert dict(zip(summary["run_name"], summary["random_init"], strict=True)) == {
        "a-random": True,
        "b-old": True,
        "c-real": False,
        "d-real-again": False,
    }
    res = write_report(runs, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "PLUMBING CHECK" in res["headline"][0] and "a-random" in res["headline"][0]
    assert "Best run without random weights" in res["headline"][1] and "c-real" in res["headline"][1]
    assert md.count("PLUMBING CHECK: random weights") >= 3  # two table rows + the headline
    assert "c-real" in md and "d-real-again" in md  # same model/pool/head, told apart by run name
    assert "600 cells scored per run" in md and "[0.800, 0.900]" in md  # cells, not views; the CI
    pairs = paired_comparisons(summary, against=choose_reference(summary)[0])
    auc = pairs[pairs["metric"] == "roc_auc"].set_index("label")
    # the reference is fixed by rule (logreg on CLS, no random weights, first folder), not the best run
    assert len(auc) == 3 and (auc["reference"] == str(runs / "c-real")).all()
    # every a-random donor is above c-real: the most extreme of 64 patterns, two-sided p = 2/64
    assert auc.filter(like="a-random", axis=0)["p"].iloc[0] == pytest.approx(1 / 32)
    assert (auc["p_holm"] >= auc["p"]).all()
    assert "sign-flip" in md and "1/32" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'class="random"' in html
    res = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 0, res.output
    assert (
        "AUC 95% CI" in res.output and "PLUMBING CHECK" in res.output and "paired comparisons" in res.output
    )


def test_map_cli_writes_figure_coordinates_and_diagnostics(small_data_store, tmp_path):
    data, store = small_data_store
    res = CliRunner().invoke(
        main,
        ["map", "--data", str(data), "--store", str(store), "--pixels", "--no-umap", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / res.output.strip().splitlines()[-1].split("/")[-1]
    diags = json.loads((run / "diagnostics.json").read_text())
    assert [d["source"] for d in diags] == ["tiny-reg-cls", "pixels"]
    for d in diags:
        assert {"activation", "donor", "batch"} <= set(d["predictability"])
        assert d["predictability"]["donor"]["chance"] == pytest.approx(1 / 3, abs=0.1)
    coords = pd.read_parquet(run / "map-pixels.parquet")
    assert {"pca1", "pca2", "batch"} <= set(coords.columns) and coords["batch"].str.startswith("donor_").all()
    assert (run / "map-tiny-reg-cls.png").exists() and "predicted with accuracy" in res.output


def test_table_n_is_an_integer_and_the_mean_row_does_not_sum_it():
    from tprobe.probing.evaluate import METRICS, Evaluation

    per = pd.DataFrame(
        {"donor": ["a", "b"], "n": [3, 4], "prevalence": [0.5, 0.25], **{m: [0.5, 0.7] for m in METRICS}}
    )
    summ = {m: {"mean": 0.6, "sd": 0.1} for m in METRICS}
    t = Evaluation(None, per, summ, {"frequency": summ}).table().set_index("donor")
    assert str(t["n"].dtype) == "Int64" and t.loc["a", "n"] == 3
    assert pd.isna(t.loc["mean", "n"]) and t.loc["mean", "roc_auc"] == 0.6


def test_experiment_titles_and_sweep_order(tmp_path):
    from tprobe.plot.figures import sweep_bars

    def experiment_title(cfg):
        return RunRecord.from_dict(cfg).title

    cfg = {
        "command": "probe",
        "head": "knn",
        "split": "test-donor",
        "test_donor": "4",
        "features": {"kind": "store", "model": "/m/random-vits14-reg", "pool": "cls"},
    }
    assert (
        experiment_title(cfg)
        == "random-vits14-reg · cls · knn · test donor 4 (random weights: plumbing check)"
    )
    assert experiment_title({"command": "baseline", "baseline": "lenet", "split": "leave-one-donor-out"}) == (
        "baseline lenet · leave-one-donor-out"
    )
    import matplotlib.pyplot as plt

    captured = {}
    orig = plt.Figure.savefig

    def spy(self, *a, **k):
        ax = self.axes[0]
        captured["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        captured["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return orig(self, *a, **k)

    plt.Figure.savefig = spy
    try:
        rows = [
            {"features": "f", "pool": p, "head": h, "roc_auc_mean": 0.8, "roc_auc_sd": 0.1}
            for p in ("mean", "cls", "concat")
            for h in ("mlp", "logreg")
        ]
        sweep_bars(pd.DataFrame(rows), tmp_path / "s.png")
    finally:
        plt.Figure.savefig = orig
    assert captured["ticks"] == ["mean", "cls", "concat"]  # table order, not alphabetical
    assert captured["legend"][0] == "chance (0.5)" and captured["legend"][1:] == ["mlp", "logreg"]


def test_typed_sources_with_random_weights_are_marked():
    # issue 19: is_random_source read the store attribute's name on a FeatureSource, so a typed source
    # with random_init=True (a store's, a baseline's) was not marked random
    from tprobe.features.sources import FeatureSource
    from tprobe.models.random_weights import is_random as is_random_source

    assert is_random_source(FeatureSource("store", "tiny-cls", model="m", random_init=True))
    assert is_random_source(FeatureSource("baseline", "inception", random_init=True))
    assert not is_random_source(FeatureSource("store", "real-cls", model="dinov2-small"))
    assert not is_random_source(FeatureSource("table", "t"))


def test_two_sources_of_the_same_name_stay_distinguishable(tmp_path):
    # issue 19: `fs.source["name"] = ...` on a FeatureSource (no __setitem__) raised TypeError when two
    # curve/map sources shared a name
    from conftest import copy_subset

    from tprobe.features.assemble import feature_sets

    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2"), per_class=4)
    rows = [  # f1 follows the class with one exception (a column that IS the label is refused)
        {"FileName": p.name, "f1": float(p.parent.name == "activated") + 0.5 * (i == 0)}
        for i, p in enumerate(sorted(data.rglob("*.png")))
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    out = feature_sets(tables=[tmp_path / "t.csv"] * 2, id_column="FileName", data=data, offline=True)
    assert [fs.name for fs in out] == ["table:t#1", "table:t#2"]
