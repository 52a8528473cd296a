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

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline
from sklearn.random_projection import GaussianRandomProjection

from tprobe.errors import TprobeError
from tprobe.evaluate import (
    check_plan,
    evaluate,
    inner_search,
    nested_cv,
    split_plan,
)
from tprobe.features import FeatureSet
from tprobe.heads import HEADS, load_head_file, make_head, param_grid, save_head
from tprobe.runs import RunRecord, make_run_dir, save_run

__all__ = ["ProbeRun", "load_head", "projection"]
HEAD_FILE = "head.skops"


def projection(n_features: int, n_components: int, seed: int) -> GaussianRandomProjection:
    """The fixed Gaussian random projection for wide inputs: determined by (width, components, seed)."""
    return GaussianRandomProjection(n_components, random_state=seed).fit(
        np.zeros((1, n_features), np.float32)
    )


def load_head(run: str | Path):
    """A run's final head, ready for ``predict_proba`` on the run's own features (projection rebuilt).

    Loads only data: the head from its skops file with trusted types, the projection from its seed.
    """
    run = Path(run)
    record = RunRecord.load(run)
    if not record.head_file:
        raise TprobeError(f"{run}: has no final head; rerun `tprobe probe` without --no-final-head")
    head = load_head_file(run / record.head_file)
    p = record.projection
    if p:
        return Pipeline(
            [("project", projection(p["n_features"], p["n_components"], p["seed"])), ("head", head)]
        )
    return head


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
    max_dims: int | None = 2048  # wider inputs get a fixed random projection to this width; None = never

    def _validate(self):
        if self.head not in HEADS:
            raise TprobeError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.train_views not in ("all", "orig"):
            raise TprobeError(f"train_views {self.train_views!r} is not 'all' or 'orig'")

    def fit(self, fs: FeatureSet) -> ProbeRun:
        self._validate()
        t0 = time.perf_counter()
        meta = fs.meta
        if meta["label"].nunique() < 2:
            raise TprobeError("the data has one class only; a probe needs activated and quiescent cells")
        plan = split_plan(meta, self.split, test_donor=self.test_donor, n_splits=self.n_splits)
        check_plan(plan, meta)
        X, self.projection_ = fs.X, None
        if self.max_dims is not None and X.shape[1] > self.max_dims:
            # data-independent (drawn from the seed and the width only), so applying it to every
            # row before the splits cannot leak; it keeps inner-CV fits cheap on --pool concat
            self.projection_ = projection(X.shape[1], self.max_dims, self.seed)
            X = self.projection_.transform(X).astype(np.float32)
        make = partial(make_head, self.head, seed=self.seed, penalty=self.penalty)
        grid = param_grid(self.head)
        cv = nested_cv(make, grid, X, meta, plan, train_views=self.train_views, tta=self.tta)
        self.features_ = fs
        self.plan_ = plan
        self.grid_ = grid
        self.chosen_ = cv.chosen
        self.evaluation_ = evaluate(
            cv.predictions, meta, plan, tta=self.tta, n_boot=self.n_boot, seed=self.seed
        )
        self.final_ = self._final_head(make, grid, X, fs.meta) if self.final_head else None
        self.seconds_ = time.perf_counter() - t0
        return self

    def _final_head(self, make, grid, X, meta):
        """Refit on every donor, hyperparameters chosen by leave-one-donor-out on all of them."""
        is_orig = (meta["view"] == "orig").to_numpy()
        keep = np.arange(len(meta)) if self.train_views == "all" else np.flatnonzero(is_orig)
        y = meta["label"].to_numpy()
        best, _ = inner_search(make, grid, X, y, meta, keep, is_orig)
        head = make(**best).fit(X[keep], y[keep])
        model = (
            head if self.projection_ is None else Pipeline([("project", self.projection_), ("head", head)])
        )
        return {"model": model, "head": head, "params": best}

    @property
    def predictions_(self) -> pd.DataFrame:
        return self.evaluation_.predictions

    @property
    def per_donor_(self) -> pd.DataFrame:
        return self.evaluation_.per_donor

    @property
    def summary_(self) -> dict:
        return self.evaluation_.summary

    @property
    def reference_(self) -> dict:
        return self.evaluation_.reference

    def table(self) -> pd.DataFrame:
        """Per-donor metrics with mean, sd and frequency rows, for printing."""
        return self.evaluation_.table()

    def record(self, name: str, *, command: str = "probe", extra: dict | None = None) -> RunRecord:
        """The run record (config.json) of this fitted probe."""
        fs = self.features_
        options = {"head": self.head, "split": self.split, "test_donor": self.test_donor, "n_splits": self.n_splits,
                   "tta": self.tta, "train_views": self.train_views, "penalty": self.penalty,
                   "max_dims": self.max_dims, "seed": self.seed, "n_boot": self.n_boot, **(extra or {})}  # fmt: skip
        p = self.projection_
        proj = None if p is None else {"method": "gaussian", "n_components": int(p.n_components_),
                                       "n_features": int(p.n_features_in_), "seed": self.seed}  # fmt: skip
        return RunRecord(command=command, name=name, features=fs.source, options=options,
                         n_rows=len(fs.meta), n_features=int(fs.X.shape[1]), grid=self.grid_, projection=proj,
                         head_file=HEAD_FILE if self.final_ is not None else None,
                         seconds=round(self.seconds_, 2))  # fmt: skip

    def save(self, out: str | Path, name: str | None = None, *, command: str = "probe",
             extra_options: dict | None = None) -> Path:  # fmt: skip
        """Write the run directory under ``out``; return its path."""
        name = name or f"{self.features_.name}-{self.head}"
        run = make_run_dir(out, name)
        record = self.record(run.name, command=command, extra=extra_options)
        save_run(run, record=record, evaluation=self.evaluation_, plan=self.plan_, meta=self.features_.meta,
                 chosen=self.chosen_)  # fmt: skip
        if self.final_ is not None:
            save_head(self.final_["head"], run / HEAD_FILE)
        return run
