"""Label new images with a trained probe run: preprocess, extract (through the cache), score."""

from __future__ import annotations

from pathlib import Path

import joblib
import pandas as pd

from tprobe.backbones import resolve_model
from tprobe.dataset import discover_unlabelled
from tprobe.errors import TprobeError
from tprobe.extract import DEFAULT_CACHE, extract
from tprobe.features import from_store
from tprobe.preprocess import PreprocessConfig, preprocess
from tprobe.runs import read_json

__all__ = ["predict"]


def predict(run: str | Path, data: str | Path, *, cache: str | Path = DEFAULT_CACHE, device: str = "auto",
            offline: bool = False, threshold: float = 0.5) -> pd.DataFrame:  # fmt: skip
    """One row per input image: ``path, p_activated, label, kept, drop_reason``.

    Images that fail the run's quality filters keep their row, with no probability and the reason.
    """
    run = Path(run)
    config = read_json(run / "config.json")
    if not (run / "head.joblib").exists():
        raise TprobeError(f"{run}: has no head.joblib; rerun `tprobe probe` without --no-final-head")
    src = config["features"]
    if src.get("kind") != "store":
        raise TprobeError(f"{run}: was trained on a feature table; compute the same features for the new "
                          "images and use the saved head.joblib directly")  # fmt: skip
    head = joblib.load(run / "head.joblib")["model"]
    prep = PreprocessConfig(**{k: v for k, v in src["preprocess"].items() if k != "version"})
    pre = preprocess(discover_unlabelled(data), prep)
    source = src.get("model_source") or src.get("model")
    if not source:
        raise TprobeError(f"{run}/config.json: records no model to extract with; retrain the probe")
    ref = resolve_model(source, offline=offline)
    if ref.resolved != src["resolved_revision"]:
        raise TprobeError(f"model {source} has changed since run {run.name} "
                          f"({ref.resolved[:12]} != {src['resolved_revision'][:12]}); retrain the probe")  # fmt: skip
    out = pre.manifest[pre.manifest["view"] == "orig"][["path", "kept", "drop_reason", "source_id"]]
    out = out.assign(p_activated=float("nan"))
    if pre.manifest["kept"].any():
        res = extract(pre, ref, cache=cache, fmt=src.get("format", "zarr"), dtype=src.get("dtype", "float16"),
                      device=device, offline=offline)  # fmt: skip
        fs = from_store(res.path, src["pool"])
        scored = fs.meta.assign(p=head.predict_proba(fs.X)[:, 1])
        if config.get("tta"):
            scored["p"] = scored.groupby("group")["p"].transform("mean")
        p = scored[scored["view"] == "orig"].set_index("group")["p"]
        out["p_activated"] = out["source_id"].map(p)
    out["label"] = (out["p_activated"] >= threshold).astype("Int64").where(out["kept"])
    out["label_name"] = out["label"].map({1: "activated", 0: "quiescent"})
    return out.drop(columns="source_id").reset_index(drop=True)[
        ["path", "p_activated", "label", "label_name", "kept", "drop_reason"]
    ]
