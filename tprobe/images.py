"""Reading single-channel microscopy images (PNG, TIFF; 8- or 16-bit) onto one intensity scale.

The rule for bit depth: every image is returned as float32 on the 8-bit scale (0..255), the scale
the Wang et al. filter thresholds were set on. 8-bit images are unchanged. 16-bit images are scaled
linearly by ``255 / max_value``; ``max_value`` defaults to 65535 (the full 16-bit range) and should
be set to the camera's range (e.g. 4095 for 12-bit data). A pixel above ``max_value`` is an error,
never silently clipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from tprobe.errors import TprobeError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def read_image(path: str | Path, *, max_value: float | None = None) -> np.ndarray:
    """Read a greyscale image as a float32 (H, W) array on the 0..255 scale.

    Raises TprobeError with a one-line reason and fix for unreadable, empty, colour or
    out-of-range images.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, tifffile.TiffFileError) as exc:
        raise TprobeError(
            f"{path}: cannot be read as an image ({type(exc).__name__}); replace or delete the file"
        ) from None
    arr = _to_grey(arr, path)
    if arr.size == 0 or min(arr.shape) == 0:
        raise TprobeError(f"{path}: image has zero size; delete the file")
    return _to_8bit_scale(arr, path, max_value)


def _to_grey(arr: np.ndarray, path: Path) -> np.ndarray:
    arr = np.squeeze(arr) if arr.ndim > 2 and 1 in arr.shape[:-1] else arr
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        opaque = arr.shape[-1] == 3 or np.all(arr[..., 3] == np.iinfo(arr.dtype).max)
        if opaque and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]  # grey saved as RGB(A): lossless
        kind = "RGBA" if arr.shape[-1] == 4 else "RGB"
        raise TprobeError(
            f"{path}: {kind} colour image; tprobe needs one intensity channel — save the "
            "autofluorescence channel as a greyscale PNG/TIFF"
        )
    raise TprobeError(
        f"{path}: image has shape {arr.shape}; expected a 2-D greyscale image — save one plane per file"
    )


def _to_8bit_scale(arr: np.ndarray, path: Path, max_value: float | None) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32) * 255
    if arr.dtype.kind not in "ui":
        raise TprobeError(f"{path}: pixel type {arr.dtype} is not supported; save as 8- or 16-bit integers")
    top = float(max_value if max_value is not None else np.iinfo(arr.dtype).max)
    if arr.max() > top:
        raise TprobeError(
            f"{path}: pixel value {int(arr.max())} exceeds --max-value {top:g}; "
            "raise --max-value to the camera's range"
        )
    return (arr.astype(np.float64) * (255.0 / top)).astype(np.float32)
