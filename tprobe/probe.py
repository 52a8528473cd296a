"""Train and evaluate one head on one feature set; write a run directory.

``ProbeRun(head="logreg").fit(features)`` runs nested donor-grouped CV, computes per-donor metrics
beside the frequency classifier on the same folds, and refits a final head on every donor (chosen
by the same inner search) for ``tprobe predict``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from tprobe.errors import TprobeError
from tprobe.evaluate import (
    Fold,
    check_plan,
    donor_metrics,
    frequency_predictions,
    inner_search,
    nested_cv,
    split_plan,
    summarise,
)
from tprobe.features import FeatureSet
from tprobe.heads import HEADS, make_head, param_grid
from tprobe.runs import make_run_dir, versions, write_json

__all__ = ["ProbeRun"]


@dataclass
class ProbeRun:
    """Parameters of one probe; ``fit`` fills the ``*_`` results (scikit-learn style)."""

    head: str = "logreg"
    split: str = "leave-one-donor-out"
    test_donor: str | None = None
    n_splits: int = 5
    tta: bool = False
    train_views: str = "orig"
    penalty: str = "l2"
    seed: int = 0
    n_boot: int = 2000
    final_head: bool = True

    def _validate(self):
        if self.head not in HEADS:
            raise TprobeError(f"--head {self.head!r} is not one of {', '.join(HEADS)}, all")
        if self.train_views not in ("all", "orig"):
            raise TprobeError(f"--train-views {self.train_views!r} is not all or orig")

    def fit(self, fs: FeatureSet, progress=None) -> ProbeRun:
        self._validate()
        t0 = time.perf_counter()
        meta = fs.meta
        if meta["label"].nunique() < 2:
            raise TprobeError("the data has one class only; a probe needs activated and quiescent cells")
        plan = split_plan(meta, self.split, test_donor=self.test_donor, n_splits=self.n_splits)
        check_plan(plan, meta)
        make = partial(make_head, self.head, n_features=fs.X.shape[1], seed=self.seed, penalty=self.penalty)
        grid = param_grid(self.head)
        cv = nested_cv(make, grid, fs.X, meta, plan, train_views=self.train_views, tta=self.tta,
                       progress=progress)  # fmt: skip
        self.features_ = fs
        self.plan_ = plan
        self.grid_ = grid
        self.chosen_ = cv.chosen
        self.predictions_ = cv.predictions
        self.per_donor_ = donor_metrics(cv.predictions)
        self.summary_ = summarise(self.per_donor_, n_boot=self.n_boot, seed=self.seed)
        freq = donor_metrics(frequency_predictions(meta, plan, tta=self.tta))
        self.reference_ = {"frequency": summarise(freq, n_boot=self.n_boot, seed=self.seed)}
        self.final_ = self._final_head(make, grid, fs) if self.final_head else None
        self.seconds_ = time.perf_counter() - t0
        return self

    def _final_head(self, make, grid, fs: FeatureSet):
        """Refit on every donor, hyperparameters chosen by leave-one-donor-out on all of them."""
        every = Fold(-1, [], np.arange(len(fs.meta)), np.arange(0))
        keep = every.train if self.train_views == "all" else np.flatnonzero(fs.meta["view"] == "orig")
        y = fs.meta["label"].to_numpy()
        best, _ = inner_search(make, grid, fs.X, y, fs.meta, keep, (fs.meta["view"] == "orig").to_numpy())
        model = make(**best)
        model.fit(fs.X[keep], y[keep])
        return {"model": model, "params": best}

    def table(self) -> pd.DataFrame:
        """Per-donor metrics with a mean ± sd row, for printing."""
        cols = [
            "donor",
            "n",
            "prevalence",
            "accuracy",
            "balanced_accuracy",
            "average_precision",
            "roc_auc",
            "f1",
        ]
        t = self.per_donor_[cols].copy()
        mean = {c: self.summary_[c]["mean"] for c in self.summary_}
        sd = {c: self.summary_[c]["sd"] for c in self.summary_}
        t.loc[len(t)] = {"donor": "mean", "n": t["n"].sum(), "prevalence": t["prevalence"].mean(), **mean}
        t.loc[len(t)] = {"donor": "sd", **sd}
        freq = self.reference_["frequency"]
        t.loc[len(t)] = {"donor": "frequency (mean)", **{c: freq[c]["mean"] for c in freq}}
        return t

    def save(self, out: str | Path, name: str | None = None, *, extra_config: dict | None = None) -> Path:
        """Write the run directory under ``out``; return its path."""
        from tprobe.plots import confusion_matrix_plot, roc_curves

        fs = self.features_
        run = make_run_dir(out, name or f"{fs.name}-{self.head}")
        config = {"command": "probe", "head": self.head, "split": self.split, "test_donor": self.test_donor,
                  "n_splits": self.n_splits, "tta": self.tta, "train_views": self.train_views,
                  "penalty": self.penalty, "seed": self.seed, "n_boot": self.n_boot, "grid": self.grid_,
                  "features": fs.source, "n_rows": len(fs.meta), "n_features": int(fs.X.shape[1]),
                  "versions": versions(), "seconds": round(self.seconds_, 2), **(extra_config or {})}  # fmt: skip
        write_json(run / "config.json", config)
        folds = self.per_donor_.rename(columns={"donor": "test_donor"}).to_dict("records")
        write_json(run / "metrics.json", {"summary": self.summary_, "folds": folds,
                                          "reference": self.reference_, "chosen": self.chosen_})  # fmt: skip
        write_json(run / "splits.json", [f.to_dict(fs.meta) for f in self.plan_])
        self.per_donor_.to_parquet(run / "per_donor.parquet", index=False)
        self.predictions_.to_parquet(run / "predictions.parquet", index=False)
        roc_curves(self.predictions_, run / "roc.png", title=f"{fs.name} · {self.head}")
        confusion_matrix_plot(self.predictions_, run / "confusion.png")
        if self.final_ is not None:
            joblib.dump(self.final_, run / "head.joblib")
        return run
