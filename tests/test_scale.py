"""Probes at scale (issue 20): the kNN head's memory, the synthetic benchmark data and its growth exponent."""

import importlib.util
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

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


def test_inner_searches_hold_one_row_array_per_distinct_training_set():
    """Before: every (outer fold, inner donor, grid point) held its own copy of its training rows -
    20 donors x 19 x 4 grid points of ~360k int64 indices held 4.4 GB at 400k cells. Now one array per
    distinct training set (all donors but a and b), shared by the grid points and by folds a and b."""
    from tprobe.probing.evaluate import split_plan
    from tprobe.probing.fastcv import _inner_requests

    fs = synthetic_features(600, 5, 4, seed=4)
    meta = fs.meta
    y, donors = meta["label"].to_numpy(), meta["donor"].to_numpy()
    is_orig = np.ones(len(meta), bool)
    grid = [{"clf__C": c} for c in (0.01, 0.1, 1.0, 10.0)]
    cache, reqs = {}, []
    for fold in split_plan(meta):
        _, r = _inner_requests(grid, y, donors, fold.train, is_orig, cache)
        reqs += r
        for _, tr, va in r:  # the same rows as before
            (held,) = set(donors[va])
            assert set(donors[tr]) == set(donors) - {held, fold.test_donors[0]}
            assert np.array_equal(tr, fold.train[donors[fold.train] != held])
    assert len(reqs) == 5 * 4 * 4
    assert len({id(tr) for _, tr, _ in reqs}) == 10  # 5 choose 2 training sets
    assert all(tr.dtype == np.int32 for _, tr, _ in reqs)


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
