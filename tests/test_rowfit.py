"""kNN and XGBoost fitted on X's rows a block at a time (issue 20 §3): the same numbers as the gathered
fits, without their copies of the training rows."""

import tracemalloc
import weakref
from functools import partial

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from tprobe.features.synthetic import synthetic_features
from tprobe.probing import fastcv, heads, rowfit
from tprobe.probing.evaluate import split_plan
from tprobe.probing.heads import load_head_file, make_head, param_grid, save_head
from tprobe.probing.rowfit import fit_rows, knn_proba_rows, standard_scaler_rows


def _data(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # columns of very different scales and offsets, one constant: the scaler's numbers matter
    X = (rng.normal(size=(n, d)) * rng.uniform(0.01, 50, d) + rng.uniform(-100, 100, d)).astype(np.float32)
    X[:, 3] = 7.0
    y = (X[:, 0] / X[:, 0].std() + rng.normal(size=n) > 0).astype(np.int64)
    order = rng.permutation(n)
    return X, y, np.sort(order[: n * 2 // 3]).astype(np.int32), np.sort(order[n * 2 // 3 :])


def _same_scaler(a: StandardScaler, b: StandardScaler):
    assert a.n_features_in_ == b.n_features_in_
    assert type(a.n_samples_seen_) is type(b.n_samples_seen_) and a.n_samples_seen_ == b.n_samples_seen_
    for name in (
        "mean_",
        "var_",
        "scale_",
    ):  # to the bit today; 1e-13 lets a scikit-learn release reorder a sum
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-13, atol=0)
        assert getattr(a, name).dtype == getattr(b, name).dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [1, 97, 5000])
def test_scaler_from_blocks_is_scikit_learns(dtype, block):
    X, _, train, _ = _data()
    X = X.astype(dtype)
    _same_scaler(standard_scaler_rows(X, train, block=block), StandardScaler().fit(X[train]))


def test_scaler_from_blocks_leaves_nan_inf_and_one_column_to_scikit_learn():
    X, _, train, _ = _data(n=200)
    assert standard_scaler_rows(X[:, :1], train) is None  # numpy sums one contiguous column pairwise
    for bad in (np.nan, np.inf):
        Xb = X.copy()
        Xb[train[5], 2] = bad
        assert standard_scaler_rows(Xb, train) is None
    assert standard_scaler_rows(X.astype(np.float16), train) is None


def _old_knn(X, y, train, rows, ks, scale=True):
    """The engine's gathered kNN path before: fit on X[train], standardise X[rows], one search."""
    model = make_head("knn", clf__k=max(ks), scale=scale).fit(X[train], y[train])
    scaled = model[:-1].transform(X[rows]) if scale else X[rows]
    return model[-1].predict_proba_path(scaled, ks)


@pytest.mark.parametrize("scale", [True, False])
def test_knn_from_blocks_equals_the_gathered_fit(monkeypatch, scale):
    X, y, train, rows = _data()
    # small blocks: many training blocks, a short last batch; the search chunked (many chunks) or not
    monkeypatch.setattr(heads, "TOPK_BLOCK", 2**12)
    ks = [1, 5, 20, 50]
    old = _old_knn(X, y, train, rows, ks, scale)
    monkeypatch.setattr(heads, "QUERY_CHUNK_BYTES", 2**13)
    new = knn_proba_rows(make_head("knn", clf__k=50, scale=scale), X, y, train, rows, ks)
    for k in ks:  # the same neighbours: equal up to the scaler's last bits (see _same_scaler)
        np.testing.assert_allclose(new[k], old[k], rtol=0, atol=1e-6)


def test_knn_from_blocks_equals_scikit_learns_neighbours_on_standardised_data():
    """An independent check: scikit-learn's brute-force cosine kNN, each neighbour weighted
    exp(similarity / temperature) (cosine distance = 1 - similarity), on the training rows' scaling."""
    X, y, train, rows = _data()
    Z = StandardScaler().fit(X[train])
    for k in (5, 20):
        ref = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07)
        ).fit(Z.transform(X[train]).astype(np.float64), y[train])
        new = knn_proba_rows(make_head("knn", clf__k=k), X, y, train, rows, [k])[k]
        np.testing.assert_allclose(new, ref.predict_proba(Z.transform(X[rows]).astype(np.float64)), atol=1e-5)


def test_final_knn_head_from_blocks_is_the_gathered_head_and_saves(tmp_path):
    X, y, train, rows = _data()
    new = fit_rows(make_head("knn", clf__k=10), X, y, train)
    old = make_head("knn", clf__k=10).fit(X[train], y[train])
    _same_scaler(new[0], old[0])
    np.testing.assert_allclose(new[-1].X_, old[-1].X_, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(new[-1].y_, old[-1].y_)
    np.testing.assert_allclose(new.predict_proba(X[rows]), old.predict_proba(X[rows]), rtol=0, atol=1e-6)
    back = load_head_file(save_head(new, tmp_path / "h.skops"))
    np.testing.assert_array_equal(back.predict_proba(X[rows]), new.predict_proba(X[rows]))


@pytest.mark.parametrize("block", [97, 100_000])
def test_xgboost_from_blocks_grows_the_same_trees(tmp_path, block):
    """XGBoost's own fit builds its QuantileDMatrix from one batch; from blocks (a DataIter) the quantile
    cuts, the trees and the predictions are the same (same max_bin and seed; subsampling too)."""
    X, y, train, rows = _data(n=1500)
    new = fit_rows(make_head("xgboost", clf__max_depth=2, clf__n_estimators=30), X, y, train, block=block)
    _same_scaler(new[0], StandardScaler().fit(X[train]))
    # XGBoost's own fit on the same standardised rows (the scaler's exact bits are tested above)
    old = make_head("xgboost", clf__max_depth=2, clf__n_estimators=30)
    old.steps[0] = (old.steps[0][0], new[0])
    old[-1].fit(new[0].transform(X[train]), y[train])
    assert new[-1].get_booster().get_dump() == old[-1].get_booster().get_dump()
    np.testing.assert_array_equal(new.predict_proba(X[rows]), old.predict_proba(X[rows]))
    assert "_create_dmatrix" not in vars(new[-1])  # the fit's own DMatrix maker is back
    back = load_head_file(save_head(new, tmp_path / "h.skops"))
    np.testing.assert_array_equal(back.predict_proba(X[rows]), old.predict_proba(X[rows]))


def test_fit_rows_leaves_other_heads_and_scalers_to_the_gathered_fit():
    X, y, train, _ = _data(n=300)
    assert fit_rows(make_head("logreg"), X, y, train) is None
    assert fit_rows(make_head("prototype"), X, y, train) is None
    odd = make_head("knn").set_params(scale__with_mean=False)
    assert fit_rows(odd, X, y, train) is None and not hasattr(odd[-1], "X_")


@pytest.mark.parametrize("head", ["knn", "xgboost"])
def test_nested_cv_from_blocks_equals_the_gathered_engine(monkeypatch, head):
    fs = synthetic_features(1200, 4, 16, seed=2)
    plan = split_plan(fs.meta)
    make = partial(make_head, head, clf__n_estimators=40) if head == "xgboost" else partial(make_head, head)
    new, new_final = fastcv.nested_cv_fast(make, param_grid(head), fs.X, fs.meta, plan, n_jobs=2)
    monkeypatch.setattr(fastcv, "_fit_and_predict_rows", lambda *a: None)  # the gathered path
    old, old_final = fastcv.nested_cv_fast(make, param_grid(head), fs.X, fs.meta, plan, n_jobs=2)
    # the same numbers up to the scaler's last bits (bitwise with today's scikit-learn; see _same_scaler)
    np.testing.assert_allclose(
        new.predictions["p_activated"], old.predictions["p_activated"], rtol=0, atol=1e-6
    )
    assert new.chosen == old.chosen and new_final == old_final


@pytest.mark.parametrize("head", ["knn", "xgboost"])
def test_an_engine_fit_holds_no_copy_of_its_training_rows(monkeypatch, head):
    """Before: a fit gathered X[train] and standardised it (scikit-learn's float64 X - mean on the way),
    kNN normalised it again: several copies of the training rows per fit, in each of two workers (7x the
    matrix at 100k cells). Now a block of rows at a time."""
    monkeypatch.setattr(heads, "TOPK_BLOCK", 2**14)  # the kNN search's own bounded blocks, smaller
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40_000, 64)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=len(X)) > 0).astype(np.int64)
    train, rows = np.arange(6_000, 40_000, dtype=np.int32), np.arange(1_000)
    grid = param_grid(head)
    fit_grid, _ = fastcv._split_path(grid)
    make = partial(make_head, head, clf__n_estimators=5) if head == "xgboost" else partial(make_head, head)
    outputs = [("clf__k", 50)] if head == "knn" else [(None, None)]
    tracemalloc.start()
    try:
        out = fastcv._fit_and_predict(make, fit_grid[0], X, y, train, rows, outputs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[outputs[0]].shape == (1_000,)
    assert peak < X[train].nbytes / 2, f"{peak / 2**20:.1f} MiB for {X[train].nbytes / 2**20:.1f} MiB of rows"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not rowfit.release_free_heap(), reason="no malloc_trim in this C library")
def test_release_free_heap_hands_a_worker_threads_freed_blocks_back():
    """What the engine's fits left behind: glibc keeps freed blocks of a worker thread's heap resident (its
    mmap threshold rises to the largest block freed), 0.8x the feature matrix at 100k cells (issue 20 §3)."""
    import threading

    seen = {}

    def worker():
        np.ones(2**21)  # a freed 16 MiB block: later blocks up to that size come from this thread's heap
        blocks = [np.ones(2**19) for _ in range(24)]  # 24 x 4 MiB, touched
        kept = blocks[1::2]  # every other one stays: the 12 freed between them cannot merge into the top
        del blocks
        seen["freed"] = _rss_mib()
        rowfit.release_free_heap()
        seen["released"] = _rss_mib()
        del kept

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["freed"] - seen["released"] > 32, seen  # of the 48 MiB freed


@pytest.mark.parametrize("head", ["knn", "xgboost"])
def test_each_engine_fit_is_freed_and_its_memory_released(monkeypatch, head):
    """Each fit of the engine hands its freed memory back once its model is gone (before: never; the final
    head's fit then ran beside it), and the numbers are the same as without the release, to the bit."""
    fs = synthetic_features(1200, 4, 16, seed=2)
    plan = split_plan(fs.meta)
    models, released = [], []

    def make(**params):
        kw = {"clf__n_estimators": 40} if head == "xgboost" else {}
        model = make_head(head, **kw, **params)
        models.append(weakref.ref(model))
        return model

    def release():
        released.append(sum(m() is not None for m in models))
        return True

    new, new_final = fastcv.nested_cv_fast(make, param_grid(head), fs.X, fs.meta, plan, n_jobs=1)
    n_fits = len(models)
    monkeypatch.setattr(rowfit, "release_free_heap", release)
    models.clear()
    again, again_final = fastcv.nested_cv_fast(make, param_grid(head), fs.X, fs.meta, plan, n_jobs=1)
    assert len(released) == len(models) == n_fits > 0
    assert released == [0] * n_fits  # every fitted model already freed when its memory is released
    np.testing.assert_array_equal(new.predictions["p_activated"], again.predictions["p_activated"])
    assert new.chosen == again.chosen and new_final == again_final
