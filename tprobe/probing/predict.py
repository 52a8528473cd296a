"""Label new images with a trained probe run: preprocess, extract (through the cache), score."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tprobe.cache.extract import extract
from tprobe.cache.keys import DEFAULT_CACHE
from tprobe.data.dataset import discover_unlabelled
from tprobe.data.preprocess import preprocess
from tprobe.errors import ChannelError, TprobeError
from tprobe.features.sources import CLASS_NAMES, from_store
from tprobe.models.backbones import normalisation, resolve_model
from tprobe.probing.run import load_head
from tprobe.runs.record import RunRecord, inside

__all__ = ["predict", "resolve_run", "default_csv", "overlay_folder"]
log = logging.getLogger(__name__)


def resolve_run(run: str | Path) -> Path:
    """A run directory; a sweep directory resolves to its best run by mean ROC AUC (and says which)."""
    run = Path(run)
    if (run / "config.json").exists() or not (run / "summary.parquet").exists():
        return run
    try:
        summary = pd.read_parquet(run / "summary.parquet")
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TprobeError(
            f"{run / 'summary.parquet'}: unreadable ({type(exc).__name__}: damaged or not written by "
            "tprobe); pass one of the sweep's runs as --run, or rerun the sweep"
        ) from None
    if "run" not in summary.columns or "roc_auc_mean" not in summary.columns or summary.empty:
        raise TprobeError(f"{run}: a sweep folder without a usable summary.parquet; pass one of its runs")
    best = summary.sort_values("roc_auc_mean", ascending=False).iloc[0]
    chosen = inside(run, str(best["run"]), what="run")
    log.warning(
        "%s is a sweep: using its best run by mean ROC AUC, %s (AUC %.3f); pass --run %s/<run> "
        "to choose another",
        run,
        chosen.name,
        best["roc_auc_mean"],
        run,
    )
    return chosen


def default_csv(run: str | Path, images: str | Path) -> Path:
    """Where ``tprobe predict`` writes its table by default: ``<run>/predictions-<images folder>.csv``."""
    from tprobe.runs.record import safe_name

    return inside(run, f"predictions-{safe_name(Path(images).resolve().name)}.csv")


def overlay_folder(csv: str | Path) -> Path:
    """The folder of the per-field overlay PNGs beside a predictions CSV: ``<csv stem>-overlays/``."""
    return Path(csv).with_name(Path(csv).stem + "-overlays")


def predict(
    run: str | Path,
    data: str | Path,
    *,
    cache: str | Path = DEFAULT_CACHE,
    device: str = "auto",
    offline: bool = False,
    threshold: float = 0.5,
    masks: str | Path | None = None,
    overlays: str | Path | None = None,
) -> pd.DataFrame:
    """One row per input image: ``path, p_activated, label, label_name, kept, drop_reason``.

    Images that fail the run's quality filters keep their row, with no probability and the reason.
    The model must be the one the run was trained on (same resolved snapshot or content hash). Only
    the original view of each image is extracted, unless the run scores every view (``tta``).

    With ``masks`` (a folder of label images, :mod:`tprobe.data.fov`'s pairing rule), ``data`` holds fields
    of view: one row per object, with ``field, object, area, centroid_y/x, bbox_*`` (objects dropped
    by the crop rules keep their row and reason), and with ``overlays`` a PNG per field there of the
    object outlines coloured by P(activated). The crops follow the run's crop options (margin,
    outside, areas) when it was trained on fields, else the defaults.
    """
    run = resolve_run(run)
    record = RunRecord.load(run)
    src = record.features
    if src.kind != "store":
        what = {
            "table": "a feature table",
            "pixels": "raw pixels",
            "baseline": "a baseline's inputs",
            "finetune": "images end to end (`tprobe finetune`)",
        }.get(src.kind, f"{src.kind} features")
        raise TprobeError(
            f"{run}: was trained on {what}, not a feature store; `tprobe predict` needs a run "
            "trained on a store: `tprobe probe --model MODEL ...` (after `tprobe extract --model "
            "MODEL`)"
        )
    head = load_head(run)
    config = record.preprocess_config()
    if not record.options.get("tta") and config.views != "orig":  # scored on originals: extract only those
        config = dataclasses.replace(config, views="orig")
    dropped, cols = [], ["path"]
    if masks is None:
        found = discover_unlabelled(data, channel_files=config.channel_files, channels=config.channels)
    else:
        found, dropped, config = _crops(data, masks, config, cache)
        cols = [
            "field",
            "mask",
            "object",
            "area",
            "centroid_y",
            "centroid_x",
            "bbox_y0",
            "bbox_x0",
            "bbox_y1",
            "bbox_x1",
        ]
    pre = preprocess(found, config, each_file=True)  # every input keeps its row, out-of-range ones too
    _check_pixel_type(run, src, pre.manifest)
    source = src.model_source or src.model
    if not source:
        raise TprobeError(f"{run}/config.json: records no model to extract with; retrain the probe")
    ref = resolve_model(source, offline=offline)
    if ref.resolved != src.resolved_revision:
        raise TprobeError(
            f"model {source} has changed since run {run.name} "
            f"({ref.resolved[:12]} != {str(src.resolved_revision)[:12]}); retrain the probe"
        )
    _check_normalisation(run, src, ref, source, offline)
    out = pre.manifest[pre.manifest["view"] == "orig"]
    out = pd.concat([out, pd.DataFrame(dropped)], ignore_index=True) if dropped else out
    out = out[[*cols, "kept", "drop_reason", "source_id"]].assign(p_activated=float("nan"))
    if pre.manifest["kept"].any():
        from tprobe.models.tokens import pool_layers

        # only the layers the run's pool reads
        res = extract(
            pre,
            ref,
            cache=cache,
            fmt=src.format or "zarr",
            dtype=src.dtype or "float16",
            precision=src.precision or "auto",
            device=device,
            offline=offline,
            layers=pool_layers(src.pool or "cls"),
        )
        fs = from_store(res.path, src.pool)
        X = fs.X
        if record.options.get("normalize") == "donor-center":  # as in training: each donor on its own mean
            from tprobe.features.sources import donor_center

            log.warning(
                "run %s centres each donor's features on that donor's own mean: the new images are "
                "centred per donor (from their folder names, else all together) on their own cells, "
                "so each score depends on the other images scored with it",
                run.name,
            )
            X = donor_center(X, fs.meta["donor"], (fs.meta["view"] == "orig").to_numpy())
        scored = fs.meta.assign(p=head.predict_proba(X)[:, 1])
        if record.options.get("tta"):
            scored["p"] = scored.groupby("group")["p"].transform("mean")
        p = scored[scored["view"] == "orig"].set_index("group")["p"]
        # by content, so only a kept row: a dropped copy of a scored image (a "duplicate") has no probability
        out["p_activated"] = out["source_id"].map(p).where(out["kept"].eq(True))
    out["label"] = (out["p_activated"] >= threshold).astype("Int64").where(out["kept"])
    out["label_name"] = out["label"].map(CLASS_NAMES)
    out["model_random_init"] = record.random_weights  # True: a plumbing check, not a result
    out = out.drop(columns="source_id").reset_index(drop=True)
    if masks is not None:
        whole = ["object", "area", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]  # a field's row has none
        out[whole] = out[whole].astype("Int64")
        out = out.sort_values(["field", "object"], kind="stable").reset_index(drop=True)
        if overlays is not None:
            _overlays(out, config, Path(overlays), record.random_weights)
    return out[[*cols, "p_activated", "label", "label_name", "kept", "drop_reason", "model_random_init"]]


def _check_pixel_type(run: Path, src, manifest: pd.DataFrame) -> None:
    """The new images must have the training images' raw bit depth: 8-bit pixels are read as they are,
    16-bit ones scaled by the run's ``--max-value``, so the other depth would be scored on another scale.
    A run recorded before the bit depth was (no ``pixel_type``) is scored as before."""
    from tprobe.data.images import bit_depth

    if not src.pixel_type or "pixel_type" not in manifest.columns:
        return
    read = manifest[manifest["pixel_type"].notna() & (manifest["pixel_type"] != "")]
    other = read[read["pixel_type"] != src.pixel_type]
    if len(other):
        got, want = bit_depth(other["pixel_type"].iloc[0]), bit_depth(src.pixel_type)
        raise ChannelError(
            f"{other['path'].iloc[0]}: {got} pixels, but run {run.name} was trained on {want} images; "
            f"convert the new images to {want} as the training images were, or retrain on {got} images"
        )


def _crops(data, masks, config, cache):
    """Fields + masks -> the crops' dataset (under the cache, keyed by the fields and the crop options),
    the dropped objects' rows and the config with ``fov`` set."""
    import hashlib
    from dataclasses import replace

    from tprobe.data.fov import crop_fields, discover_fields

    fields = discover_fields(data, masks, labelled=False)
    config = replace(config, fov=True)
    key = f"{Path(data).resolve()}|{Path(masks).resolve()}|{config.hash}"
    crops = Path(cache) / "fov-predict" / hashlib.sha256(key.encode()).hexdigest()[:12] / "crops"
    before = len(fields.skipped)
    found, dropped, warnings = crop_fields(fields, config, crops)
    for line in warnings:
        log.warning("warning: %s", line)
    # a field not cut (unreadable, a copy of another field) keeps its row too, as every input does
    mask = dict(zip(map(str, fields.table["path"]), fields.table["mask"], strict=True))
    for s in fields.skipped[before:]:
        reason = "duplicate" if s.reason.startswith("same content as") else "unreadable"
        dropped.append(
            {"field": s.path, "mask": mask.get(s.path), "source_id": "", "kept": False, "drop_reason": reason}
        )
    return found, dropped, config


def _overlays(out: pd.DataFrame, config, folder: Path, random_weights: bool) -> None:
    """One PNG per field under ``folder``, named after its path below the fields' common folder
    (``donor_1-activated-field0.png``)."""
    import os

    from tprobe.data.fov import draw_overlay

    fields = sorted(set(map(str, out["field"])))
    top = os.path.commonpath([os.path.dirname(f) for f in fields]) if fields else ""
    for field, rows in out[out["object"].notna()].groupby("field", sort=True):  # a field not cut: none
        p = dict(zip(rows["object"], rows["p_activated"], strict=True))
        rel = os.path.relpath(str(field), top) if top else Path(str(field)).name  # donor_1/activated/f.tif
        stem = rel[: -len(".ome.tif")] if rel.lower().endswith(".ome.tif") else str(Path(rel).with_suffix(""))
        stem = stem.replace(os.sep, "-")
        draw_overlay(
            field, rows["mask"].iloc[0], p, config, folder / f"{stem}.png", random_weights=random_weights
        )


def _check_normalisation(run: Path, src, ref, source: str, offline: bool) -> None:
    """The model must normalise its input as it did for the run's store (its preprocessor_config.json mean/std)."""
    recorded = (src.image_mean, src.image_std)
    if recorded[0] is None and src.store:  # runs saved before the run recorded it: the store's attributes
        try:
            from tprobe.cache.store import FeatureStore

            attrs = FeatureStore.open(src.store, check=False).attrs
            recorded = (attrs.get("image_mean"), attrs.get("image_std"))
        except TprobeError:
            pass
    if recorded[0] is None or recorded[1] is None:
        log.warning("%s records no input normalisation (and its store is gone): not checked", run)
        return
    mean, std = normalisation(ref, offline)
    if not (np.allclose(mean, recorded[0]) and np.allclose(std, recorded[1])):
        raise TprobeError(
            f"model {source}: its input normalisation (mean {list(mean)}, std {list(std)}) differs from "
            f"the one run {run.name} was trained with (mean {list(recorded[0])}, std {list(recorded[1])}); "
            "restore its preprocessor_config.json or retrain the probe"
        )
