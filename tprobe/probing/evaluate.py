"""Donor-grouped splits, nested cross-validation and per-donor metrics.

Honesty rules enforced here: a donor (and so every view of a cell) is never on both sides of a
split; hyperparameters are chosen on validation donors taken from the training donors only; by
default only original views are scored, with ``tta=True`` averaging over each cell's views.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sklearn.model_selection import GroupKFold

from tprobe.errors import TprobeError
from tprobe.features.sources import CLASS_NAMES

__all__ = [
    "Evaluation",
    "evaluate",
    "Fold",
    "split_plan",
    "check_plan",
    "one_donor",
    "check_labels",
    "check_train_classes",
    "checked_plan",
    "check_train_donors",
    "nested_cv",
    "donor_metrics",
    "selection",
    "summarise",
    "auc_donors",
    "SPLITS",
    "METRICS",
]
log = logging.getLogger(__name__)

SPLITS = ("leave-one-donor-out", "group-kfold", "test-donor")
METRICS = ("accuracy", "balanced_accuracy", "average_precision", "roc_auc", "f1", "brier", "ece")
# accuracy, balanced accuracy and F1 call a cell activated at this fixed threshold (chosen on no donor)
THRESHOLD = 0.5
THRESHOLD_NOTE = f"fixed threshold {THRESHOLD} on p_activated (not tuned on any donor)"


@dataclass
class Fold:
    """One outer split: the donors held out and the row indices on each side."""

    index: int
    test_donors: list[str]
    train: np.ndarray
    test: np.ndarray

    def to_dict(self, meta: pd.DataFrame) -> dict:
        return {
            "fold": self.index,
            "test_donors": self.test_donors,
            "train_donors": sorted(meta["donor"].iloc[self.train].unique().tolist()),
            "n_train_rows": int(len(self.train)),
            "n_test_rows": int(len(self.test)),
            "test_groups": sorted(meta["group"].iloc[self.test].unique().tolist()),
        }


def split_plan(
    meta: pd.DataFrame,
    split: str = "leave-one-donor-out",
    *,
    test_donor: str | None = None,
    n_splits: int = 5,
) -> list[Fold]:
    """Outer folds over donors. ``meta`` needs ``donor`` and ``group`` columns."""
    if split not in SPLITS:
        raise TprobeError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if test_donor is not None and split != "test-donor":  # never recorded as if it had been used
        raise TprobeError(
            f"a test donor ({test_donor}) applies to split 'test-donor' only, not {split!r}: drop it or "
            "pass split='test-donor' (--split test-donor)"
        )
    donors = np.asarray(meta["donor"].astype(str))
    names = sorted(set(donors))
    if len(names) < 2:  # every split would hold out nothing, or put the donor's cells on both sides
        raise TprobeError(one_donor(names, split))
    if split == "test-donor":
        if test_donor is None:
            raise TprobeError("split 'test-donor' needs a test donor (--test-donor NAME)")
        test_donor = test_donor if test_donor in names else f"donor_{test_donor}"
        if test_donor not in names:
            raise TprobeError(f"test donor {test_donor} is not in the data; donors: {', '.join(names)}")
        sets = [[test_donor]]
    elif split == "leave-one-donor-out":
        sets = [[d] for d in names]
    else:  # group-kfold on donors
        if len(names) < n_splits:
            raise TprobeError(
                f"split 'group-kfold' with {n_splits} folds needs at least {n_splits} donors; the data has "
                f"{len(names)} ({', '.join(names)}): pass --folds {len(names)} or use leave-one-donor-out"
            )
        gkf = GroupKFold(n_splits=n_splits)
        folds = []
        for i, (tr, te) in enumerate(gkf.split(np.zeros(len(meta)), groups=donors)):
            folds.append(Fold(i, sorted(set(donors[te])), tr, te))
        return folds
    return [
        Fold(i, s, np.flatnonzero(~np.isin(donors, s)), np.flatnonzero(np.isin(donors, s)))
        for i, s in enumerate(sets)
    ]


def one_donor(names: list[str], split: str | None = None) -> str:
    """The one line for data of fewer than 2 donors: no split of it holds a donor out."""
    have = f"one donor ({names[0]})" if names else "no donor"
    return (
        f"{f'split {split!r}' if split else 'the split'}: the data has {have}, so no split holds a donor "
        "out (its cells would be on both sides, or nothing left to train on); give each image its donor: "
        "a donor column in the table, or one folder per donor (DIR/donor_1/activated/...)"
    )


def check_plan(plan: list[Fold], meta: pd.DataFrame) -> None:
    """Raise if any cell group (or, for donor splits, any donor) is on both sides of a fold."""
    names = sorted(set(meta["donor"].astype(str)))
    if len(names) < 2:  # a hand-made plan: say why, not only that the donor is on both sides
        raise TprobeError(one_donor(names))
    for f in plan:
        g_tr, g_te = set(meta["group"].iloc[f.train]), set(meta["group"].iloc[f.test])
        if g_tr & g_te:
            raise TprobeError(f"fold {f.index}: cells on both sides of the split: {sorted(g_tr & g_te)[:3]}")
        d_tr = set(meta["donor"].iloc[f.train])
        if set(f.test_donors) <= set(meta["donor"].iloc[f.test]) and d_tr & set(f.test_donors):
            raise TprobeError(f"fold {f.index}: donor on both sides: {sorted(d_tr & set(f.test_donors))}")


def check_labels(meta: pd.DataFrame) -> None:
    """Raise unless every label is 0 (quiescent) or 1 (activated): the metrics score class 1 as activated,
    so 1/2, -1/1 or text labels stopped on pandas' or scikit-learn's errors, or scored the wrong class."""
    y = meta["label"]
    bad = y[y.isna() | ~y.isin([0, 1])]  # "1" (text) is not 1
    if len(bad):
        values = sorted({repr(v) for v in pd.unique(y)})
        raise TprobeError(
            f"the label column holds {', '.join(values[:6])}{', ...' if len(values) > 6 else ''}; labels must be "
            "0 (quiescent) or 1 (activated): map them (e.g. label = (label == 'activated').astype(int))"
        )


def check_train_classes(plan: list[Fold], meta: pd.DataFrame) -> None:
    """Raise if a fold's training rows hold one class: a head fitted on them scores nothing (the MLP fitted
    one anyway, and its AUC was reported; the other heads stopped on scikit-learn's errors)."""
    for f in plan:
        classes = np.unique(meta["label"].iloc[f.train])
        if len(classes) < 2:
            donors = sorted(set(meta["donor"].iloc[f.train].astype(str)))
            raise TprobeError(
                f"fold {f.index} (held out {', '.join(f.test_donors)}): its training donors "
                f"({', '.join(donors)}) hold only {CLASS_NAMES.get(classes[0], classes[0])} cells, and a head needs "
                "both classes to learn: add donors with both classes, or hold out others (--split)"
            )


def checked_plan(
    meta: pd.DataFrame,
    split: str = "leave-one-donor-out",
    *,
    test_donor: str | None = None,
    n_splits: int = 5,
    what: str = "probe",
) -> list[Fold]:
    """:func:`split_plan`'s folds for a head fitted on ``meta`` (a ``what``: probe, curve), checked: labels
    0/1 and both classes, no cell or donor on both sides, both classes in every fold's training rows."""
    check_labels(meta)
    if meta["label"].nunique() < 2:
        raise TprobeError(f"the data has one class only; a {what} needs activated and quiescent cells")
    plan = split_plan(meta, split, test_donor=test_donor, n_splits=n_splits)
    check_plan(plan, meta)
    check_train_classes(plan, meta)
    return plan


def check_train_donors(plan: list[Fold], meta: pd.DataFrame, *, what: str, split: str) -> None:
    """Raise if a fold of ``plan`` trains on fewer than 2 donors: models trained with early stopping
    (fine-tuning, LeNet, Inception fine-tuned) need a validation donor and at least one other donor
    to train on. ``what`` names the model in the one-line message."""
    donors = sorted(set(meta["donor"]))
    for fold in plan:
        n_train = meta["donor"].iloc[fold.train].nunique()
        if n_train < 2:
            raise TprobeError(
                f"{what} needs at least 2 training donors per fold (one for early stopping, one or "
                f"more to train on); with split {split!r} and {len(donors)} donor(s) "
                f"({', '.join(donors)}) fold {fold.index} has {n_train} — add donors"
            )


@dataclass
class CVResult:
    predictions: pd.DataFrame  # image_id, donor, group, label, p_activated, fold (scored rows)
    chosen: list[dict] = field(default_factory=list)  # per fold: params, inner scores


def _score_rows(meta: pd.DataFrame, idx: np.ndarray, proba: np.ndarray, tta: bool) -> pd.DataFrame:
    rows = meta.iloc[idx][["image_id", "donor", "group", "label", "view"]].assign(p_activated=proba)
    if tta:
        mean_p = rows.groupby("group")["p_activated"].transform("mean")
        rows = rows.assign(p_activated=mean_p)
    return rows[rows["view"] == "orig"].drop(columns="view")


def _fit_predict(make, params, X, y, train, test):
    model = make(**params)
    model.fit(X[train], y[train])
    return model, model.predict_proba(X[test])[:, 1]


def nested_cv(
    make,
    grid: list[dict],
    X: np.ndarray,
    meta: pd.DataFrame,
    plan: list[Fold],
    *,
    train_views: str = "orig",
    tta: bool = False,
    n_jobs: int = -1,
) -> CVResult:
    """Outer folds from ``plan``; inside each, leave-one-training-donor-out picks the grid point
    with the best mean average precision; the head is then refit on all training donors.

    ``make(**params)`` returns a fresh estimator with ``fit``/``predict_proba``.
    """
    y = meta["label"].to_numpy()
    is_orig = (meta["view"] == "orig").to_numpy()
    preds, chosen = [], []
    for fold in plan:
        train = fold.train if train_views == "all" else fold.train[is_orig[fold.train]]
        best, scores = inner_search(make, grid, X, y, meta, train, is_orig, n_jobs)
        _, proba = _fit_predict(make, best, X, y, train, fold.test)
        preds.append(_score_rows(meta, fold.test, proba, tta).assign(fold=fold.index))
        chosen.append(
            {"fold": fold.index, "params": best, "inner_ap": scores, "selection": selection(grid, scores)}
        )
    return CVResult(pd.concat(preds, ignore_index=True), chosen)


def inner_search(make, grid, X, y, meta, train, is_orig, n_jobs: int = -1):
    """Leave-one-training-donor-out over ``grid``: returns (best params, {params: mean AP})."""
    if len(grid) == 1:
        return grid[0], {}
    donors = meta["donor"].to_numpy()[train]
    inner = sorted(set(donors))
    if len(inner) < 2:
        log.warning("one training donor: no inner validation; using the first grid point")
        return grid[0], {}
    jobs = []
    for i, params in enumerate(grid):
        for d in inner:
            tr, va = train[donors != d], train[(donors == d) & is_orig[train]]
            if len(np.unique(y[tr])) == 2 and len(np.unique(y[va])) == 2:  # else AP undefined
                jobs.append((i, params, tr, va))
    aps = Parallel(n_jobs=n_jobs)(
        delayed(_inner_ap)(make, params, X, y, tr, va) for _, params, tr, va in jobs
    )
    scores = {}
    for i, params in enumerate(grid):
        mine = [ap for (j, *_), ap in zip(jobs, aps, strict=True) if j == i]
        scores[str(params)] = float(np.mean(mine)) if mine else float("nan")
    best = max(grid, key=lambda p: -np.inf if np.isnan(scores[str(p)]) else scores[str(p)])
    return best, scores


def selection(grid: list[dict], scores: dict) -> str:
    """How a fold's hyperparameters were chosen, in words (for the console and the run record)."""
    if len(grid) == 1:
        return "single grid point"
    if not scores or all(np.isnan(v) for v in scores.values()):
        return "no inner validation (one training donor or no two-class validation donor): first grid point"
    return "chosen by inner donor CV (mean AP)"


def _inner_ap(make, params, X, y, tr, va) -> float:
    _, p = _fit_predict(make, params, X, y, tr, va)
    return float(average_precision_score(y[va], p))


def donor_metrics(pred: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """One row per held-out donor: n, prevalence, accuracy, balanced accuracy, AP, AUC, F1, Brier score,
    expected calibration error (:data:`tprobe.stats.ECE_NOTE`), confusion."""
    from tprobe.stats import brier_score, expected_calibration_error

    rows = []
    for donor, d in pred.groupby("donor", sort=True):
        y, p = d["label"].to_numpy(), d["p_activated"].to_numpy()
        yhat = (p >= threshold).astype(int)
        two = len(np.unique(y)) == 2
        tn, fp, fn, tp = confusion_matrix(y, yhat, labels=[0, 1]).ravel()
        rows.append(
            {
                "donor": donor,
                "fold": int(d["fold"].iloc[0]),
                "n": len(d),
                "prevalence": float(y.mean()),
                "accuracy": accuracy_score(y, yhat),
                "balanced_accuracy": balanced_accuracy_score(y, yhat) if two else float("nan"),
                "average_precision": average_precision_score(y, p) if two else float("nan"),
                "roc_auc": roc_auc_score(y, p) if two else float("nan"),
                "f1": f1_score(y, yhat, zero_division=0.0),
                "brier": brier_score(y, p),
                "ece": expected_calibration_error(y, p),
                "tn": int(tn),
                "fp": int(fp),
                "fn": int(fn),
                "tp": int(tp),
                "note": ""
                if two
                else "single-class donor: AUC, AP and balanced accuracy undefined (NaN); "
                "left out of every mean",
            }
        )
    return pd.DataFrame(rows)


def auc_donors(per_donor: pd.DataFrame) -> pd.DataFrame:
    """The donors every summary averages over: those whose ROC AUC is defined (both classes), so the
    accuracy and F1 means cover the same donors as the AUC and AP means. A one-class donor keeps its
    row (and accuracy) in ``per_donor``; only when no donor has both classes are all rows used."""
    two = per_donor["roc_auc"].notna()
    return per_donor[two] if two.any() else per_donor


def summarise(per_donor: pd.DataFrame, *, n_boot: int | None = None, seed: int = 0) -> dict:
    """Mean, sd and the t-interval 95% CI over donors of each metric (:func:`tprobe.stats.t_interval`).

    ``n_boot`` and ``seed`` are accepted and ignored (deprecated): the percentile bootstrap over donors
    they drove covered 86% at nominal 95% with 6 donors.
    """
    from tprobe.stats import CI_METHOD, ECE_NOTE, t_interval

    notes = {
        "accuracy": THRESHOLD_NOTE,
        "balanced_accuracy": THRESHOLD_NOTE,
        "f1": THRESHOLD_NOTE,
        "ece": ECE_NOTE,
        "brier": ECE_NOTE.split("; ")[1],
    }
    out = {}
    for m in METRICS:
        v = (
            per_donor[m].to_numpy(dtype=float) if m in per_donor else np.array([])
        )  # older tables: no calibration
        v = v[~np.isnan(v)]
        if not len(v):
            out[m] = {
                "mean": None,
                "sd": None,
                "ci_low": None,
                "ci_high": None,
                "n_donors": 0,
                "ci_method": CI_METHOD,
            }
            continue
        lo, hi = t_interval(v)
        out[m] = {
            "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else None,  # one donor: no spread to measure
            "ci_low": None if np.isnan(lo) else lo,
            "ci_high": None if np.isnan(hi) else hi,
            "n_donors": int(len(v)),
            "ci_method": CI_METHOD,
        }
    for m, note in notes.items():
        out[m]["note"] = note
    return out


def frequency_predictions(meta: pd.DataFrame, plan: list[Fold], *, tta: bool = False) -> pd.DataFrame:
    """The frequency classifier: every test row gets its training donors' activated fraction."""
    y = meta["label"].to_numpy()
    out = []
    for f in plan:
        p = np.full(len(f.test), y[f.train].mean())
        out.append(_score_rows(meta, f.test, p, tta).assign(fold=f.index))
    return pd.concat(out, ignore_index=True)


@dataclass
class Evaluation:
    """Scored out-of-fold predictions with per-donor metrics, their summary and the reference rows."""

    predictions: pd.DataFrame
    per_donor: pd.DataFrame
    summary: dict
    reference: dict

    def table(self) -> pd.DataFrame:
        """Per-donor metrics plus mean, sd and frequency-classifier rows, for printing."""
        cols = ["donor", "n", "prevalence", *METRICS]
        if "note" in self.per_donor and self.per_donor["note"].astype(bool).any():
            cols.append("note")  # a single-class donor's NaN AUC is explained where it is printed
        t = self.per_donor[cols]
        extra = [  # the mean row averages the metrics; n (cells per donor) is not summed into it
            {
                "donor": "mean",
                "prevalence": auc_donors(self.per_donor)["prevalence"].mean(),  # the metrics' donors
                **{m: self.summary[m]["mean"] for m in METRICS},
            },
            {"donor": "sd", **{m: self.summary[m]["sd"] for m in METRICS}},
            {"donor": "frequency (mean)", **{m: self.reference["frequency"][m]["mean"] for m in METRICS}},
        ]
        out = pd.concat([t, pd.DataFrame(extra)], ignore_index=True)
        return out.astype({"n": "Int64"})  # an integer column; blank (<NA>) on the summary rows


def evaluate(
    predictions: pd.DataFrame,
    meta: pd.DataFrame,
    plan: list[Fold],
    *,
    tta: bool = False,
    n_boot: int | None = None,
    seed: int = 0,
) -> Evaluation:
    """Per-donor metrics and their summary, beside the frequency classifier on the same folds.

    ``n_boot`` is deprecated and ignored (intervals are t-intervals over donors, :func:`summarise`)."""
    per_donor = donor_metrics(predictions)
    freq = donor_metrics(frequency_predictions(meta, plan, tta=tta))
    return Evaluation(
        predictions,
        per_donor,
        summarise(auc_donors(per_donor), n_boot=n_boot, seed=seed),
        {"frequency": summarise(auc_donors(freq), n_boot=n_boot, seed=seed)},
    )
