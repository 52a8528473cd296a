"""Write a synthetic field-of-view set from the bundled sample: cells side by side on zero fields, with
their label images (one rectangle per cell), in the single-cell layout (donor_N/<class>/).

    python scripts/make_fields.py --out fov-demo --per-field 4
    tprobe preprocess --fov fov-demo/fields --masks fov-demo/masks --outside keep --out fov-prep

The fields are 8-bit PNGs (``field<k>.png``), the masks 16-bit TIFFs (``field<k>_masks.tif``); with
``--outside keep`` and no margin each crop is exactly the sample's cell image. Derived from the
sample: no new biology, a plumbing demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tprobe.data.dataset import DEFAULT_DATA

GAP = 5  # px of background between cells and around them


def make_fields(out: Path, per_field: int = 4, per_class: int | None = None, mask: str = "rect") -> int:
    """``mask``: ``rect`` labels each cell's whole image rectangle; ``threshold`` its pixels above 20
    (the preprocessing's binary threshold), an outline like a segmentation's."""
    n = 0
    for donor in sorted(p for p in DEFAULT_DATA.iterdir() if p.is_dir()):
        for cls in sorted(p for p in donor.iterdir() if p.is_dir()):
            files = sorted(cls.glob("*.png"))[:per_class]
            for d in ("fields", "masks"):
                (out / d / donor.name / cls.name).mkdir(parents=True, exist_ok=True)
            for k in range(0, len(files), per_field):
                cells = [np.asarray(Image.open(f)) for f in files[k : k + per_field]]
                h = max(c.shape[0] for c in cells) + 2 * GAP
                w = sum(c.shape[1] for c in cells) + GAP * (len(cells) + 1)
                field, label = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint16)
                x = GAP
                for i, c in enumerate(cells):
                    field[GAP : GAP + c.shape[0], x : x + c.shape[1]] = c
                    box = label[GAP : GAP + c.shape[0], x : x + c.shape[1]]
                    box[c > 20 if mask == "threshold" else slice(None)] = i + 1
                    x += c.shape[1] + GAP
                Image.fromarray(field).save(out / "fields" / donor.name / cls.name / f"field{k}.png")
                tifffile.imwrite(out / "masks" / donor.name / cls.name / f"field{k}_masks.tif", label)
                n += 1
    return n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("fov-demo"))
    ap.add_argument("--per-field", type=int, default=4, help="cells per field")
    ap.add_argument("--per-class", type=int, default=None, help="cells per donor and class [default: all]")
    ap.add_argument(
        "--mask",
        choices=("rect", "threshold"),
        default="rect",
        help="object = cell rectangle or its pixels above 20",
    )
    args = ap.parse_args()
    print(f"{make_fields(args.out, args.per_field, args.per_class, args.mask)} fields under {args.out}")
