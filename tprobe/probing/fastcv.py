"""A faster engine for the nested donor-held-out protocol of :func:`tprobe.probing.evaluate.nested_cv`.

Same protocol, same answers, fewer and better-spread fits:

- **Shared fits.** Under leave-one-donor-out, the inner fit of outer fold *a* that validates on donor *b*
  trains on every donor but *a* and *b* - exactly the fit of outer fold *b* validating on *a*. The final
  head's inner search trains on every donor but one - exactly an outer fold's refit. Each distinct
  (grid point, training rows) is fitted once and predicts every row any split asks of it, so a sweep
  makes ~21 fits per grid point instead of ~36, with the same predictions (fits are seeded).
- **Path parameters.** A grid axis whose values are nested prefixes of one fit - XGBoost's
  ``clf__n_estimators`` (the first *k* trees of a 200-tree model are the 50-tree model) - is fitted
  once at its largest value and scored at every value (``iteration_range``), so the inner search
  chooses the number of trees at the cost of one fit.
- **Warm paths.** Logistic regression's ``clf__C`` values of one training set are fitted in one job,
  ascending, each warm-started from the last (equal to separate fits up to lbfgs's tolerance).
- **Parallel batches, one BLAS thread.** The fits of a run go to one joblib batch over ``n_jobs``
  workers with BLAS limited to one thread: on a busy 2-core machine, BLAS threads on these small
  problems only spin (a logreg run took 15.2 s with 2 BLAS threads, 2.3 s with one). ``backend``
  ``"threading"`` suits fits that release the GIL (XGBoost, numpy); ``"loky"`` runs processes, for
  fits whose Python loops hold it (lbfgs, the MLP; :data:`tprobe.probing.run.PROCESS_HEADS`).
- **Original views only.** Unless ``tta`` or ``train_views="all"`` asks for them, augmented views are
  neither trained on nor scored, so they are not even predicted.

``progress`` is called after each outer fold (and the final head's search) with a :class:`FoldProgress`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from tprobe.probing.evaluate import CVResult, Fold, _score_rows, selection

__all__ = ["FoldProgress", "nested_cv_fast", "PATH_PARAMS"]
log = logging.getLogger(__name__)

# grid axes scored as prefixes of one fit (predict with the first k trees; kNN: the k nearest of one
# neighbour search for the largest k, KNNHead.predict_proba_path)
PATH_PARAMS = ("clf__n_estimators", "clf__k")
# grid axes fitted in one job along the path of values, each fit warm-started from the previous one
# (ascending: the most regularised fit first); equal to separate fits up to the solver's tolerance
WARM_PARAMS = ("clf__C",)


@dataclass
class FoldProgress:
    """What one step of the engine did: an outer fold or the final head's inner search."""

    step: int  # 1-based; the final head's search is len(plan) + 1
    n_steps: int
    label: str  # "fold 3/6 (donor_4)" or "final head (all donors)"
    fits: int  # training jobs run in this step (a warm C path counts once)
    reused: int  # jobs this step needed that had already run (earlier folds', or its own refit)
    seconds: float
    best: dict | None = None

    def __str__(self) -> str:
        best = f"; chosen {self.best}" if self.best is not None else ""
        return f"{self.label}: {self.fits} fits ({self.reused} reused) in {self.seconds:.1f} s{best}"


def _split_path(grid: list[dict]) -> tuple[list[dict], dict[int, tuple[int, str | None, object]]]:
    """Group grid points that differ only in a path parameter: the fits to run and, per grid index,
    (fit index, path parameter name, its value)."""
    fits, where, index = [], {}, {}
    for i, params in enumerate(grid):
        name = next((p for p in PATH_PARAMS + WARM_PARAMS if p in params), None)
        rest = {k: v for k, v in params.items() if k != name}
        key = repr(sorted(rest.items()))
        if key not in index:
            index[key] = len(fits)
            fits.append(dict(rest))
        j = index[key]
        if name is not None:
            fits[j][name] = max(fits[j].get(name, params[name]), params[name])
        where[i] = (j, name, params.get(name))
    return fits, where


def _predict(model, X: np.ndarray, name: str | None, value) -> np.ndarray:
    if name is None or name in WARM_PARAMS:
        return model.predict_proba(X)[:, 1]
    scaled = model[:-1].transform(X) if len(model) > 1 else X
    if name == "clf__k":
        return model[-1].predict_proba_path(scaled, [value])[value][:, 1]
    return model[-1].predict_proba(scaled, iteration_range=(0, int(value)))[:, 1]


def _fit_and_predict(make, params, X, y, train, rows, outputs) -> dict:
    """Fit one head single-threaded; return ``{(name, value): proba over rows}`` per requested output.

    The fitted model is gone when this returns, and what it freed is handed back to the OS
    (:func:`tprobe.probing.rowfit.release_free_heap`): kept in the workers' heaps, it stayed resident
    beside the next fits and the final head's (0.8x the feature matrix at 100k cells)."""
    from tprobe.probing.rowfit import release_free_heap

    try:
        return _fit_model_and_predict(make, params, X, y, train, rows, outputs)
    finally:
        release_free_heap()


def _fit_model_and_predict(make, params, X, y, train, rows, outputs) -> dict:
    """:func:`_fit_and_predict`'s fit and predictions (its model freed on return)."""
    model = make(**params)
    warm = [v for name, v in outputs if name in WARM_PARAMS]
    if warm and len(model) == 1 and hasattr(model[-1], "fit_path"):
        # the whole path in one batched fit, reading X's training rows in place (tprobe.probing.linear)
        name = next(n for n, _ in outputs if n in WARM_PARAMS)
        fitted = model[-1].fit_path(X, y, sorted(warm), rows=train)
        # a copy of the class-1 column: a view would keep both columns of every C's predictions alive
        return {(name, m.C): m.predict_proba_rows(X, rows)[:, 1].copy() for m in fitted}
    if not warm:
        out = _fit_and_predict_rows(model, X, y, train, rows, outputs)
        if out is not None:
            return out
    Xt, yt = X[train], y[train]
    if warm:
        Xr = X[rows]
        name = next(n for n, _ in outputs if n in WARM_PARAMS)
        if hasattr(model[-1], "warm_start"):
            model.set_params(clf__warm_start=True)
        out = {}
        for v in sorted(warm):
            model.set_params(**{name: v}).fit(Xt, yt)
            out[(name, v)] = model.predict_proba(Xr)[:, 1].astype(np.float64)
        return out
    model.fit(Xt, yt)
    del Xt  # the prediction rows are gathered once the training copy is gone (peak memory at 400k cells)
    Xr = X[rows]
    ks = [v for name, v in outputs if name == "clf__k"]
    if ks and hasattr(model[-1], "predict_proba_path"):  # every k from one neighbour search
        scaled = model[:-1].transform(Xr) if len(model) > 1 else Xr
        path = model[-1].predict_proba_path(scaled, ks)
        return {
            out: (path[int(out[1])][:, 1] if out[0] == "clf__k" else _predict(model, Xr, *out)).astype(
                np.float64
            )
            for out in outputs
        }
    return {out: _predict(model, Xr, *out).astype(np.float64) for out in outputs}


def _fit_and_predict_rows(model, X, y, train, rows, outputs) -> dict | None:
    """:func:`_fit_and_predict` for kNN and XGBoost reading X's rows a block at a time
    (:mod:`tprobe.probing.rowfit`: the same numbers, no per-fit copy of the training rows);
    ``None`` for the other heads and data, which gather their rows."""
    from tprobe.probing.heads import KNNHead
    from tprobe.probing.rowfit import fit_rows, knn_proba_rows, predict_rows

    if isinstance(model[-1], KNNHead):
        if any(name not in (None, "clf__k") for name, _ in outputs):
            return None
        k = {out: int(out[1]) if out[0] == "clf__k" else int(model[-1].k) for out in outputs}
        path = knn_proba_rows(model, X, y, train, rows, sorted(set(k.values())))
        if path is None:
            return None
        return {out: path[k[out]][:, 1].astype(np.float64) for out in outputs}
    if fit_rows(model, X, y, train) is None:
        return None
    outputs = list(outputs)
    both = predict_rows(lambda Xb: np.column_stack([_predict(model, Xb, *out) for out in outputs]), X, rows)
    return {out: both[:, i].astype(np.float64) for i, out in enumerate(outputs)}


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads limited to ``n`` meanwhile, when torch is loaded (threadpoolctl does not
    reach its thread pool); the fits of a batch run in parallel, each single-threaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _TrainRows:
    """The training rows of one inner fit, as a recipe: ``base``'s rows whose donor is not ``drop`` (sorted;
    int32 when ``small``), built by :meth:`rows` when the fit is dispatched and dropped when it is done.

    A request holds this and the rows' content hash (its fit key), not the rows: a 20-donor run has 210
    distinct training sets of ~90% of the rows each, and holding them all for the whole run took 0.5x the
    feature matrix (issue 20)."""

    __slots__ = ("base", "donors", "drop", "small", "digest")

    def __init__(self, base: np.ndarray, donors: np.ndarray, drop, small: bool, digest: str):
        self.base, self.donors, self.drop, self.small, self.digest = base, donors, drop, small, digest

    def rows(self) -> np.ndarray:
        tr = self.base[self.donors[self.base] != self.drop]
        return tr.astype(np.int32) if self.small else tr


def _rows(train) -> np.ndarray:
    """A request's training rows as an array (built now for a :class:`_TrainRows`)."""
    return train.rows() if isinstance(train, _TrainRows) else train


def _union(parts: list[np.ndarray]) -> np.ndarray:
    """The sorted, unique int64 rows of the arrays ``parts``."""
    return np.unique(np.concatenate([np.empty(0, np.int64), *(np.asarray(p, np.int64) for p in parts)]))


def _key(j: int, train) -> tuple[int, str]:
    """(fit index, content hash of the training rows): int32 and int64 rows of one set hash alike."""
    if isinstance(train, _TrainRows):
        return j, train.digest
    return j, hashlib.sha1(np.ascontiguousarray(train, dtype=np.int64).tobytes()).hexdigest()


class _Fits:
    """Each distinct (fit, training rows) once; predictions kept for the rows asked of it until
    :meth:`release`. A training set given as a :class:`_TrainRows` is built only while its fit runs."""

    def __init__(self, make, fit_grid, where, X, y, n_jobs, backend="threading"):
        self.make, self.fit_grid, self.where, self.X, self.y = make, fit_grid, where, X, y
        self.n_jobs, self.backend = n_jobs, backend
        self.wanted: dict[tuple, dict] = {}  # key -> {"j", "train", "rows": [arrays], "outputs": set}
        self.done: dict[tuple, tuple[np.ndarray, dict]] = {}  # key -> (rows, {output: proba})

    def want(self, g: int, train, rows: np.ndarray) -> tuple:
        j, name, value = self.where[g]
        key = _key(j, train)
        w = self.wanted.setdefault(key, {"j": j, "train": train, "rows": [], "outputs": set()})
        if key in self.done and not (
            np.isin(rows, self.done[key][0]).all() and (name, value) in w["outputs"]
        ):
            del self.done[key]  # asked for more after it ran: fit again (costs time, never correctness)
        # the arrays asked for, united (sorted, unique) when the fit is dispatched: the requests share
        # their row arrays, so a planned fit holds no array of its own until it runs
        if not any(r is rows for r in w["rows"]):
            w["rows"].append(rows)
        w["outputs"].add((name, value))
        return key

    def run(self, keys) -> tuple[int, int]:
        """Fit the keys not yet done, in parallel; return (fitted, reused)."""
        fitted = list(self.stream(keys))
        return len(fitted), len(set(keys)) - len(fitted)

    def stream(self, keys) -> Iterator[tuple]:
        """Fit the keys not yet done as ONE parallel batch; yield each key once its fit is done, in order.

        One batch for a whole run keeps both workers busy across the folds' boundaries (a batch per
        fold idles a worker while the fold's last fit runs)."""
        todo = list(dict.fromkeys(k for k in keys if k not in self.done))
        if not todo:
            return
        jobs = []
        for k in todo:
            w = self.wanted[k]
            jobs.append(
                (k, self.fit_grid[w["j"]], w["train"], list(w["rows"]), sorted(w["outputs"], key=repr))
            )
        n_jobs = min(self.n_jobs, len(jobs)) if self.n_jobs > 0 else self.n_jobs
        sent = {}  # key -> the rows its running fit predicts
        fit = delayed(_fit_and_predict)

        def dispatch():
            # joblib reads this as it dispatches (a few jobs ahead of the workers): a job's training rows
            # (built now for a lazy training set) and predicted rows exist from then until its fit is done
            for k, params, train, parts, outputs in jobs:
                sent[k] = rows = _union(parts)
                yield fit(self.make, params, self.X, self.y, _rows(train), rows, outputs)

        with threadpool_limits(1), _torch_threads(1):
            outs = Parallel(n_jobs=n_jobs, backend=self.backend, return_as="generator")(dispatch())
            for (k, *_), out in zip(jobs, outs, strict=True):
                self.done[k] = (sent.pop(k), out)
                yield k

    def proba(self, g: int, train, rows: np.ndarray) -> np.ndarray:
        j, name, value = self.where[g]
        have, out = self.done[_key(j, train)]
        return out[(name, value)][np.searchsorted(have, rows)]

    def release(self, key: tuple) -> None:
        """Forget a fit whose predictions nothing will ask for again (asked later, it is fitted again)."""
        self.done.pop(key, None)
        self.wanted.pop(key, None)


def _inner_requests(grid, y, donors, train, is_orig, rows_cache: dict | None = None):
    """(grid index, inner train rows, validation rows) of one inner leave-one-donor-out search.

    The inner training sets are :class:`_TrainRows` recipes, built only while their fit runs, and shared:
    every grid point's request holds the same one, and ``rows_cache`` (shared across the searches of a
    run) hands out one per distinct training set - outer fold a's inner fit without b trains on exactly
    the rows of fold b's without a - and one validation array per distinct set of rows (a donor's rows
    are validated on by every fold that trains on them). Without sharing, 20 donors x 19 inner donors
    x 4 grid points of 400k-row index arrays held 4.4 GB for the whole run (issue 20)."""
    inner = sorted(set(donors[train]))
    if len(grid) == 1 or len(inner) < 2:
        return inner, []
    cache = {} if rows_cache is None else rows_cache
    small = len(y) < 2**31
    d_tr = donors[train]
    per_donor = []
    for d in inner:
        tr, va = train[d_tr != d], train[(d_tr == d) & is_orig[train]]
        if len(np.unique(y[tr])) == 2 and len(np.unique(y[va])) == 2:  # else AP undefined
            digest = _key(0, tr)[1]
            del tr  # rebuilt by the fit that needs it
            lazy = cache.setdefault(("train", digest), _TrainRows(train, donors, d, small, digest))
            va = cache.setdefault(("rows", _key(0, va)[1]), va)
            per_donor.append((lazy, va))
    return inner, [(g, tr, va) for g in range(len(grid)) for tr, va in per_donor]


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` for binary labels (ties grouped, step-wise, no
    interpolation), without its input validation: ~20x faster on a few hundred rows, equal to ~1e-15.
    The inner search computes thousands of these per sweep."""
    order = np.argsort(-score, kind="stable")
    s, y = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each run of tied scores
    tps = np.cumsum(y)[last]
    return float(np.sum(np.diff(tps / tps[-1], prepend=0.0) * tps / (last + 1)))


def _choose(grid, reqs, aps):
    """Mean AP per grid point over the inner donors (``aps[i]``: request ``reqs[i]``'s AP); the best
    (first on ties), as in ``inner_search``."""
    per: dict[int, list[float]] = {g: [] for g in range(len(grid))}
    for (g, _, _), ap in zip(reqs, aps, strict=True):
        per[g].append(ap)
    scores = {str(p): float(np.mean(per[g])) if per[g] else float("nan") for g, p in enumerate(grid)}
    best = max(
        range(len(grid)), key=lambda g: -np.inf if np.isnan(scores[str(grid[g])]) else scores[str(grid[g])]
    )
    return best, scores


def nested_cv_fast(
    make: Callable,
    grid: list[dict],
    X: np.ndarray,
    meta: pd.DataFrame,
    plan: list[Fold],
    *,
    train_views: str = "orig",
    tta: bool = False,
    final_head: bool = True,
    n_jobs: int = 2,
    progress: Callable[[FoldProgress], None] | None = None,
    backend: str = "threading",
) -> tuple[CVResult, tuple[dict, dict] | None]:
    """:func:`tprobe.probing.evaluate.nested_cv` plus, with ``final_head``, the final head's inner search.

    Returns ``(cv, final)`` where ``final`` is ``(best params, {params: mean AP})`` chosen by
    leave-one-donor-out over every donor (``None`` without ``final_head``); the caller refits it.
    """
    y = meta["label"].to_numpy()
    donors = meta["donor"].astype(str).to_numpy()
    is_orig = (meta["view"] == "orig").to_numpy()
    fit_grid, where = _split_path(grid)
    fits = _Fits(make, fit_grid, where, X, y, n_jobs, backend)
    n_steps = len(plan) + bool(final_head)

    def rows_of(fold_test):  # rows whose prediction is scored (all of a cell's views under tta)
        return fold_test if tta or is_orig[fold_test].all() else fold_test[is_orig[fold_test]]

    # plan every request up front so each fit predicts all the rows any step will score with it
    outer, rows_cache = [], {}
    for fold in plan:
        train = fold.train
        if train_views != "all" and not is_orig[train].all():  # a copy only when there are views to drop
            train = train[is_orig[train]]
        _, reqs = _inner_requests(grid, y, donors, train, is_orig, rows_cache)
        keys = [fits.want(g, tr, va) for g, tr, va in reqs]
        outer.append((fold, train, reqs, keys))
    final_reqs, final_keys = [], []
    if final_head:
        keep = np.arange(len(meta)) if train_views == "all" else np.flatnonzero(is_orig)
        inner, final_reqs = _inner_requests(grid, y, donors, keep, is_orig, rows_cache)
        if len(grid) > 1 and len(inner) < 2:
            log.warning("one training donor: no inner validation; using the first grid point")
        final_keys = [fits.want(g, tr, va) for g, tr, va in final_reqs]
    # an outer refit that a planned fit already is (the final search's) predicts the test rows too
    tests = [rows_of(fold.test) for fold in plan]  # one array per fold: the planned fit and the step share it
    for (_, train, _, _), test in zip(outer, tests, strict=True):
        for g in range(len(grid)):
            j, *_ = where[g]
            if _key(j, train) in fits.wanted:
                fits.want(g, train, test)

    # every planned fit in one parallel batch, in the order the steps need them: each outer fold's
    # inner fits plus any final-search fit that is its refit candidate, then the rest of the final search
    # ``holds`` counts the folds yet to refit on a key: a planned fit, or a refit no plan asked for that a
    # later fold trains on too (folds whose donors add no original view train on the same rows)
    steps, seen, holds = [], set(), Counter()
    for _, train, _, keys in outer:
        candidates = list(dict.fromkeys(_key(where[g][0], train) for g in range(len(grid))))
        refit_keys = [k for k in candidates if k in fits.wanted]
        holds.update(candidates)
        need = list(dict.fromkeys(keys + refit_keys))
        steps.append((need, [k for k in need if k not in seen], candidates))
        seen.update(need)
    final_new = [k for k in dict.fromkeys(final_keys) if k not in seen]

    # each inner request's AP is computed as soon as its fit arrives, and a fit's predictions are
    # released once its last request is scored and no outer refit may ask for them: a 20-donor run
    # holds a few fits' predictions at a time, not its 190 inner training sets' (issue 20)
    all_reqs = [reqs for _, _, reqs, _ in outer] + [final_reqs]
    consumers: dict[tuple, list[tuple[int, int]]] = {}
    for s, keys in enumerate([keys for *_, keys in outer] + [final_keys]):
        for i, k in enumerate(keys):
            consumers.setdefault(k, []).append((s, i))
    aps: list[list[float]] = [[np.nan] * len(r) for r in all_reqs]
    arrived: set[tuple] = set()

    def arrive(k):
        arrived.add(k)
        for s, i in consumers.pop(k, ()):
            g, tr, va = all_reqs[s][i]
            aps[s][i] = average_precision(y[va], fits.proba(g, tr, va))
        if not holds[k]:
            fits.release(k)

    with closing(fits.stream([k for _, new, _ in steps for k in new] + final_new)) as batch:
        t0 = time.perf_counter()

        def wait_for(keys):  # consume the batch until these fits are done
            while any(k not in arrived for k in keys):
                arrive(next(batch))

        preds, chosen = [], []
        for step, ((fold, train, reqs, _), (need, new, candidates), test) in enumerate(
            zip(outer, steps, tests, strict=True), 1
        ):
            wait_for(need)
            n_fit, n_reused = len(new), len(need) - len(new)
            if not reqs:
                if len(grid) > 1:
                    log.warning("one training donor: no inner validation; using the first grid point")
                best, scores = 0, {}
            else:
                best, scores = _choose(grid, reqs, aps[step - 1])
            k = fits.want(best, train, test)
            more, again = fits.run([k])
            n_fit, n_reused = n_fit + more, n_reused + again
            proba = fits.proba(best, train, test)
            holds.subtract(candidates)
            for done in candidates:  # the refit k is one of them
                if not holds[done] and done not in consumers:
                    fits.release(done)
            preds.append(_score_rows(meta, test, proba, tta).assign(fold=fold.index))
            chosen.append(
                {
                    "fold": fold.index,
                    "params": grid[best],
                    "inner_ap": scores,
                    "selection": selection(grid, scores),
                }
            )
            if progress is not None:
                name = ",".join(fold.test_donors)
                progress(
                    FoldProgress(
                        step,
                        n_steps,
                        f"fold {step}/{len(plan)} ({name})",
                        n_fit,
                        n_reused,
                        time.perf_counter() - t0,
                        grid[best],
                    )
                )
            t0 = time.perf_counter()
        wait_for(final_new)
    cv = CVResult(pd.concat(preds, ignore_index=True), chosen)
    if not final_head:
        return cv, None
    n_fit, n_reused = len(final_new), len(set(final_keys)) - len(final_new)
    best, scores = _choose(grid, final_reqs, aps[-1]) if final_reqs else (0, {})
    if progress is not None:
        progress(
            FoldProgress(
                n_steps,
                n_steps,
                "final head (all donors)",
                n_fit,
                n_reused,
                time.perf_counter() - t0,
                grid[best],
            )
        )
    return cv, (grid[best], scores)


def projected(fs, max_dims: int | None, seed: int, rows: np.ndarray | None = None):
    """``(X, projection)``: ``fs.X``, or its fixed Gaussian random projection to ``max_dims`` columns
    when it is wider (``projection`` is then the fitted ``GaussianRandomProjection``, else ``None``).

    With a boolean ``rows`` mask only those rows are projected (the others stay zero and must not
    be used). The projection is drawn from ``seed`` and the width alone, as in the reference
    engine, and the result is cached on ``fs`` so the heads of a sweep share it.
    """
    X = fs.X
    if max_dims is None or X.shape[1] <= max_dims:
        return X, None
    from tprobe.probing.heads import projection

    cache = fs.__dict__.setdefault("_projections", {})
    mask = np.ones(len(X), bool) if rows is None else np.asarray(rows, bool)
    key = (max_dims, seed)
    if key not in cache:
        cache[key] = (projection(X.shape[1], max_dims, seed), None, None)
    proj, have, out = cache[key]
    if have is None or (mask & ~have).any():
        need = mask if have is None else (mask | have)
        out = np.zeros((len(X), max_dims), np.float32)
        out[need] = proj.transform(X[need]).astype(np.float32)
        cache[key] = (proj, need, out)
    return out, proj
