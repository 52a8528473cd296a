"""Label new images with a trained probe run: preprocess, extract (through the cache), score."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tprobe.backbones import normalisation, resolve_model
from tprobe.dataset import discover_unlabelled
from tprobe.errors import TprobeError
from tprobe.extract import DEFAULT_CACHE, extract
from tprobe.features import from_store
from tprobe.preprocess import preprocess
from tprobe.probe import load_head
from tprobe.runs import RunRecord

__all__ = ["predict", "resolve_run"]
log = logging.getLogger(__name__)


def resolve_run(run: str | Path) -> Path:
    """A run directory; a sweep directory resolves to its best run by mean ROC AUC (and says which)."""
    run = Path(run)
    if (run / "config.json").exists() or not (run / "summary.parquet").exists():
        return run
    summary = pd.read_parquet(run / "summary.parquet")
    if "run" not in summary.columns or "roc_auc_mean" not in summary.columns or summary.empty:
        raise TprobeError(f"{run}: a sweep folder without a usable summary.parquet; pass one of its runs")
    best = summary.sort_values("roc_auc_mean", ascending=False).iloc[0]
    chosen = run / str(best["run"])
    log.warning("%s is a sweep: using its best run by mean ROC AUC, %s (AUC %.3f); pass --run %s/<run> "
                "to choose another", run, chosen.name, best["roc_auc_mean"], run)  # fmt: skip
    return chosen


def predict(run: str | Path, data: str | Path, *, cache: str | Path = DEFAULT_CACHE, device: str = "auto",
            offline: bool = False, threshold: float = 0.5) -> pd.DataFrame:  # fmt: skip
    """One row per input image: ``path, p_activated, label, label_name, kept, drop_reason``.

    Images that fail the run's quality filters keep their row, with no probability and the reason.
    The model must be the one the run was trained on (same resolved snapshot or content hash).
    """
    run = resolve_run(run)
    record = RunRecord.load(run)
    src = record.features
    if src.kind != "store":
        raise TprobeError(f"{run}: was trained on {src.kind} features; compute the same features for the new "
                          "images and score them with tprobe.probe.load_head(run)")  # fmt: skip
    head = load_head(run)
    config = record.preprocess_config()
    found = discover_unlabelled(data, channel_files=config.channel_files, channels=config.channels)
    pre = preprocess(found, config)
    source = src.model_source or src.model
    if not source:
        raise TprobeError(f"{run}/config.json: records no model to extract with; retrain the probe")
    ref = resolve_model(source, offline=offline)
    if ref.resolved != src.resolved_revision:
        raise TprobeError(f"model {source} has changed since run {run.name} "
                          f"({ref.resolved[:12]} != {str(src.resolved_revision)[:12]}); retrain the probe")  # fmt: skip
    _check_normalisation(run, src, ref, source, offline)
    out = pre.manifest[pre.manifest["view"] == "orig"][["path", "kept", "drop_reason", "source_id"]]
    out = out.assign(p_activated=float("nan"))
    if pre.manifest["kept"].any():
        res = extract(pre, ref, cache=cache, fmt=src.format or "zarr", dtype=src.dtype or "float16",
                      precision=src.precision or "auto", device=device, offline=offline)  # fmt: skip
        fs = from_store(res.path, src.pool)
        scored = fs.meta.assign(p=head.predict_proba(fs.X)[:, 1])
        if record.options.get("tta"):
            scored["p"] = scored.groupby("group")["p"].transform("mean")
        p = scored[scored["view"] == "orig"].set_index("group")["p"]
        out["p_activated"] = out["source_id"].map(p)
    out["label"] = (out["p_activated"] >= threshold).astype("Int64").where(out["kept"])
    out["label_name"] = out["label"].map({1: "activated", 0: "quiescent"})
    out["model_random_init"] = record.random_weights  # True: a plumbing check, not a result
    return out.drop(columns="source_id").reset_index(drop=True)[
        ["path", "p_activated", "label", "label_name", "kept", "drop_reason", "model_random_init"]
    ]


def _check_normalisation(run: Path, src, ref, source: str, offline: bool) -> None:
    """The model must normalise its input as it did for the run's store (its preprocessor_config.json mean/std)."""
    recorded = (src.image_mean, src.image_std)
    if recorded[0] is None and src.store:  # runs saved before the run recorded it: the store's attributes
        try:
            from tprobe.store import FeatureStore

            attrs = FeatureStore.open(src.store, check=False).attrs
            recorded = (attrs.get("image_mean"), attrs.get("image_std"))
        except TprobeError:
            pass
    if recorded[0] is None or recorded[1] is None:
        log.warning("%s records no input normalisation (and its store is gone): not checked", run)
        return
    mean, std = normalisation(ref, offline)
    if not (np.allclose(mean, recorded[0]) and np.allclose(std, recorded[1])):
        raise TprobeError(f"model {source}: its input normalisation (mean {list(mean)}, std {list(std)}) differs from "
                          f"the one run {run.name} was trained with (mean {list(recorded[0])}, std {list(recorded[1])}); "
                          "restore its preprocessor_config.json or retrain the probe")  # fmt: skip
