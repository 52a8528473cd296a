"""Time a sealed store's integrity checks on a store of the sample's size (852 rows, chunks of 64).

    python scripts/bench_store_check.py

The store has ViT-S/14 shapes at 140 px (hidden 384, 4 registers, 100 patches) filled with random
values. Prints the chunk-existence scan (run on every open), a whole open, pooling CLS, and
``verify(deep=True)`` (``tprobe status --deep``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from tprobe.cache.store import FeatureStore


def main() -> None:
    d = Path(tempfile.mkdtemp())
    n, hidden = 852, 384
    s = FeatureStore.create(
        d / "s.zarr",
        row_ids=[f"r{i}" for i in range(n)],
        hidden=hidden,
        registers=4,
        patches=100,
        chunk_rows=64,
    )
    rng = np.random.default_rng(0)
    for u in range(s.n_units):
        k = s.unit_slice(u).stop - s.unit_slice(u).start
        s.write_unit(
            u,
            {
                "cls": rng.normal(size=(k, hidden)),
                "registers": rng.normal(size=(k, 4, hidden)),
                "patches": rng.normal(size=(k, 100, hidden)),
            },
        )
    s.finalize()
    t0 = time.perf_counter()
    for _ in range(50):
        s._scan_chunks()
    scan = (time.perf_counter() - t0) / 50
    t0 = time.perf_counter()
    for _ in range(20):
        FeatureStore.open(s.path)
    opened = (time.perf_counter() - t0) / 20
    st = FeatureStore.open(s.path)
    t0 = time.perf_counter()
    st.pooled("cls")
    pooled = time.perf_counter() - t0
    t0 = time.perf_counter()
    st.verify(deep=True)
    deep = time.perf_counter() - t0
    print(
        f"{n} rows, {s.n_units} units x {len(s.shapes)} arrays: chunk scan {scan * 1e3:.2f} ms, open "
        f"{opened * 1e3:.1f} ms, pooled cls {pooled * 1e3:.0f} ms, verify(deep=True) {deep * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
