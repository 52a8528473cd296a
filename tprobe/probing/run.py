"""Train and evaluate one head on one feature set; write a run directory.

``ProbeRun(head="logreg").fit(features)`` runs nested donor-grouped CV, computes per-donor metrics
beside the frequency classifier on the same folds, and refits a final head on every donor (chosen
by the same inner search) for ``tprobe predict``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from tprobe.errors import TprobeError
from tprobe.features.sources import NORMALIZE, FeatureSet, donor_center
from tprobe.probing.evaluate import (
    checked_plan,
    evaluate,
    inner_search,
    nested_cv,
)
from tprobe.probing.fastcv import FoldProgress, nested_cv_fast, projected
from tprobe.probing.heads import (
    HEADS,
    load_head_file,
    make_head,
    param_grid,
    projection,
    projection_checksum,
    projection_width,
    save_head,
)
from tprobe.probing.linear import make_logreg, resolve_solver
from tprobe.probing.rowfit import fit_rows, release_free_heap
from tprobe.runs.record import RunRecord, inside, make_run_dir, save_run

__all__ = ["ProbeRun", "load_head", "projection", "ENGINES"]
HEAD_FILE = "head.skops"
ENGINES = ("fast", "reference")


def load_head(run: str | Path):
    """A run's final head, ready for ``predict_proba`` on the run's own features (projection rebuilt).

    Loads only data: the head from its skops file with trusted types, the projection from its seed.
    """
    run = Path(run)
    record = RunRecord.load(run)
    if not record.head_file:
        raise TprobeError(f"{run}: has no final head; rerun `tprobe probe` without --no-final-head")
    path = inside(run, record.head_file, what="head file")
    if not path.exists():  # the record says the head was written: it went missing, --no-final-head is not why
        raise TprobeError(
            f"{path}: missing from the run folder, though config.json records that it was written; "
            "copy the whole run folder (or rerun `tprobe probe`)"
        )
    head = load_head_file(path)
    p = record.projection
    if p:
        proj = projection(p["n_features"], p["n_components"], p["seed"])
        if p.get("checksum") and projection_checksum(proj) != p["checksum"]:  # runs before it: unchecked
            import sklearn

            raise TprobeError(
                f"{run}: the random projection rebuilt from its seed ({p['n_features']} -> {p['n_components']} "
                f"columns, seed {p['seed']}) is not the one the head was trained on (scikit-learn "
                f"{sklearn.__version__} here, {record.versions.get('scikit-learn')} in the run); install the "
                "run's scikit-learn or rerun `tprobe probe`"
            )
        return Pipeline([("project", proj), ("head", head)])
    return head


# heads whose fits hold the GIL (lbfgs' and the MLP's Python loops around small matrix products) run in
# processes; XGBoost and the numpy heads release it and run in threads (no start-up, no copies). Measured on
# the sweep benchmark (docs/guide/benchmarks.md; 2 cores): logreg + MLP runs 35.1 s in threads, 31.4 s in processes, same results.
PROCESS_HEADS = ("logreg", "mlp")


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
    # inputs wider than this get a fixed random projection to this width; None = never; "auto": wider
    # than 2048 -> 2048, or 512 for xgboost (heads.projection_width)
    max_dims: int | str | None = "auto"
    engine: str = (
        "fast"  # "fast" (tprobe.probing.fastcv: shared, parallel fits) or "reference" (evaluate.nested_cv)
    )
    n_jobs: int = 2  # parallel fits (each fit single-threaded): threads, or processes for PROCESS_HEADS
    data: str | None = None  # the --data given (None = bundled sample), recorded in config.json
    # none: heads see the features as given; standard: in-fold standardisation (every head's first step);
    # donor-center: each donor centred on its own mean first (features.donor_center), then standard
    normalize: str = "standard"
    # logreg's solver: "lbfgs" (scikit-learn), "torch" (tprobe.probing.linear: the whole C grid as one batched
    # L-BFGS fit, rows read in place) or "auto" (torch from linear.TORCH_MIN_ROWS training rows up)
    solver: str = "auto"

    def _validate(self):
        if self.head not in HEADS:
            raise TprobeError(f"head {self.head!r} is not one of {', '.join(HEADS)}")
        if self.train_views not in ("all", "orig"):
            raise TprobeError(f"train_views {self.train_views!r} is not 'all' or 'orig'")
        if self.engine not in ENGINES:
            raise TprobeError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.normalize not in NORMALIZE:
            raise TprobeError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMALIZE)}")
        projection_width(self.head, 0, self.max_dims)  # raises on a bad width
        resolve_solver(self.solver, self.head, self.penalty, 0)  # raises on a bad solver

    def fit(self, fs: FeatureSet, *, progress: Callable[[FoldProgress], None] | None = None) -> ProbeRun:
        """Nested CV, evaluation and (``final_head``) the final head; ``progress`` gets one
        :class:`~tprobe.probing.fastcv.FoldProgress` per outer fold (fast engine only)."""
        self._validate()
        t0 = time.perf_counter()
        meta = fs.meta
        plan = checked_plan(meta, self.split, test_donor=self.test_donor, n_splits=self.n_splits)
        n_train = (
            len(meta) if (self.tta or self.train_views == "all") else int((meta["view"] == "orig").sum())
        )
        self.solver_ = resolve_solver(self.solver, self.head, self.penalty, n_train)
        if self.solver_ == "torch":
            import torch  # noqa: F401 - loaded before the engine, so its fits run single-threaded

            make = partial(make_logreg, seed=self.seed, penalty=self.penalty, scale=self.normalize != "none")
        else:
            make = partial(
                make_head, self.head, seed=self.seed, penalty=self.penalty, scale=self.normalize != "none"
            )
        grid = param_grid(self.head)
        dims = projection_width(self.head, fs.X.shape[1], self.max_dims)
        final = None
        if self.engine == "reference":
            X, self.projection_ = fs.X, None
            if dims is not None:
                # data-independent (drawn from the seed and the width only), so applying it to every
                # row before the splits cannot leak; it keeps inner-CV fits cheap on --pool concat
                self.projection_ = projection(X.shape[1], dims, self.seed)
                X = self.projection_.transform(X).astype(np.float32)
            X = self._normalized(X, meta)
            cv = nested_cv(make, grid, X, meta, plan, train_views=self.train_views, tta=self.tta)
        else:
            # only the rows a fit trains on or a score uses are projected (the same matrix product
            # row by row); the projection and its product are cached on ``fs`` for the next head
            rows = None if (self.tta or self.train_views == "all") else (meta["view"] == "orig").to_numpy()
            X, self.projection_ = projected(fs, dims, self.seed, rows)
            X = self._normalized(X, meta)
            # torch's fits release the GIL: threads share X without copies
            backend = "loky" if self.head in PROCESS_HEADS and self.solver_ != "torch" else "threading"
            cv, final = nested_cv_fast(
                make,
                grid,
                X,
                meta,
                plan,
                train_views=self.train_views,
                tta=self.tta,
                final_head=self.final_head,
                n_jobs=self.n_jobs,
                progress=progress,
                backend=backend,
            )
        self.features_ = fs
        self.plan_ = plan
        self.grid_ = grid
        self.chosen_ = cv.chosen
        self.evaluation_ = evaluate(
            cv.predictions, meta, plan, tta=self.tta, n_boot=self.n_boot, seed=self.seed
        )
        if self.final_head:
            release_free_heap()  # the engine's freed memory, before the final head's fit adds its own
        self.final_ = self._final_head(make, grid, X, fs.meta, final) if self.final_head else None
        self.seconds_ = time.perf_counter() - t0
        return self

    def _normalized(self, X: np.ndarray, meta: pd.DataFrame) -> np.ndarray:
        """``X`` donor-centred for ``normalize="donor-center"`` (each donor on the mean of its original
        views; fold-independent and label-free, see :func:`~tprobe.features.sources.donor_center`), else ``X``.
        After the random projection: the two are linear, so the order does not matter."""
        if self.normalize != "donor-center":
            return X
        return donor_center(X, meta["donor"], (meta["view"] == "orig").to_numpy())

    def _final_head(self, make, grid, X, meta, final=None):
        """Refit on every donor, hyperparameters chosen by leave-one-donor-out on all of them
        (``final``: that search's ``(best, scores)``, already run by the fast engine)."""
        is_orig = (meta["view"] == "orig").to_numpy()
        keep = np.arange(len(meta)) if self.train_views == "all" else np.flatnonzero(is_orig)
        y = meta["label"].to_numpy()
        best, _ = final if final is not None else inner_search(make, grid, X, y, meta, keep, is_orig)
        if self.engine == "fast":
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1):  # as the engine's fits: BLAS threads only spin on small problems
                head = self._fit_final(make(**best), X, y, keep)
        else:
            head = self._fit_final(make(**best), X, y, keep)
        model = (
            head if self.projection_ is None else Pipeline([("project", self.projection_), ("head", head)])
        )
        return {"model": model, "head": head, "params": best}

    @staticmethod
    def _fit_final(model, X, y, keep):
        if len(model) == 1 and hasattr(model[-1], "to_sklearn"):
            # torch logreg: fitted on X's rows in place, kept as the scikit-learn pipeline of its numbers
            # (StandardScaler + LogisticRegression) so the saved head stays plain data
            return model[-1].fit(X, y, rows=keep).to_sklearn()
        # kNN and XGBoost read the rows a block at a time (the same head, without copies of every row)
        fitted = fit_rows(model, X, y, keep)
        return fitted if fitted is not None else model.fit(X[keep], y[keep])

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

    def details(self) -> list[str]:
        """The lines a run prints (and a sweep writes to each run folder's ``details.txt``): the random-
        weights note, the per-donor table, what the metrics mean and the hyperparameters chosen."""
        from tprobe.models.random_weights import NOTE, is_random

        with pd.option_context(
            "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format
        ):
            table = self.table().to_string(index=False)
        chosen = "; ".join(f"fold {c['fold']}: {c['params']}" for c in self.chosen_)
        how = sorted({c.get("selection", "chosen by inner donor CV (mean AP)") for c in self.chosen_})
        return [
            *([f"   {NOTE}"] if is_random(self.features_.source) else []),
            table,
            f"   accuracy, balanced accuracy, f1: {self.summary_['f1']['note']}; brier, ece: "
            "calibration (lower is better; ECE over 10 equal-width bins)",
            f"   grid {self.grid_} -> {' / '.join(how)}: {chosen}",
        ]

    def record(self, name: str, *, command: str = "probe", extra: dict | None = None) -> RunRecord:
        """The run record (config.json) of this fitted probe."""
        fs = self.features_
        options = {
            "head": self.head,
            "split": self.split,
            "test_donor": self.test_donor,
            "n_splits": self.n_splits,
            "tta": self.tta,
            "train_views": self.train_views,
            "penalty": self.penalty,
            "max_dims": self.max_dims,
            "seed": self.seed,
            "n_boot": self.n_boot,
            "engine": self.engine,
            "normalize": self.normalize,
            "solver": getattr(self, "solver_", None),
            **(extra or {}),
        }
        p = self.projection_
        proj = (
            None
            if p is None
            else {
                "method": "gaussian",
                "n_components": int(p.n_components_),
                "n_features": int(p.n_features_in_),
                "seed": self.seed,
                "checksum": projection_checksum(p),  # predict refuses a rebuilt matrix that differs
            }
        )
        return RunRecord(
            command=command,
            name=name,
            features=fs.source,
            options=options,
            n_rows=len(fs.meta),
            n_features=int(fs.X.shape[1]),
            grid=self.grid_,
            projection=proj,
            head_file=HEAD_FILE if self.final_ is not None else None,
            seconds=round(self.seconds_, 2),
            data=self.data,
        )

    def save(
        self,
        out: str | Path,
        name: str | None = None,
        *,
        command: str = "probe",
        extra_options: dict | None = None,
    ) -> Path:
        """Write the run directory under ``out``; return its path (also kept as ``path_``)."""
        name = name or f"{self.features_.name}-{self.head}"
        run = make_run_dir(out, name)
        self.path_ = run
        record = self.record(run.name, command=command, extra=extra_options)
        save_run(
            run,
            record=record,
            evaluation=self.evaluation_,
            plan=self.plan_,
            meta=self.features_.meta,
            chosen=self.chosen_,
        )
        if self.final_ is not None:
            save_head(self.final_["head"], run / HEAD_FILE)
        return run
