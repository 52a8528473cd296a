"""Shared fixtures: tiny random DINOv2 models saved once per session, small image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tprobe.data.dataset import DEFAULT_DATA
from tprobe.testing import save_random_dinov2

SAMPLE = DEFAULT_DATA


@pytest.fixture(scope="session")
def tiny_reg(tmp_path_factory) -> Path:
    """Tiny DINOv2-with-registers (4 registers, hidden 32, 2 layers, patch 14)."""
    return save_random_dinov2(tmp_path_factory.mktemp("models") / "tiny-reg", registers=4)


@pytest.fixture(scope="session")
def tiny_plain(tmp_path_factory) -> Path:
    """Tiny plain DINOv2 (no registers)."""
    return save_random_dinov2(tmp_path_factory.mktemp("models") / "tiny-plain", registers=0)


def copy_subset(dst: Path, donors=("donor_1", "donor_2"), per_class: int = 6) -> Path:
    """Copy a few sample images per donor/class into ``dst`` (same folder layout)."""
    for donor in donors:
        for cls in ("activated", "quiescent"):
            files = sorted((SAMPLE / donor / cls).glob("*.png"))[:per_class]
            (dst / donor / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dst / donor / cls / f.name)
    return dst


@pytest.fixture
def small_data(tmp_path) -> Path:
    return copy_subset(tmp_path / "data")


def donor_features(n_donors=4, cells=40, seed=0, one_class=(), shift=1.0, source=None):
    """A FeatureSet of ``n_donors`` donors x ``cells`` cells (6 Gaussian features; activated cells shifted by
    ``shift``, or ``shift(d)`` for donor d); donors named in ``one_class`` hold activated cells only."""
    from tprobe.features.sources import FeatureSet

    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(1, n_donors + 1):
        for c in range(cells):
            label = 1 if f"donor_{d}" in one_class else int(c % 2)
            X.append(rng.normal(0, 1, 6) + (shift(d) if callable(shift) else shift) * label)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "path": f"donor_{d}/c{c}.png",
                    "label": label,
                    "donor": f"donor_{d}",
                    "group": f"d{d}c{c}",
                    "view": "orig",
                }
            )
    src = source or {"kind": "table", "name": "syn"}
    return FeatureSet(np.asarray(X, np.float32), pd.DataFrame(rows), src)


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path
