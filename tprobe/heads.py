"""Probe heads as scikit-learn estimators, each with a small hyperparameter grid for nested CV.

Heads are saved as data, never as pickles: :func:`save_head` writes ``skops`` files and
:func:`load_head_file` loads them with an explicit list of trusted types (:data:`TRUSTED_TYPES`, on
top of skops' own safe scikit-learn and numpy types). A file naming any other type is refused
before anything in it is built, so a head received from someone else cannot run code.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tprobe.errors import TprobeError

__all__ = ["HEADS", "make_head", "param_grid", "save_head", "load_head_file", "TRUSTED_TYPES"]

HEADS = ("logreg", "mlp", "xgboost")
# beyond skops' defaults: the MLP's optimiser state and XGBoost's model (loaded by XGBoost from its
# own serialised format, not by unpickling)
TRUSTED_TYPES = [
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "xgboost.sklearn.XGBClassifier",
    "xgboost.core.Booster",
]

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
        raise TprobeError(f"head {name!r} is not one of {', '.join(HEADS)}")
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

        clf = XGBClassifier(n_estimators=200, learning_rate=0.1, max_depth=3, tree_method="hist",
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


def save_head(model, path: str | Path) -> Path:
    """Save a fitted head as a skops file (data only)."""
    import skops.io as sio

    sio.dump(model, path)
    return Path(path)


def load_head_file(path: str | Path):
    """Load a head saved by :func:`save_head`, refusing any type outside skops' defaults and TRUSTED_TYPES."""
    import zipfile

    import skops.io as sio

    path = Path(path)
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except FileNotFoundError:
        raise TprobeError(f"{path}: not found; rerun `tprobe probe` without --no-final-head") from None
    except (zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        raise TprobeError(
            f"{path}: not a tprobe head file ({type(exc).__name__}); it was not loaded"
        ) from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise TprobeError(f"{path}: names types tprobe does not trust ({', '.join(refused[:3])}); "
                          "it was not loaded — retrain the probe yourself")  # fmt: skip
    try:
        return sio.load(path, trusted=untrusted)
    except Exception as exc:  # noqa: BLE001 - any failure to build the head is the file's fault
        raise TprobeError(
            f"{path}: cannot be loaded as a head ({type(exc).__name__}); retrain the probe"
        ) from None
