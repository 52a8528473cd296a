"""Heads fitted on rows of the feature matrix read a block at a time: the numbers of
``model.fit(X[rows], y[rows])``, without the copies (issue 20: probes at 400k cells).

The engine's fits used to gather their training rows (``X[train]``: ~5/6 of the matrix under
leave-one-donor-out), and each of the two workers then held, at its peak, several more copies of
them: scikit-learn's ``StandardScaler.fit`` makes a float64 ``X - mean`` (twice the float32 rows) and
``transform`` a standardised copy; the kNN head its L2-normalised copy and the squares on the way;
XGBoost its quantised matrix beside the gathered and standardised rows. At 100k cells a run held
~7x the feature matrix. Here:

- :func:`standard_scaler_rows`: ``StandardScaler().fit(X[rows])`` from a block of rows at a time, the
  same fitted numbers to the bit (scikit-learn's float64 sums, row by row, in the same order).
- kNN (:func:`knn_proba_rows`, the engine's fits): the training rows are never held, neither raw nor
  standardised: each block of them is gathered, standardised and L2-normalised when the search
  reaches it (:func:`tprobe.probing.heads.knn_votes`). The final head (:func:`fit_rows`) keeps its
  normalised rows (they are the saved head), built block by block.
- XGBoost (:func:`fit_rows`): its ``QuantileDMatrix`` is built from an ``xgboost.DataIter`` that hands
  it the standardised training rows a block at a time, so only the quantised matrix (1 byte a value
  at 32 bins) is held; XGBoost's own fit makes the same one from one batch, and the cuts, trees and
  predictions are the same (a test compares them). Its predictions are made a block of rows at a
  time (:func:`predict_rows`).

A model these do not cover (another head, a scaler with other options, non-finite values, a single
column) returns ``None``: the caller fits on ``X[rows]`` as before.

What a fit frees is not all handed back to the OS: glibc keeps freed blocks of each thread's heap
(its mmap threshold rises to the size of the largest block freed, up to 32 MiB, so a fit's blocks,
similarity matrices and XGBoost's quantised matrices come from the heap after the first fit). At 100k
cells the engine's two workers kept ~0.8x the feature matrix of freed memory resident into the final
head's fit, which adds its own (kNN: the 1x normalised rows): a peak of 2.97-3.11x the matrix above
the floor for kNN, 3.11-3.62x for XGBoost (``scripts/bench_scale.py``, 6 donors). :func:`release_free_heap`
hands it back after each engine fit (``tprobe.probing.fastcv``) and before the final head
(``tprobe.probing.run``): 2.78x and 2.93-2.95x, the same numbers to the bit and no slower.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np
from sklearn.preprocessing import StandardScaler

from tprobe.probing.heads import ROW_BLOCK, KNNHead, _l2, knn_votes

__all__ = [
    "standard_scaler_rows",
    "fit_rows",
    "knn_proba_rows",
    "predict_rows",
    "release_free_heap",
    "ROW_BLOCK",
]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once; None where this C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Hand the free memory of every malloc heap back to the OS (glibc's ``malloc_trim(0)``, the
    worker threads' heaps too); ``False`` where the C library has no such call. Nothing allocated
    is touched: only the resident size changes (see the module's notes)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # ctypes releases the GIL meanwhile
    return True


def standard_scaler_rows(X: np.ndarray, rows: np.ndarray, block: int = ROW_BLOCK) -> StandardScaler | None:
    """``StandardScaler().fit(X[rows])``, reading ``block`` rows of ``X`` at a time.

    The same fitted numbers to the bit: scikit-learn sums the float32 rows in float64 one row after
    another (numpy's reduction over the first axis), then the float64 ``x - mean`` and its squares
    the same way (the corrected two-pass variance); each block's sums here start from the running
    sum, so the additions happen in the same order. ``None`` (the caller gathers the rows) where that
    does not hold or scikit-learn would not accept the rows: a non-float32/64 matrix, one column
    (numpy sums a contiguous column pairwise), no rows, or a non-finite value (NaN is skipped and
    infinity refused by scikit-learn's own fit, which the caller then runs)."""
    try:  # scikit-learn's own zero-scale handling; a release that moves it falls back to the gathered fit
        from sklearn.preprocessing._data import _handle_zeros_in_scale, _is_constant_feature
    except ImportError:
        return None
    X = np.asarray(X)
    n = len(rows)
    if X.ndim != 2 or X.dtype not in (np.float32, np.float64) or X.shape[1] < 2 or n == 0:
        return None
    d = X.shape[1]
    buf = np.empty((min(block, n) + 1, d), np.float64)

    def add(acc, part):
        """``acc`` plus the rows ``part[1:]``, one after another (``part[0]`` is scratch)."""
        if acc is None:
            return part[1:].sum(axis=0)  # the first rows start the sum, as in one reduction
        part[0] = acc
        return part.sum(axis=0)

    total = None
    for lo in range(0, n, block):
        part = buf[: min(block, n - lo) + 1]
        part[1:] = X[rows[lo : lo + block]]
        total = add(total, part)
    if not np.isfinite(total).all():
        return None
    count = np.zeros(d) + np.float64(n)  # scikit-learn's per-column counts (no NaN)
    mean = (np.zeros(d) + total) / count
    centre = total / count
    correction = squares = None
    for lo in range(0, n, block):  # the corrected two-pass variance: sums of x - mean and its squares
        part = buf[: min(block, n - lo) + 1]
        part[1:] = X[rows[lo : lo + block]]
        part[1:] -= centre
        correction = add(correction, part)
        part[1:] **= 2
        squares = add(squares, part)
    var = (squares - correction**2 / count) / count
    scaler = StandardScaler()
    scaler.n_features_in_ = d
    scaler.n_samples_seen_ = count[0]
    scaler.mean_ = mean
    scaler.var_ = var
    scaler.scale_ = _handle_zeros_in_scale(
        np.sqrt(var), copy=False, constant_mask=_is_constant_feature(var, mean, count[0])
    )
    return scaler


def _scaler_of(model) -> tuple[bool, object]:
    """(whether ``model`` is [optional default StandardScaler, head], the unfitted scaler or None)."""
    steps = [est for _, est in model.steps[:-1]] if hasattr(model, "steps") else None
    if steps is None or len(steps) > 1:
        return False, None
    if not steps:
        return True, None
    scaler = steps[0]
    plain = type(scaler) is StandardScaler and scaler.with_mean and scaler.with_std
    return plain, scaler


def _block_reader(X, rows, scaler):
    """``(lo, hi) -> X[rows[lo:hi]]`` standardised by the fitted ``scaler`` (in place: the gather is a copy)."""
    if scaler is None:
        return lambda lo, hi: X[rows[lo:hi]]
    return lambda lo, hi: scaler.transform(X[rows[lo:hi]], copy=False)


def _fitted_scaler(model, X, rows):
    """Fit the model's scaler step on ``X[rows]`` block by block: (ok, fitted scaler or None)."""
    plain, scaler = _scaler_of(model)
    if not plain:
        return False, None
    if scaler is None:
        return True, None
    fitted = standard_scaler_rows(X, rows)
    if fitted is None:
        return False, None
    model.steps[0] = (model.steps[0][0], fitted)
    return True, fitted


def _is_xgb_hist(clf) -> bool:
    """An ``XGBClassifier`` whose own fit would build a ``QuantileDMatrix`` from the rows."""
    if type(clf).__name__ != "XGBClassifier" or type(clf).__module__ != "xgboost.sklearn":
        return False
    if not callable(getattr(type(clf), "_create_dmatrix", None)):  # the hook _fit_xgb replaces; a release
        return False  # without it falls back to the gathered fit instead of fitting on the iterator
    return (
        clf.tree_method in ("hist", None, "auto")
        and clf.booster != "gblinear"
        and clf.device in (None, "cpu")
        and clf.feature_types is None
        and getattr(clf, "feature_weights", None) is None
        and not clf.enable_categorical
    )


def fit_rows(model, X: np.ndarray, y: np.ndarray, rows: np.ndarray, block: int = ROW_BLOCK):
    """``model.fit(X[rows], y[rows])`` with the same numbers, without a copy of the rows, for a
    pipeline of a default ``StandardScaler`` (or none) and a kNN or XGBoost head; ``None`` for
    any other model or data (nothing is fitted then)."""
    clf = model[-1] if hasattr(model, "steps") else None
    if not isinstance(clf, KNNHead) and not _is_xgb_hist(clf):
        return None
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2:
        return None
    ok, scaler = _fitted_scaler(model, X, rows)
    if not ok:
        return None
    read = _block_reader(X, rows, scaler)
    if isinstance(clf, KNNHead):
        clf.fit_blocks(len(rows), X.shape[1], read, y[rows])
        return model
    _fit_xgb(clf, read, len(rows), y[rows], block)
    return model


def _fit_xgb(clf, read, n: int, y: np.ndarray, block: int) -> None:
    """``clf.fit`` (an ``XGBClassifier``) on the rows ``read(lo, hi)`` hands out, ``block`` at a time."""
    import xgboost

    class Blocks(xgboost.DataIter):
        def __init__(self):
            super().__init__(release_data=True)
            self.at = 0

        def next(self, input_data) -> bool:
            if self.at >= n:
                return False
            hi = min(self.at + block, n)
            input_data(data=read(self.at, hi), label=y[self.at : hi])
            self.at = hi
            return True

        def reset(self) -> None:
            self.at = 0

    blocks = Blocks()

    def create_dmatrix(ref=None, *, data, missing, **info):
        # what XGBClassifier._create_dmatrix builds (with max_bin and nthread), from blocks: the labels
        # come with them; weights, margins, groups and feature weights are not used (fit gets none)
        unused = ("weight", "base_margin", "group", "qid", "feature_weights", "feature_types")
        if data is not blocks or ref is not None or any(info.get(k) is not None for k in unused):
            raise RuntimeError(f"XGBoost asked for a DMatrix the row blocks cannot give: {sorted(info)}")
        return xgboost.QuantileDMatrix(blocks, missing=missing, nthread=clf.n_jobs, max_bin=clf.max_bin)

    clf._create_dmatrix = create_dmatrix  # this fit only; removed below, so the head saves as before
    try:
        clf.fit(blocks, y)
    finally:
        del clf._create_dmatrix


def knn_proba_rows(model, X: np.ndarray, y: np.ndarray, train: np.ndarray, rows: np.ndarray, ks):
    """``{k: model.fit(X[train], y[train])[-1].predict_proba_path(transform(X[rows]), ks)[k]}`` for a
    kNN pipeline (a default ``StandardScaler`` or none, then :class:`~tprobe.probing.heads.KNNHead`), the
    same numbers, holding neither the training rows nor their standardised copy: each block of them
    is gathered and standardised when the search reaches it; ``None`` for another model or data."""
    clf = model[-1] if hasattr(model, "steps") else None
    X = np.asarray(X)
    if not isinstance(clf, KNNHead) or X.ndim != 2:
        return None
    ok, scaler = _fitted_scaler(model, X, train)
    if not ok:
        return None
    yt = np.asarray(y)[train]
    classes = np.unique(yt)
    labels = np.searchsorted(classes, yt).astype(np.int64)
    train_rows, query_rows = _block_reader(X, train, scaler), _block_reader(X, rows, scaler)
    return knn_votes(
        lambda lo, hi: _l2(query_rows(lo, hi)),
        len(rows),
        X.shape[1],
        lambda lo, hi: _l2(train_rows(lo, hi)),
        labels,
        len(classes),
        ks,
        temperature=clf.temperature,
        batch_size=clf.batch_size,
    )


def predict_rows(predict, X: np.ndarray, rows: np.ndarray, block: int = ROW_BLOCK) -> np.ndarray:
    """``predict(X[rows])`` a block of rows at a time, concatenated: for heads whose prediction of a
    row depends on that row only (XGBoost), the same numbers without a copy of every row."""
    if len(rows) <= block:
        return predict(X[rows])
    return np.concatenate([predict(X[rows[lo : lo + block]]) for lo in range(0, len(rows), block)])
