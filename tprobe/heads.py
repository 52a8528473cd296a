"""Probe heads as scikit-learn estimators, each with a small hyperparameter grid for nested CV."""

from __future__ import annotations

import itertools

from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tprobe.errors import TprobeError

__all__ = ["HEADS", "make_head", "param_grid"]

HEADS = ("logreg", "mlp", "xgboost")

GRIDS = {
    "logreg": {"clf__C": [0.001, 0.01, 0.1, 1.0]},
    "mlp": {"clf__alpha": [1e-3, 1e-1]},
    "xgboost": {"clf__max_depth": [2, 4]},
}


def make_head(name: str, *, seed: int = 0, class_weight: str | None = "balanced",
              penalty: str = "l2", n_jobs: int = 1,
              **params) -> Pipeline:  # fmt: skip
    """A fresh unfitted head: standardise, then the classifier."""
    if name not in HEADS:
        raise TprobeError(f"head {name!r} is not one of {', '.join(HEADS)} (or all)")
    if penalty not in ("l1", "l2"):
        raise TprobeError(f"penalty {penalty!r} is not l1 or l2")
    steps = [("scale", StandardScaler())]
    if name == "logreg":
        clf = LogisticRegression(
            C=0.1, l1_ratio=1.0 if penalty == "l1" else 0.0, solver="liblinear" if penalty == "l1" else "lbfgs",
            class_weight=class_weight, max_iter=2000, random_state=seed,
        )  # fmt: skip
    elif name == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, early_stopping=True,
                            validation_fraction=0.15, n_iter_no_change=10, max_iter=300,
                            random_state=seed)  # fmt: skip
    else:
        from xgboost import XGBClassifier

        # 32 histogram bins, not 256: ~6x faster on a few hundred training rows x 2048 features,
        # with sweep AUCs within 0.01 of 256 bins (NOTES-sweep.md)
        clf = XGBClassifier(n_estimators=200, learning_rate=0.1, max_depth=3, tree_method="hist", max_bin=32,
                            subsample=0.8, colsample_bytree=0.5, n_jobs=n_jobs, random_state=seed,
                            eval_metric="logloss")  # fmt: skip
    steps.append(("clf", clf))
    pipe = Pipeline(steps)
    pipe.set_params(**params)
    return pipe


def param_grid(name: str) -> list[dict]:
    """Every combination of the head's grid, as a list of ``set_params`` dicts."""
    grid = GRIDS[name]
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
