"""Reading microscopy images (PNG, TIFF; 8- or 16-bit; one channel or several) onto one intensity scale.

The rule for bit depth: every channel is returned as float32 on the 8-bit scale (0..255), the scale
the Wang et al. filter thresholds were set on. 8-bit images are unchanged. 16-bit images are scaled
linearly by ``255 / max_value``; ``max_value`` defaults to 65535 (the full 16-bit range) and should
be set to the camera's range (e.g. 4095 for 12-bit data), per channel when channels differ. A pixel
above ``max_value`` is an error, never silently clipped. Nothing is pushed through PIL's
``convert("RGB")``, which would clip 16-bit data.

Several channels come as one stack (a TIFF of shape (C, H, W) or (H, W, C), named in order by
``channels``) or as one file per channel: a path *template* holding ``{channel}``
(``cells/cell7_{channel}.tif``), which :func:`read_channels` expands with each channel's name.
:func:`channel_files` groups a folder's files into such templates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from tprobe.errors import ChannelError, TprobeError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
CHANNEL = "{channel}"  # the placeholder of a per-channel path template


def _read_raw(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path)
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, tifffile.TiffFileError) as exc:
        raise TprobeError(
            f"{path}: cannot be read as an image ({type(exc).__name__}); replace or delete the file"
        ) from None


def read_image(path: str | Path, *, max_value: float | None = None) -> np.ndarray:
    """Read a greyscale image as a float32 (H, W) array on the 0..255 scale.

    Raises TprobeError with a one-line reason and fix for unreadable, empty, colour or
    out-of-range images.
    """
    path = Path(path)
    arr = _to_grey(_read_raw(path), path)
    if arr.size == 0 or min(arr.shape) == 0:
        raise TprobeError(f"{path}: image has zero size; delete the file")
    return _to_8bit_scale(arr, path, max_value)


def read_channels(path: str | Path, channels, *, max_value=None) -> tuple[np.ndarray, str]:
    """Read every named channel of one cell: float32 (C, H, W) on the 0..255 scale, and the raw pixel type.

    ``path`` is a stack (TIFF (C, H, W) or (H, W, C), or an RGB PNG for three channels) or a
    template holding ``{channel}``; ``max_value`` is one value for every channel or one per channel.
    A stack whose channel count differs from ``channels``, a missing channel file and channels of
    different bit depths are errors naming the file and the fix.
    """
    channels = tuple(channels.split(",")) if isinstance(channels, str) else tuple(channels)
    tops = max_value if isinstance(max_value, tuple | list) else (max_value,) * len(channels)
    path = str(path)
    if CHANNEL in path:
        planes, dtypes = [], []
        for name in channels:
            file = Path(path.replace(CHANNEL, name))
            if not file.is_file():
                raise ChannelError(f"{file}: missing (channel {name} of this cell); add the file or remove the "
                                   "cell's other channel files")  # fmt: skip
            arr = _to_grey(_read_raw(file), file)
            if planes and arr.shape != planes[0].shape:
                raise ChannelError(f"{file}: {arr.shape[0]}x{arr.shape[1]} px, but channel {channels[0]} is "
                                  f"{planes[0].shape[0]}x{planes[0].shape[1]} px; save every channel of a cell at one size")  # fmt: skip
            if dtypes and arr.dtype != dtypes[0]:
                raise ChannelError(f"{file}: {bit_depth(arr.dtype)}, but channel {channels[0]} of this cell is "
                                  f"{bit_depth(dtypes[0])}; save every channel at one bit depth")  # fmt: skip
            planes.append(arr)
            dtypes.append(arr.dtype)
        stack = np.stack(planes)
        where = Path(path.replace(CHANNEL, channels[0]))
    else:
        where = Path(path)
        arr, last = _read_stack(where)
        stack = _channels_first(arr, last, len(channels), where, channels)
    if stack.size == 0 or min(stack.shape) == 0:
        raise TprobeError(f"{where}: image has zero size; delete the file")
    scaled = [_to_8bit_scale(plane, where, top) for plane, top in zip(stack, tops, strict=True)]
    return np.stack(scaled), str(stack.dtype)


def _read_stack(path: Path) -> tuple[np.ndarray, bool]:
    """A stack and whether its channels are its last axis, as the file itself says: a TIFF's axes
    (``S``, samples, last = interleaved), a PNG's colour samples (always last). Never guessed from
    the shape, which is ambiguous when a side equals the channel count."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        arr = _read_raw(path)
        if arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == np.iinfo(arr.dtype).max):
            arr = arr[..., :3]  # RGBA with an opaque alpha: three channels
        return arr, arr.ndim == 3
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise TprobeError(
            f"{path}: cannot be read as an image ({type(exc).__name__}); replace or delete the file"
        ) from None
    keep = [i for i, n in enumerate(arr.shape) if n != 1 or axes[i] in "YX"]  # drop length-1 axes (T, Z, ...)
    arr, axes = arr.reshape([arr.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    return arr, axes.endswith("S")


def _channels_first(arr: np.ndarray, last: bool, n: int, path: Path, names) -> np.ndarray:
    if n == 1:  # one named channel: a plain greyscale image
        return _to_grey(arr, path)[None]
    if arr.ndim == 3:
        count = arr.shape[-1] if last else arr.shape[0]
        if count == n:
            return np.moveaxis(arr, -1, 0) if last else arr
        got = f"{count} channels ({'interleaved, ' if last else ''}shape {arr.shape})"
    else:
        got = "one plane" if arr.ndim == 2 else f"shape {arr.shape}"
    raise ChannelError(f"{path}: the image has {got}, but --channels names {n} ({','.join(names)}); "
                       "name every channel of the stack, in order")  # fmt: skip


def bit_depth(dtype) -> str:
    dtype = np.dtype(dtype)
    return f"{dtype.itemsize * 8}-bit" if dtype.kind in "ui" else str(dtype)


def channel_files(files, pattern: str, channels) -> tuple[list[str], list[str]]:
    """Group one-file-per-channel images into path templates.

    ``pattern`` is a file-name stem with ``{cell}`` and ``{channel}`` (``{cell}_{channel}``); a file
    ``cell7_fad.tif`` in a folder becomes the template ``<folder>/cell7_{channel}.tif``. Returns the
    templates and the files that do not fit the pattern. A cell missing a channel is an error naming
    the missing file.
    """
    import re

    if "{cell}" not in pattern or CHANNEL not in pattern:
        raise TprobeError(
            f"--channel-files {pattern!r} must hold {{cell}} and {{channel}}, e.g. '{{cell}}_{{channel}}'"
        )
    names = "|".join(re.escape(c) for c in sorted(channels, key=len, reverse=True))
    rx = re.compile("^" + re.escape(pattern).replace(r"\{cell\}", "(?P<cell>.+?)")
                    .replace(r"\{channel\}", f"(?P<channel>{names})") + "$")  # fmt: skip
    cells: dict[tuple, dict[str, Path]] = {}
    other = []
    for f in map(Path, files):
        m = rx.match(f.stem)
        if not m:
            other.append(str(f))
            continue
        cells.setdefault((f.parent, m["cell"]), {})[m["channel"]] = f
    templates = []
    for (folder, cell), found in cells.items():
        stem = pattern.replace("{cell}", cell)
        suffixes = sorted({f.suffix for f in found.values()})
        if len(suffixes) > 1:
            raise ChannelError(f"{folder / stem}: the cell's channel files end in {', '.join(suffixes)}; "
                               "give every channel file of a cell the same suffix")  # fmt: skip
        template = str(folder / (stem + suffixes[0]))
        missing = [c for c in channels if c not in found]
        if missing:
            raise ChannelError(f"{template.replace(CHANNEL, missing[0])}: missing (the cell has "
                               f"{', '.join(sorted(found))}); add the {missing[0]} file or remove the cell's other files")  # fmt: skip
        templates.append(template)
    return sorted(templates), other


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
            f"{path}: {kind} colour image; save one intensity channel as a greyscale PNG/TIFF, or name "
            "the channels with --channels NAME,NAME,NAME"
        )
    raise ChannelError(  # the options do not fit the data (a stack without --channels): stop, do not skip
        f"{path}: image has shape {arr.shape}; expected a 2-D greyscale image — name a stack's planes "
        "with --channels NAME,NAME,... or save one plane per file"
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
