"""Run directories: one folder per trained model with everything needed to read or rerun it.

Contents: ``config.json`` (all options, feature source, versions), ``metrics.json``
(``summary.<metric>.{mean,sd,ci_low,ci_high}``, ``folds[]``, ``reference``), ``per_donor.parquet``,
``predictions.parquet`` (``image_id, donor, label, p_activated, fold``), ``splits.json``,
figures, and the final head refit on every donor (``head.joblib``).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from tprobe import __version__
from tprobe.errors import TprobeError

__all__ = ["make_run_dir", "save_run", "write_json", "read_json", "versions"]


def make_run_dir(out: str | Path, name: str) -> Path:
    """A new, unique run folder ``out/<timestamp>-<name>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name)
    base = Path(out) / f"{stamp}-{safe}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def _default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float | np.floating) and np.isnan(obj):
        return None
    return obj


def write_json(path: Path, obj) -> None:
    """Write JSON with NaN as null (strict JSON), leaving strings that mention NaN alone."""
    Path(path).write_text(json.dumps(_nan_to_none(obj), indent=2, default=_default, allow_nan=False))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TprobeError(f"{path}: not found; is this a tprobe run directory?") from None


def versions() -> dict:
    import sklearn
    import torch
    import transformers
    import xgboost

    return {"tprobe": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "scikit-learn": sklearn.__version__,
            "xgboost": xgboost.__version__, "numpy": np.__version__}  # fmt: skip


def save_run(run: Path, *, config: dict, evaluation, plan, meta, chosen=None) -> Path:
    """Write the shared run-directory files (config, metrics, splits, predictions, figures) into ``run``."""
    from tprobe.plots import confusion_matrix_plot, experiment_title, roc_curves

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", {**config, "versions": versions()})
    folds = evaluation.per_donor.rename(columns={"donor": "test_donor"}).to_dict("records")
    write_json(run / "metrics.json", {"summary": evaluation.summary, "folds": folds,
                                      "reference": evaluation.reference, "chosen": chosen or []})  # fmt: skip
    write_json(run / "splits.json", [f.to_dict(meta) for f in plan])
    evaluation.per_donor.to_parquet(run / "per_donor.parquet", index=False)
    evaluation.predictions.to_parquet(run / "predictions.parquet", index=False)
    roc_curves(evaluation.predictions, run / "roc.png", title=experiment_title(config))
    confusion_matrix_plot(evaluation.predictions, run / "confusion.png")
    return run
