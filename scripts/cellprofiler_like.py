"""Write a CellProfiler-style per-cell feature table for an image folder (default: the bundled sample).

Hand-crafted shape and intensity features of the largest bright component (``pixel > 20``, or above
half the image's maximum for a cell dimmer than that, so every image gets a row), named
as CellProfiler names them, plus the bookkeeping columns CellProfiler writes (FileName, ImageNumber,
ObjectNumber, Number_Object_Number) and location columns, all of which the feature rule drops. It
stands in for a real CellProfiler export in `tprobe curve --features` demos:

    python scripts/cellprofiler_like.py --out cellprofiler_sample.csv
    tprobe curve --features cellprofiler_sample.csv --id-column FileName --pixels
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.measure import label, regionprops

from tprobe.data.dataset import discover
from tprobe.data.images import read_image


def features(path: str, threshold: float = 20.0, image_number: int = 1) -> dict:
    img = read_image(path).astype(np.float32)
    mask = label(img > threshold, connectivity=1)
    props = regionprops(mask, intensity_image=img)
    if not props and img.max() > 0:  # a dim cell (the quality filters remove it): half its own maximum
        mask = label(img > img.max() / 2, connectivity=1)
        props = regionprops(mask, intensity_image=img)
    # one object per image here: the largest component, numbered 1 in its image
    row = {
        "FileName": Path(path).name,
        "ImageNumber": image_number,
        "ObjectNumber": 1,
        "Number_Object_Number": 1,
    }
    if not props:
        return row
    r = max(props, key=lambda p: p.area)
    vals = img[mask == r.label]
    hist = np.bincount(np.clip(img, 0, 255).astype(int).ravel(), minlength=256) / img.size
    nz = hist[hist > 0]
    row.update(
        {
            "AreaShape_Area": r.area,
            "AreaShape_Perimeter": r.perimeter,
            "AreaShape_Eccentricity": r.eccentricity,
            "AreaShape_Solidity": r.solidity,
            "AreaShape_MajorAxisLength": r.axis_major_length,
            "AreaShape_MinorAxisLength": r.axis_minor_length,
            "AreaShape_FormFactor": 4 * np.pi * r.area / max(r.perimeter, 1) ** 2,
            "Intensity_MeanIntensity": vals.mean(),
            "Intensity_StdIntensity": vals.std(),
            "Intensity_MaxIntensity": vals.max(),
            "Intensity_IntegratedIntensity": vals.sum(),
            "Intensity_MedianIntensity": float(np.median(vals)),
            "Texture_Entropy": float(-(nz * np.log2(nz)).sum()),
            "Location_Center_X": r.centroid[1],
            "Location_Center_Y": r.centroid[0],
        }
    )
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="image folder [default: bundled sample]")
    ap.add_argument("--out", default="cellprofiler_sample.csv")
    args = ap.parse_args()
    ds = discover(args.data)
    table = pd.DataFrame([features(p, image_number=i + 1) for i, p in enumerate(ds.table["path"])])
    table.to_csv(args.out, index=False)
    print(f"{len(table)} images x {table.shape[1] - 1} columns -> {args.out}")


if __name__ == "__main__":
    main()
