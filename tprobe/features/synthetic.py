"""Synthetic pooled features for probes at scale, and peak-memory readings (``scripts/bench_scale.py``).

:func:`synthetic_features` draws a :class:`~tprobe.features.sources.FeatureSet` shaped like a pooled store:
two Gaussian classes (activated / quiescent) whose means differ along a few directions, each donor
shifted by its own random offset (a batch effect the probe has to see through), one original view
per cell, rows grouped by donor as a store's manifest lists them. It is built donor by donor in
float32 in chunks of 16,384 rows, so drawing 400k x 384 features holds little more than the matrix (614 MB).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["synthetic_features", "peak_rss_mb"]


def synthetic_features(
    n_cells: int,
    n_donors: int,
    dims: int = 384,
    *,
    seed: int = 0,
    separation: float = 0.35,
    donor_shift: float = 0.5,
    prevalence: float = 0.5,
):
    """``n_cells`` rows of ``dims`` float32 features over ``n_donors`` donors (sizes within +-20%)."""
    from tprobe.features.sources import FeatureSet, FeatureSource

    if n_donors < 2 or n_cells < 4 * n_donors:
        raise ValueError(
            f"need at least 2 donors and 4 cells per donor (got {n_cells} cells, {n_donors} donors)"
        )
    rng = np.random.default_rng(seed)
    sizes = rng.uniform(0.8, 1.2, n_donors)
    sizes = np.floor(sizes / sizes.sum() * n_cells).astype(int)
    sizes[: n_cells - sizes.sum()] += 1
    direction = np.zeros(dims, np.float32)
    direction[: min(8, dims)] = separation  # the class signal lives in a few columns, like a morphology cue
    X = np.empty((n_cells, dims), np.float32)
    labels, donors = np.empty(n_cells, np.int64), np.empty(n_cells, object)
    start = 0
    for d, size in enumerate(sizes):
        sl = slice(start, start + size)
        y = (rng.random(size) < rng.uniform(prevalence - 0.15, prevalence + 0.15)).astype(np.int64)
        y[:2], y[2:4] = 0, 1  # both classes in every donor
        rng.shuffle(y)
        offset = rng.normal(0.0, donor_shift, dims).astype(np.float32)
        for lo in range(start, start + size, 16384):  # drawn in chunks: no donor-sized temporary
            hi = min(start + size, lo + 16384)
            X[lo:hi] = rng.standard_normal((hi - lo, dims), dtype=np.float32)
            X[lo:hi] += offset
            X[lo:hi] += y[lo - start : hi - start, None].astype(np.float32) * direction
        labels[sl], donors[sl] = y, f"donor_{d + 1}"
        start += size
    ids = [f"cell{i:07d}" for i in range(n_cells)]
    meta = pd.DataFrame({"image_id": ids, "donor": donors, "group": ids, "label": labels, "view": "orig"})
    source = FeatureSource("table", f"synthetic-{n_cells}x{dims}-{n_donors}donors")
    return FeatureSet(X, meta, source)


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
