"""Run directories: one folder per trained model with everything needed to read or rerun it.

Contents: ``config.json`` (the :class:`RunRecord`: command, options, feature source, versions,
whether the model had random weights), ``metrics.json`` (``summary.<metric>.{mean,sd,ci_low,
ci_high}``, ``folds[]``, ``reference``), ``per_donor.parquet``, ``predictions.parquet``
(``image_id, donor, group, label, p_activated, fold``), ``splits.json``, figures, and the final
head refit on every donor (``head.skops``, data only — see :mod:`tprobe.probing.heads`). Figures: ``roc.png``,
``confusion.png`` and ``reliability.png`` (calibration: 10 equal-width bins, Brier and ECE per donor).

Everything that reads a run (predict, report, saliency, finetune --resume, sweeps) goes through
:meth:`RunRecord.load`; nothing in a run directory is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tprobe._version import __version__
from tprobe.errors import TprobeError
from tprobe.models.random_weights import TITLE_SUFFIX, named_random

__all__ = [
    "RunRecord",
    "make_run_dir",
    "save_run",
    "write_json",
    "read_json",
    "versions",
    "safe_name",
    "inside",
    "RUN_SCHEMA",
]
RUN_SCHEMA = 2


def safe_name(text, *, tag: bool = True, limit: int = 80) -> str:
    """A file-name part built from data (a donor, run, model, channel or source name).

    Only letters, digits and ``-_.+`` are kept (anything else, ``/`` and ``\\`` included, becomes ``-``),
    no leading dot, at most ``limit`` characters. With ``tag``, a changed name ends in a short hash of
    the original, so ``lab/A`` and ``lab-A`` never share a file.
    """
    text = str(text)
    safe = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in text).lstrip(".")[:limit]
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not safe:
        return digest
    return f"{safe}-{digest}" if tag and safe != text else safe


def inside(root: str | Path, *parts: str | Path, what: str = "file") -> Path:
    """``root/parts...``, refused in one line unless it resolves (links followed) inside ``root``.

    For every path built from data or read from a run folder (a head file, a sweep's best run): a
    received run folder cannot make tprobe read or write elsewhere.
    """
    root = Path(root)
    path = root.joinpath(*(str(p) for p in parts))
    real, base = path.resolve(), root.resolve()
    if real != base and not real.is_relative_to(base):
        raise TprobeError(
            f"{path}: this {what} lies outside {root} (a name from the data or a link points "
            "elsewhere); tprobe reads and writes only inside the folder"
        )
    return path


def make_run_dir(out: str | Path, name: str) -> Path:
    """A new, unique run folder ``out/<timestamp>-<name>`` (``name`` made safe by :func:`safe_name`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = safe_name(name, tag=False)
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
    if hasattr(o, "to_dict"):  # typed records (FeatureSource, RunRecord, ...)
        return o.to_dict()
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
    """Write JSON with NaN as null (strict JSON), leaving strings that mention NaN alone.

    Through :func:`~tprobe.cache.files.atomic_write`: a write that fails (a full disk, a kill) leaves the
    file as it was, never cut (a cut config.json would make an interrupted fine-tuning run impossible to
    resume)."""
    from tprobe.cache.files import atomic_write

    text = json.dumps(_nan_to_none(obj), indent=2, default=_default, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict:
    """Read a JSON file; a missing or malformed one is a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TprobeError(f"{path}: not found; is this a tprobe run directory?") from None
    except (ValueError, UnicodeDecodeError):
        raise TprobeError(
            f"{path}: is not valid JSON (damaged or not written by tprobe); rerun the command that made it"
        ) from None


def versions() -> dict:
    # an imported module's own __version__, else the installed distribution's metadata: importing
    # torch and transformers only to read their versions cost ~2 s per process (a sweep uses neither)
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def v(module: str, *dists: str) -> str | None:
        if module in sys.modules:
            return getattr(sys.modules[module], "__version__", None)
        for dist in dists:
            try:
                return version(dist)
            except PackageNotFoundError:
                pass
        return None

    return {
        "tprobe": __version__,
        "python": platform.python_version(),
        "torch": v("torch", "torch"),
        "transformers": v("transformers", "transformers"),
        "scikit-learn": v("sklearn", "scikit-learn"),
        "xgboost": v("xgboost", "xgboost", "xgboost-cpu"),
        "numpy": np.__version__,
    }


@dataclass
class RunRecord:
    """A run's ``config.json``: what was run, on which features, with which options.

    ``options`` holds the estimator's parameters (a :class:`~tprobe.probing.run.ProbeRun`'s fields, a
    :class:`~tprobe.train.finetune.FinetuneRun`'s, or a baseline's). ``random_init`` marks results of a
    randomly initialised model: plumbing checks, not results.
    """

    command: str  # probe | finetune | baseline
    name: str
    features: object  # FeatureSource
    options: dict = field(default_factory=dict)
    data: str | None = None  # --data as given (None = the bundled sample)
    random_init: bool = False
    n_rows: int = 0
    n_features: int = 0
    grid: list = field(default_factory=list)
    # {"method", "n_components", "n_features", "seed", "checksum"}: rebuilt from the seed, never stored; the
    # checksum (heads.projection_checksum, absent in older runs) is of the matrix the head was trained on
    projection: dict | None = None
    head_file: str | None = None
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    schema: int = RUN_SCHEMA

    def __post_init__(self):
        from tprobe.features.sources import FeatureSource

        if isinstance(self.features, dict):
            self.features = FeatureSource.from_dict(self.features)
        self.random_init = bool(self.random_init or self.features.random_init)
        self.schema = int(self.schema)

    def get(self, key: str, default=None):
        """An option's value (``head``, ``pool``, ``split`` ...), falling back to the feature source."""
        if key in self.options:
            return self.options[key]
        return self.features.get(key, default)

    @property
    def random_weights(self) -> bool:
        """Whether the features came from a randomly initialised model (a plumbing check, not a result).

        Runs written before the flag existed fall back to a model name or path containing "random".
        """
        if self.random_init:
            return True
        f = self.features
        if (
            self.schema >= RUN_SCHEMA
            or self.command == "baseline"
            or f.kind in ("table", "pixels", "baseline")
        ):
            return False
        names = (
            self.options.get("model"),
            self.options.get("model_source"),
            f.model,
            f.model_source,
            f.model_id,
        )
        return named_random(*names)

    @property
    def split_text(self) -> str:
        split = self.options.get("split") or "leave-one-donor-out"
        if split == "test-donor" and self.options.get("test_donor") is not None:
            split = f"test donor {self.options['test_donor']}"
        return split

    @property
    def model_name(self) -> str:
        """The model's short name (a local folder's name), or the feature source's name."""
        return Path(str(self.features.model or self.options.get("model") or self.features.name)).name

    @property
    def title(self) -> str:
        """What the run is, for plot titles: ``model · pool · head · split`` (or the baseline / table name)."""
        f, o = self.features, self.options
        if self.command == "baseline":
            parts = [f"baseline {o.get('baseline', f.name)}"]
        elif f.kind in ("table", "pixels"):
            parts = [str(f.name), str(o.get("head"))]
        else:
            model = self.model_name
            head = o.get("head") or ("frozen" if o.get("freeze") else "finetune")
            parts = [model, str(f.pool or o.get("pool")), str(head)]
        norm = o.get("normalize")
        norm = f"normalize {norm}" if norm not in (None, "standard") else None
        title = " · ".join(filter(None, [*parts, self.channels_text, norm, self.split_text]))
        return title + (TITLE_SUFFIX if self.random_weights else "")

    @property
    def channels_text(self) -> str:
        """``"per-channel nadh+fad"`` for multi-channel input (its mode and the channels the model saw), else ``""``."""
        if not (self.features.preprocess or {}).get("channels"):
            return ""
        prep = self.preprocess_config()
        return f"{prep.channel_mode} {'+'.join(prep.used_channels)}"

    def preprocess_config(self):
        from tprobe.data.preprocess import PreprocessConfig

        if not self.features.preprocess:
            raise TprobeError(f"run {self.name}: records no preprocessing; it was trained on a feature table")
        return PreprocessConfig.from_dict(self.features.preprocess)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = self.features.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        if not isinstance(d, dict) or "command" not in d:
            raise TprobeError("config.json is not a tprobe run record (no command)")
        d = {**d, "features": d.get("features") or {}}
        if int(d.get("schema", 1)) < RUN_SCHEMA:  # schema 1: options at the top level
            keys = {
                "command",
                "features",
                "versions",
                "grid",
                "n_rows",
                "n_features",
                "seconds",
                "data",
                "random_init",
            }
            d = {
                "command": d["command"],
                "features": d["features"] or {},
                "options": {k: v for k, v in d.items() if k not in keys},
                "name": (d["features"] or {}).get("name", "run"),
                "data": d.get("data"),
                "grid": d.get("grid", []),
                "versions": d.get("versions", {}),
                "random_init": bool(d.get("random_init")),
                "schema": 1,
            }
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, run: str | Path) -> Path:
        path = Path(run) / "config.json"
        write_json(path, {**self.to_dict(), "versions": self.versions or versions(), "schema": RUN_SCHEMA})
        return path

    @classmethod
    def load(cls, run: str | Path) -> RunRecord:
        path = Path(run) / "config.json"
        try:
            return cls.from_dict(read_json(path))
        except (TypeError, KeyError, AttributeError) as exc:
            raise TprobeError(
                f"{path}: not a valid tprobe run record ({type(exc).__name__}); rerun the command "
                "that made it"
            ) from None
        except TprobeError as exc:
            if str(path) in str(exc):
                raise
            raise TprobeError(f"{path}: {exc}") from None


def save_run(run: Path, *, record: RunRecord, evaluation, plan, meta, chosen=None) -> Path:
    """Write the shared run-directory files (record, metrics, splits, predictions, figures) into ``run``."""
    from tprobe.plot.figures import confusion_matrix_plot, reliability_diagram, roc_curves

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    record.save(run)
    folds = evaluation.per_donor.rename(columns={"donor": "test_donor"}).to_dict("records")
    write_json(
        run / "metrics.json",
        {
            "summary": evaluation.summary,
            "folds": folds,
            "reference": evaluation.reference,
            "chosen": chosen or [],
        },
    )
    write_json(run / "splits.json", [f.to_dict(meta) for f in plan])
    evaluation.per_donor.to_parquet(run / "per_donor.parquet", index=False)
    evaluation.predictions.to_parquet(run / "predictions.parquet", index=False)
    roc_curves(evaluation.predictions, run / "roc.png", title=record.title)
    confusion_matrix_plot(evaluation.predictions, run / "confusion.png", title=record.title)
    reliability_diagram(evaluation.predictions, run / "reliability.png", title=record.title)
    return run
