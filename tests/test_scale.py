"""Probes at scale (issue 20): the kNN head's memory, the synthetic benchmark data and its growth exponent."""

import importlib.util
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline

from tprobe.features.synthetic import synthetic_features
from tprobe.probing import heads
from tprobe.probing.heads import KNNHead


def _knn_data(n_train=3000, n_query=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_train, d)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=n_train) > 0).astype(int)
    return X, y, rng.normal(size=(n_query, d)).astype(np.float32)


def _knn_reference(X, y, Q, k, temperature):
    """Every similarity at once, then the k best by a full sort."""
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    sims = Qn @ Xn.T
    top = np.argsort(-sims, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, axis=1).astype(np.float64) / temperature
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return (w * (y[top] == 1)).sum(axis=1)


@pytest.mark.parametrize("block", [2**23, 64, 1])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_blocked_top_k_equals_every_similarity_at_once(monkeypatch, block, k):
    X, y, Q = _knn_data()
    monkeypatch.setattr(heads, "TOPK_BLOCK", block, raising=False)
    p = KNNHead(k=k, batch_size=37).fit(X, y).predict_proba(Q)[:, 1]
    np.testing.assert_allclose(p, _knn_reference(X, y, Q, k, 0.07), atol=1e-6)


def test_knn_prediction_memory_does_not_grow_with_the_training_set(monkeypatch):
    """Before: each batch of 256 queries held 256 x N similarities, their negation and N int64 indices a
    row (16 bytes x 256 x N: 82 MB at N = 20,000, 1.6 GB at 400k); blocked, it holds TOPK_BLOCK of them."""
    X, y, Q = _knn_data(n_train=20000, n_query=256, d=8)
    head = KNNHead(k=20, batch_size=256).fit(X, y)
    monkeypatch.setattr(heads, "TOPK_BLOCK", 2**16, raising=False)
    tracemalloc.start()
    p = head.predict_proba(Q)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20  # an unblocked batch needs 256 x 20000 x 16 bytes = 82 MB
    np.testing.assert_allclose(p[:, 1], _knn_reference(X, y, Q, 20, 0.07), atol=1e-6)


def test_synthetic_features_have_donor_blocks_both_classes_and_a_signal():
    fs = synthetic_features(3000, 6, 32, seed=3)
    assert fs.X.shape == (3000, 32) and fs.X.dtype == np.float32
    m = fs.meta
    assert m["donor"].nunique() == 6 and set(m["view"]) == {"orig"}
    assert (m.groupby("donor")["label"].nunique() == 2).all()
    # rows grouped by donor (the layout the torch solver reads as slices)
    assert (m["donor"] != m["donor"].shift()).sum() == 6
    # the class means differ in the signal columns, not elsewhere
    diff = fs.X[m["label"] == 1].mean(0) - fs.X[m["label"] == 0].mean(0)
    assert diff[:8].min() > 0.2 and np.abs(diff[8:]).max() < 0.15
    again = synthetic_features(3000, 6, 32, seed=3)
    assert np.array_equal(again.X, fs.X)


def test_bench_scale_growth_exponent_is_the_log_log_slope():
    spec = importlib.util.spec_from_file_location(
        "bench_scale", Path(__file__).parents[1] / "scripts/bench_scale.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.slope([(25_000, 10.0), (100_000, 40.0), (400_000, 160.0)]) == pytest.approx(1.0)
    assert bench.slope([(1000, 1.0), (4000, 8.0)]) == pytest.approx(1.5)
    assert bench.slope([(1000, 1.0)]) is None


def test_inner_searches_hold_one_row_recipe_per_distinct_training_set():
    """Before: every (outer fold, inner donor, grid point) held its own copy of its training rows -
    20 donors x 19 x 4 grid points of ~360k int64 indices held 4.4 GB at 400k cells. Now one recipe per
    distinct training set (all donors but a and b), shared by the grid points and by folds a and b, which
    builds the rows only when its fit runs; one validation array per donor."""
    from tprobe.probing.evaluate import split_plan
    from tprobe.probing.fastcv import _inner_requests

    fs = synthetic_features(600, 5, 4, seed=4)
    meta = fs.meta
    y, donors = meta["label"].to_numpy(), meta["donor"].to_numpy()
    is_orig = np.ones(len(meta), bool)
    grid = [{"clf__C": c} for c in (0.01, 0.1, 1.0, 10.0)]
    cache, reqs, plan = {}, [], split_plan(meta)
    for fold in plan:
        _, r = _inner_requests(grid, y, donors, fold.train, is_orig, cache)
        reqs += r
        for _, tr, va in r:  # the same rows as before
            (held,) = set(donors[va])
            rows = tr.rows()
            assert set(donors[rows]) == set(donors) - {held, fold.test_donors[0]}
            assert np.array_equal(rows, fold.train[donors[fold.train] != held])
            assert rows.dtype == np.int32 and rows is not tr.rows()  # built anew, never kept
    assert len(reqs) == 5 * 4 * 4
    assert len({id(tr) for _, tr, _ in reqs}) == 10  # 5 choose 2 training sets
    assert len({id(va) for _, _, va in reqs}) == 5  # a donor's rows, validated on by 4 folds
    # a recipe refers to its outer fold's training rows, held anyway, and holds no rows of its own
    assert {id(tr.base) for _, tr, _ in reqs} <= {id(f.train) for f in plan}


def test_knn_k_grid_is_scored_from_one_neighbour_search():
    """The engine fits kNN once per training set at the largest k and scores every k of the grid from
    that one search (issue 20: a k grid of 4 cost 4 searches over every training row)."""
    from tprobe.probing.fastcv import _split_path

    X, y, Q = _knn_data()
    path = KNNHead(k=50).fit(X, y).predict_proba_path(Q, [5, 10, 20, 50])
    for k in (5, 10, 20, 50):
        np.testing.assert_allclose(path[k], KNNHead(k=k).fit(X, y).predict_proba(Q), atol=1e-12)
    fits, where = _split_path(heads.param_grid("knn"))
    assert fits == [{"clf__k": 50}] and {w[2] for w in where.values()} == {5, 10, 20, 50}


def test_the_batched_logreg_keeps_one_column_of_predictions_per_c():
    """Each C's stored predictions own their one column: a view of predict_proba's (n, 2) array kept both
    columns of every C alive (x2 of the predictions' memory, which grows with donors^2 at 20 donors)."""
    from tprobe.probing import fastcv
    from tprobe.probing.linear import make_logreg

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    train, rows = np.arange(200), np.arange(200, 300)
    out = fastcv._fit_and_predict(make_logreg, {}, X, y, train, rows, [("clf__C", 0.1), ("clf__C", 1.0)])
    assert len(out) == 2
    for p in out.values():
        assert p.shape == (100,) and p.base is None and p.flags.c_contiguous


class _MeanDiff(ClassifierMixin, BaseEstimator):
    """A head with a C axis that costs nothing to fit: the engine's own memory is what a run measures."""

    def __init__(self, C=1.0):
        self.C = C

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.w_ = X[y == 1].mean(0) - X[y == 0].mean(0)
        return self

    def predict_proba(self, X):
        p = 1 / (1 + np.exp(-self.C * (X @ self.w_)))
        return np.column_stack([1 - p, p])


def _mean_diff(**params):
    return Pipeline([("clf", _MeanDiff())]).set_params(**params)


def test_nested_lodo_at_20_donors_holds_no_per_training_set_arrays():
    """Before (issue 20): a 20-donor run held, for the whole run, an index array per distinct inner training
    set (210 x ~19k int32 here: 15 MB), every inner fit's predictions (190 fits x 2,000 rows x 4 C: 12 MB)
    and per-fit united and validation row arrays: a 40 MB peak on this 0.3 MB feature matrix, growing with
    donors^2 x cells. Now training rows are built while their fit runs and predictions are scored on arrival
    and released: the peak stays a few MB."""
    from tprobe.probing.evaluate import split_plan
    from tprobe.probing.fastcv import nested_cv_fast

    fs = synthetic_features(20_000, 20, 4, seed=0)
    plan = split_plan(fs.meta)
    grid = [{"clf__C": c} for c in (0.01, 0.1, 1.0, 10.0)]
    tracemalloc.start()
    cv, final = nested_cv_fast(_mean_diff, grid, fs.X, fs.meta, plan, n_jobs=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 2**20, peak / 2**20  # 40 MB before
    assert len(cv.chosen) == 20 and final[0] in grid
    assert all(
        len(c["inner_ap"]) == 4 and not np.isnan(list(c["inner_ap"].values())).any() for c in cv.chosen
    )


def test_training_rows_exist_only_while_their_fit_runs(monkeypatch):
    """Every inner training set's rows are built when its fit is dispatched and freed once it is done: a
    few at a time (joblib dispatches a few jobs ahead of its workers), none after the run."""
    import gc
    import weakref

    from tprobe.probing import fastcv
    from tprobe.probing.evaluate import split_plan

    built, alive_at_build = [], []
    rows = fastcv._TrainRows.rows

    def tracked(self):
        out = rows(self)
        alive_at_build.append(sum(r() is not None for r in built))
        built.append(weakref.ref(out))
        return out

    monkeypatch.setattr(fastcv._TrainRows, "rows", tracked)
    fs = synthetic_features(2_000, 8, 4, seed=1)
    grid = [{"clf__C": c} for c in (0.1, 1.0)]
    for n_jobs in (1, 2):
        built.clear(), alive_at_build.clear()
        fastcv.nested_cv_fast(_mean_diff, grid, fs.X, fs.meta, split_plan(fs.meta), n_jobs=n_jobs)
        gc.collect()
        assert len(built) == 8 * 7 // 2 + 8  # each distinct training set once: 28 pairs, the final search's 8
        assert max(alive_at_build) <= 3 * n_jobs + 1
        assert not any(r() is not None for r in built)


def test_folds_that_train_on_the_same_rows_share_their_refit():
    """Donors whose cells have no original view add no training rows under train_views="orig", so the folds
    holding them out train on the same rows. Their refit is one fit, kept for the next such fold (0.4.0 kept
    every fit; releasing it after its fold refitted the same rows and counted the fold one fit more)."""
    import hashlib

    import pandas as pd

    from tprobe.probing.evaluate import split_plan
    from tprobe.probing.fastcv import nested_cv_fast

    fs = synthetic_features(240, 6, 4, seed=2)
    meta = fs.meta.copy()
    meta.loc[meta["donor"].isin(["donor_2", "donor_5"]), "view"] = "aug1"
    fitted = []

    class Recorded(_MeanDiff):
        def fit(self, X, y):
            fitted.append((self.C, len(y), hashlib.sha1(np.ascontiguousarray(X).tobytes()).hexdigest()))
            return super().fit(X, y)

    def make(**params):
        return Pipeline([("clf", Recorded())]).set_params(**params)

    grid = [{"clf__C": c} for c in (0.1, 1.0)]
    steps = []
    cv, _ = nested_cv_fast(make, grid, fs.X, meta, split_plan(meta), n_jobs=1, progress=steps.append)
    assert len(fitted) == len(set(fitted))  # every (C, training rows) fitted once
    # the folds of donor_2 and donor_5 score nothing (no original view) and the second fits nothing
    fold5 = next(s for s in steps if "donor_5" in s.label)
    assert fold5.fits == 0
    assert isinstance(cv.predictions, pd.DataFrame) and set(cv.predictions["donor"]) == {
        f"donor_{i}" for i in (1, 3, 4, 6)
    }
