"""The raw-pixel feature source: each kept cell's original view on a 64 px canvas, flattened.

Pixel inputs are each cell zero-padded, centred, on a ``PIXEL_CANVAS`` (64 px) square; larger cells are
shrunk to fit. The sample's cells are ~20 px, so 64 px keeps every pixel of almost every cell while
keeping the inputs at 4096 values. Wang et al.'s pixel baselines (:mod:`tprobe.train.baselines`) and the
``--pixels`` source of ``curve`` and ``map`` read the same features.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from tprobe.data.preprocess import PIXEL_CANVAS, PreprocessConfig, Preprocessed, load_view
from tprobe.features.sources import META, FeatureSet, FeatureSource

__all__ = ["PIXEL_CANVAS", "pixel_features", "pixel_prep"]

logger = logging.getLogger(__name__)


def pixel_prep(pre: Preprocessed) -> PreprocessConfig:
    """The preprocessing of pixel inputs: ``pre``'s, on the 64 px canvas, larger cells shrunk to fit."""
    return dataclasses.replace(pre.config, canvas=PIXEL_CANVAS, fit="resize")


def pixel_features(pre: Preprocessed) -> FeatureSet:
    """Raw pixels of each kept cell's original view on the 64 px canvas, flattened (values 0..1)."""
    rows = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
    prep = pixel_prep(pre)
    logger.info("pixels: reading %d cells onto the %d px canvas", len(rows), PIXEL_CANVAS)
    X = np.stack([load_view(p, "orig", prep).ravel() for p in rows["path"]]).astype(np.float32)
    source = FeatureSource(
        kind="pixels",
        name="pixels",
        canvas=PIXEL_CANVAS,
        preprocess=pre.config.to_dict(),
        preprocess_hash=pre.config.hash,
        dataset_fingerprint=pre.fingerprint,
    )
    return FeatureSet(X, rows[META], source)
