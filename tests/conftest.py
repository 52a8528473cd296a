"""Shared fixtures: tiny random DINOv2 models saved once per session, small image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
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


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path
