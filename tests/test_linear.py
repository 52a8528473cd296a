"""The batched torch logistic regression (tprobe.probing.linear) against scikit-learn, and its use by the engine."""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from tprobe.cache.extract import extract
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.features.sources import from_store
from tprobe.features.synthetic import synthetic_features
from tprobe.models.backbones import resolve_model
from tprobe.probing.linear import TorchLogisticRegression, resolve_solver, row_runs
from tprobe.probing.run import ProbeRun, load_head

CS = [0.001, 0.01, 0.1, 1.0]


def _data(n=1500, d=24, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.uniform(-5, 5, d)  # unscaled, off-centre
    y = (X[:, :4] @ rng.normal(size=4) + rng.normal(size=n) * 2 > 0).astype(int)
    return X.astype(dtype), y


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-5), (np.float32, 2e-4)])
def test_batched_grid_equals_sklearn_logreg_per_C(dtype, atol):
    X, y = _data(dtype=dtype)
    models = TorchLogisticRegression(tol=1e-8).fit_path(X, y, CS)
    for m, C in zip(models, CS, strict=True):
        sk = make_pipeline(
            StandardScaler(), LogisticRegression(C=C, class_weight="balanced", tol=1e-10, max_iter=5000)
        ).fit(X.astype(np.float64), y)
        lr = sk[-1]
        assert m.C == C and list(m.classes_) == [0, 1]
        np.testing.assert_allclose(m.coef_std_, lr.coef_, atol=atol * max(1.0, np.abs(lr.coef_).max()))
        np.testing.assert_allclose(m.intercept_std_, lr.intercept_, atol=atol * 10)
        np.testing.assert_allclose(m.predict_proba(X), sk.predict_proba(X), atol=atol * 10)
        # coef_ / intercept_ apply to the raw features (the standardisation folded in)
        np.testing.assert_allclose(
            X.astype(np.float64) @ m.coef_[0] + m.intercept_[0], sk.decision_function(X), atol=atol * 50
        )


def test_fit_is_fit_path_with_one_C_and_unbalanced_weights_match_sklearn():
    X, y = _data(n=800, dtype=np.float64)
    y[:600] = 0  # unbalanced classes: balanced weights matter
    m = TorchLogisticRegression(C=0.05, tol=1e-8).fit(X, y)
    assert m.coef_.shape == (1, X.shape[1]) and m.intercept_.shape == (1,)
    for cw in ("balanced", None):
        mm = TorchLogisticRegression(C=0.05, class_weight=cw, tol=1e-8).fit(X, y)
        sk = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, class_weight=cw, tol=1e-10)).fit(X, y)
        np.testing.assert_allclose(mm.coef_std_, sk[-1].coef_, atol=1e-5)
    np.testing.assert_allclose(m.coef_, TorchLogisticRegression(tol=1e-8).fit_path(X, y, [0.05])[0].coef_)


@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_training_rows_read_in_place_equal_a_copy(layout):
    X, y = _data(n=2000, dtype=np.float64)
    if layout == "runs":  # rows of three donors out of five, grouped: slices of X
        rows = np.r_[0:400, 800:1600]
    else:  # more runs than MAX_RUNS: every row read, weight 0 outside the training rows
        rows = np.flatnonzero(np.random.default_rng(1).random(2000) < 0.6)
        assert len(row_runs(rows)) > 64
    est = TorchLogisticRegression(tol=1e-9)
    a = est.fit_path(X, y, CS, rows=rows)
    b = est.fit_path(X[rows], y[rows], CS)
    for ma, mb in zip(a, b, strict=True):
        np.testing.assert_allclose(ma.mean_, mb.mean_, rtol=1e-10)
        np.testing.assert_allclose(ma.scale_, mb.scale_, rtol=1e-10)
        np.testing.assert_allclose(ma.coef_std_, mb.coef_std_, atol=1e-5)
    np.testing.assert_allclose(a[2].predict_proba_rows(X, rows), b[2].predict_proba(X[rows]))


def test_to_sklearn_is_a_plain_pipeline_with_the_same_predictions():
    X, y = _data()
    m = TorchLogisticRegression(C=0.1).fit(X, y)
    sk = m.to_sklearn()
    assert isinstance(sk, Pipeline) and type(sk[-1]) is LogisticRegression and type(sk[0]) is StandardScaler
    np.testing.assert_allclose(sk.predict_proba(X), m.predict_proba(X), atol=1e-6)
    assert (sk.predict(X) == m.predict(X)).mean() > 0.999


def test_fit_path_copies_no_training_rows():
    """The engine hands the full matrix and row indices: no X[train] copy (numpy allocations are traced)."""
    X, y = _data(n=60000, d=128)  # 31 MB; per-row vectors (targets, weights: 8 bytes a row) stay
    rows = np.r_[0:20000, 30000:60000]
    est = TorchLogisticRegression(max_iter=30)
    est.fit_path(X, y, CS, rows=rows)  # warm up torch
    tracemalloc.start()
    est.fit_path(X, y, CS, rows=rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.3 * X[rows].nbytes  # a copy of the training rows would be 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"C": -1.0}, "C"),
        ({"class_weight": "auto"}, "class_weight"),
        ({"max_iter": 0}, "max_iter"),
        ({"device": "nope"}, "device"),
    ],
)
def test_bad_parameters_raise_one_line(bad, match):
    X, y = _data(n=100)
    with pytest.raises(TprobeError, match=match):
        TorchLogisticRegression(**bad).fit(X, y)
    with pytest.raises(TprobeError, match="2 classes"):
        TorchLogisticRegression().fit(X, np.zeros(len(y)))


def test_solver_choice():
    assert resolve_solver("auto", "logreg", "l2", 100) == "lbfgs"
    assert resolve_solver("auto", "logreg", "l2", 400_000) == "torch"
    assert resolve_solver("auto", "logreg", "l1", 400_000) == "lbfgs"
    assert resolve_solver("auto", "knn", "l2", 400_000) is None
    with pytest.raises(TprobeError, match="solver 'nope'"):
        ProbeRun(solver="nope").fit(synthetic_features(200, 3, 8))
    with pytest.raises(TprobeError, match="penalty 'l1'"):
        resolve_solver("torch", "logreg", "l1", 10)


@pytest.fixture(scope="module")
def sample_cls(tmp_path_factory, tiny_reg):
    """The bundled sample's cls features through a tiny random DINOv2-with-registers."""
    cache = tmp_path_factory.mktemp("cache")
    return from_store(
        extract(preprocess(discover()), resolve_model(str(tiny_reg)), cache=cache, progress=False).path, "cls"
    )


def _mean_auc(run):
    return run.summary_["roc_auc"]["mean"]


@pytest.mark.parametrize("data", ["sample", "synthetic"])
def test_probe_with_torch_solver_matches_lbfgs(data, request):
    fs = (
        request.getfixturevalue("sample_cls") if data == "sample" else synthetic_features(3000, 6, 48, seed=1)
    )
    lb = ProbeRun(solver="lbfgs", n_boot=0, final_head=False).fit(fs)
    tr = ProbeRun(solver="torch", n_boot=0, final_head=False).fit(fs)
    assert lb.solver_ == "lbfgs" and tr.solver_ == "torch"
    assert tr.record("x").options["solver"] == "torch"
    assert abs(_mean_auc(tr) - _mean_auc(lb)) <= 0.005
    a = lb.per_donor_.set_index("donor")["roc_auc"]
    b = tr.per_donor_.set_index("donor")["roc_auc"]
    assert (a - b).abs().max() <= 0.01
    assert _mean_auc(tr) > 0.6  # it learned something


def test_saved_torch_head_is_data_only_sklearn(tmp_path):
    fs = synthetic_features(1200, 4, 16, seed=2)
    run = ProbeRun(solver="torch", n_boot=0).fit(fs)
    head = load_head(run.save(tmp_path / "runs"))
    assert type(head) is Pipeline and type(head[-1]) is LogisticRegression
    np.testing.assert_allclose(head.predict_proba(fs.X)[:, 1], run.final_["model"].predict_proba(fs.X)[:, 1])
    C = run.final_["params"]["clf__C"]
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", tol=1e-10)).fit(
        fs.X, fs.meta["label"]
    )
    np.testing.assert_allclose(head.predict_proba(fs.X), sk.predict_proba(fs.X), atol=1e-3)


def test_torch_solver_without_standardisation_matches_lbfgs(tmp_path):
    """--normalize none: no scaler step; the torch model fits the raw features, its saved head has no scaler."""
    fs = synthetic_features(2400, 4, 16, seed=5)
    lb = ProbeRun(solver="lbfgs", normalize="none", n_boot=0, final_head=False).fit(fs)
    tr = ProbeRun(solver="torch", normalize="none", n_boot=0).fit(fs)
    assert abs(_mean_auc(tr) - _mean_auc(lb)) <= 0.005
    head = load_head(tr.save(tmp_path / "runs"))
    assert [name for name, _ in head.steps] == ["clf"] and type(head[-1]) is LogisticRegression


def test_cli_probe_solver_option_is_recorded(tmp_path):
    import json

    import pandas as pd
    from click.testing import CliRunner

    from tprobe.cli import main

    pre = preprocess(discover())
    src = pre.manifest[pre.manifest["view"] == "orig"]
    pd.DataFrame(
        {
            "FileName": src["path"].map(lambda p: p.split("/")[-1]),
            "Entropy": src["entropy"],
            "Intensity": src["total_intensity"] / (src["height"] * src["width"]),
            "Area": src["height"] * src["width"],
        }
    ).to_csv(tmp_path / "cp.csv", index=False)
    args = [
        "probe",
        "--features",
        str(tmp_path / "cp.csv"),
        "--head",
        "logreg",
        "--out",
        str(tmp_path / "runs"),
    ]
    res = CliRunner().invoke(main, [*args, "--solver", "torch"])
    assert res.exit_code == 0, res.output
    run = res.output.strip().splitlines()[-1]
    assert json.loads((Path(run) / "config.json").read_text())["options"]["solver"] == "torch"
    assert CliRunner().invoke(main, [*args, "--solver", "nope"]).exit_code == 2


def test_predicting_rows_holds_small_chunks_and_the_chunk_does_not_change_a_bit():
    """The engine predicts each inner fit's held-out rows in chunks; a chunk's temporaries (gathered rows,
    standardised, float64) took 12 MB a worker at 2048 rows x 384 features. At 512 rows they take 3 MB,
    and every row's probability is the one chunks of 2048 gave, to the bit (not so whatever the chunk: the
    BLAS kernel sums a few rows at a time, so chunks of 513 change last bits)."""
    X, y = _data(n=6000, d=384)
    m = TorchLogisticRegression(C=0.1).fit(X, y, rows=np.arange(4000))
    rows = np.sort(np.random.default_rng(1).choice(6000, 5000, replace=False))
    tracemalloc.start()
    p = m.predict_proba_rows(X, rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 2**20, peak / 2**20  # 12.1 MB with chunks of 2048
    with threadpool_limits(1):  # as the engine predicts (threads split a chunk's rows between them)
        for n in (5000, 4999, 4997):  # tails of odd lengths too
            p1 = m.predict_proba_rows(X, rows[:n])
            for chunk in (1024, 2048):
                assert np.array_equal(m.predict_proba_rows(X, rows[:n], chunk=chunk), p1)
    np.testing.assert_allclose(p, m.predict_proba(X[rows]), rtol=0, atol=1e-12)
