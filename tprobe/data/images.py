"""Reading microscopy images (PNG, TIFF; 8- or 16-bit; one channel or several) onto one intensity scale.

The rule for bit depth: every channel is returned as float32 on the 8-bit scale (0..255), the scale
the Wang et al. filter thresholds were set on. 8-bit images are unchanged. 16-bit images are scaled
linearly by ``255 / max_value``; ``max_value`` defaults to 65535 (the full 16-bit range) and should
be set to the camera's range (e.g. 4095 for 12-bit data), per channel when channels differ. A pixel
above ``max_value`` is an error, never silently clipped. Nothing is pushed through PIL's
``convert("RGB")``, which would clip 16-bit data. Only unsigned 8- and 16-bit integers (and 1-bit)
are read: signed, 32-bit and float pixels are refused, naming the type found, and so is a 16-bit
colour PNG (grey+alpha, RGB, RGBA), which Pillow decodes to 8 bits. A palette PNG is read as its
palette's colours, never as its indices (a label image's indices are its labels:
:func:`tprobe.data.fov.read_mask`).

Before anything is decoded, the file must be a regular file (never a FIFO, device or folder: a
FIFO would block, ``/dev/zero`` never ends) and its header must declare at most ``max_pixels``
values (width x height x planes; default :data:`DEFAULT_MAX_PIXELS`, 50 million), so a small
compressed file cannot expand into gigabytes.

Several channels come as one stack (a TIFF of shape (C, H, W) or (H, W, C), named in order by
``channels``) or as one file per channel: a path *template* holding ``{channel}``
(``cells/cell7_{channel}.tif``), which :func:`read_channels` expands with each channel's name.
:func:`channel_files` groups a folder's files into such templates.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from tprobe.errors import ChannelError, TprobeError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
CHANNEL = "{channel}"  # the placeholder of a per-channel path template
DEFAULT_MAX_PIXELS = 50_000_000  # values a header may declare (W x H x planes); a 2000x2000 RGB cell is 12 M
TIFF_CHANNEL_AXES = "CSQI"  # C channel, S samples; Q and I: tifffile's names for axes the file does not label


class AboveMaxValue(TprobeError):
    """A pixel above ``--max-value``; :func:`tprobe.data.preprocess.preprocess` counts them and refuses once."""

    def __init__(self, path: Path, value: int, top: float, n_pixels: int, channel: str | None = None):
        where = f" (channel {channel})" if channel else ""
        super().__init__(
            f"{path}: pixel value {value}{where} exceeds --max-value {top:g} ({n_pixels} pixel(s) "
            "above it); raise --max-value to the camera's range"
        )
        self.path, self.value, self.top, self.n_pixels, self.channel = path, value, top, n_pixels, channel


class UnsupportedPixels(TprobeError):
    """Pixels with no fixed 0..top scale (signed, 32-bit, float); preprocess refuses them once, counted."""


def check_regular(path: str | Path) -> None:
    """Refuse anything but a regular file (after symlinks) before it is opened: a FIFO blocks the
    reader forever and a device (``/dev/zero``) never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TprobeError(
            f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); replace or delete the file"
        ) from None
    if not stat.S_ISREG(mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise TprobeError(f"{path}: is {kind}, not an image file; remove it or its manifest row")


def _check_pixels(path: Path, shape, max_pixels: int | None) -> None:
    n = int(np.prod(shape, dtype=np.int64))
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if n > limit:
        raise TprobeError(
            f"{path}: declares {' x '.join(map(str, shape))} = {n:,} values, over --max-pixels "
            f"{limit:,}; crop or downsample the file, or raise --max-pixels"
        )


def _unreadable(path: Path, exc: BaseException) -> TprobeError:
    return TprobeError(
        f"{path}: cannot be read as an image ({type(exc).__name__}); replace or delete the file"
    )


def _plane_size(series) -> tuple[int, int]:
    """A TIFF series' height and width (its Y and X axes)."""
    sizes = dict(zip(series.axes, series.shape, strict=True))
    return sizes.get("Y", 0), sizes.get("X", 0)


def _read_tiff(
    path: Path, max_pixels: int | None, z: int | None = None, t: int | None = None
) -> tuple[np.ndarray, str]:
    """A TIFF's first series and its axes, its declared size checked before it is decoded.

    A file holding another series of the same height and width (an OME-TIFF of several positions) is
    refused in one line, never read as its first image; a smaller series (a thumbnail) is ignored.

    A series with a Z or T axis longer than one (an OME-TIFF's (T, C, Z, Y, X)) keeps the plane ``z`` /
    ``t`` chosen (``--z`` / ``--t``); one not chosen is refused in one line. An axis the file lacks
    ignores the choice.
    """
    check_regular(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            _check_pixels(path, series.shape, max_pixels)
            size = _plane_size(series)
            alike = [s for s in tif.series[1:] if 0 not in size and _plane_size(s) == size]  # not a thumbnail
            if alike:
                raise TprobeError(
                    f"{path}: holds {len(alike) + 1} images (TIFF series) of {size[0]}x{size[1]} px, "
                    "and tprobe reads one image per file; save one image per file (a stack's planes "
                    "as C, Z or T axes of one series)"
                )
            arr, axes = series.asarray(), series.axes
    except (OSError, ValueError, IndexError, MemoryError, tifffile.TiffFileError) as exc:
        if isinstance(exc, TprobeError):
            raise
        raise _unreadable(path, exc) from None
    for axis, choice in (("T", t), ("Z", z)):
        if axis not in axes:
            continue
        i, n = axes.index(axis), arr.shape[axes.index(axis)]
        option = f"--{axis.lower()}"
        if choice is None and n > 1:
            raise ChannelError(
                f"{path}: the TIFF's axes are {axes} and its {n} planes are {axis}, not channels (shape "
                f"{arr.shape}, axes {axes}); choose one with {option} N (0..{n - 1}), or save one "
                "plane per file"
            )
        if choice is not None and not 0 <= choice < n:
            raise ChannelError(
                f"{path}: {option} {choice} is out of range; the file has {n} {axis} planes (0..{n - 1})"
            )
        arr, axes = np.take(arr, choice or 0, axis=i), axes.replace(axis, "")
    return arr, axes


def ome_info(path: str | Path) -> dict | None:
    """An OME-TIFF's channel names, axes and physical pixel size, read from its OME-XML; None for other files.

    Returns ``{"channels": (names...), "axes": "TCZYX"-like, "pixel_size_y": float | None,
    "pixel_size_x": float | None, "pixel_size_unit": str}``; channel names are () when the file names
    none (or not every channel). Only the XML is parsed; nothing in it is executed.
    """
    import xml.etree.ElementTree as ET

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    check_regular(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome:
                return None
            xml, axes = tif.ome_metadata, tif.series[0].axes
            root = ET.fromstring(xml)
    except (OSError, ValueError, IndexError, tifffile.TiffFileError, ET.ParseError) as exc:
        raise TprobeError(
            f"{path}: OME-XML cannot be read ({type(exc).__name__}); replace the file or save it "
            "as a plain TIFF"
        ) from None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    names = [c.get("Name") for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]
    size = {}
    for a in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{a}")
        size[a] = float(value) if value not in (None, "") else None
    unit = pixels.get("PhysicalSizeXUnit") or ("µm" if size["X"] is not None else "")
    return {
        "channels": tuple(names) if names and all(names) else (),
        "axes": axes,
        "pixel_size_y": size["Y"],
        "pixel_size_x": size["X"],
        "pixel_size_unit": unit,
    }


def _png_colour_16bit(path: Path) -> bool:
    """Whether a PNG's header says 16-bit colour (grey+alpha, RGB, RGBA): Pillow decodes those to 8 bits."""
    with open(path, "rb") as f:
        head = f.read(26)  # signature, IHDR length and type, width, height, bit depth, colour type
    return (
        head[:8] == b"\x89PNG\r\n\x1a\n"
        and head[12:16] == b"IHDR"
        and head[24] == 16
        and head[25] in (2, 4, 6)
    )


def _read_raw(
    path: Path,
    max_pixels: int | None = None,
    z: int | None = None,
    t: int | None = None,
    *,
    palette: bool = True,
) -> np.ndarray:
    """A file's pixels as stored; a palette image's colours (``palette``), or its indices (a label image).

    An 8-bit grey+alpha PNG is its grey plane when its alpha is opaque everywhere; with transparent
    pixels it is one line (an error naming the file), never read as a two-plane stack.
    """
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path, max_pixels, z, t)[0]
    check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(path) as im:  # reads the header only
                _check_pixels(path, (im.height, im.width, len(im.getbands())), max_pixels)
                if im.format == "PNG" and _png_colour_16bit(path):
                    raise UnsupportedPixels(
                        f"{path}: 16-bit colour or grey+alpha PNG, which Pillow decodes to 8 bits (the "
                        "low byte of every pixel lost, --max-value not applied); save it as a 16-bit "
                        "TIFF, or as greyscale PNGs, one per channel"
                    )
                im.load()
                if palette and im.mode in ("P", "PA"):  # the indices are not intensities: their colours are
                    transparent = im.mode == "PA" or "transparency" in im.info
                    return np.asarray(im.convert("RGBA" if transparent else "RGB"))
                arr = np.asarray(im)
                if im.mode == "LA":  # 8-bit grey+alpha: grey when the alpha is opaque everywhere
                    clear = int((arr[..., 1] != 255).sum())
                    if clear:
                        raise TprobeError(
                            f"{path}: grey+alpha PNG with transparent pixels ({clear:,} below alpha 255); "
                            "tprobe reads intensities, not transparency: save it as a greyscale PNG "
                            "without alpha, the background filled as you mean it"
                        )
                    return arr[..., 0]
                return arr
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, above --max-pixels' default
        found = re.search(r"\((\d+) pixels\)", str(exc))
        n, limit = int(found[1]) if found else 0, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        over = f"over --max-pixels {limit:,}" if n > limit else "over the most Pillow opens"
        raise TprobeError(f"{path}: declares {n:,} pixels, {over}; crop or downsample the file") from None
    except (OSError, UnidentifiedImageError, ValueError, MemoryError) as exc:
        if isinstance(exc, TprobeError):
            raise
        raise _unreadable(path, exc) from None


def read_image(
    path: str | Path,
    *,
    max_value: float | None = None,
    max_pixels: int | None = None,
    z: int | None = None,
    t: int | None = None,
) -> np.ndarray:
    """Read a greyscale image as a float32 (H, W) array on the 0..255 scale.

    Raises TprobeError with a one-line reason and fix for unreadable, empty, colour, oversized
    (``max_pixels``, default :data:`DEFAULT_MAX_PIXELS`) or out-of-range images, and for anything
    but a regular file.
    """
    return read_grey(path, max_value=max_value, max_pixels=max_pixels, z=z, t=t)[0]


def read_grey(
    path: str | Path,
    *,
    max_value: float | None = None,
    max_pixels: int | None = None,
    z: int | None = None,
    t: int | None = None,
) -> tuple[np.ndarray, str]:
    """:func:`read_image` and the file's raw pixel type (``uint8``, ``uint16``, ``bool``)."""
    path = Path(path)
    arr = _to_grey(_read_raw(path, max_pixels, z, t), path)
    if arr.size == 0 or min(arr.shape) == 0:
        raise TprobeError(f"{path}: image has zero size; delete the file")
    return _to_8bit_scale(arr, path, max_value), arr.dtype.name


def read_channels(
    path: str | Path,
    channels,
    *,
    max_value=None,
    max_pixels: int | None = None,
    z: int | None = None,
    t: int | None = None,
) -> tuple[np.ndarray, str]:
    """Read every named channel of one cell: float32 (C, H, W) on the 0..255 scale, and the raw pixel type.

    ``path`` is a stack (TIFF (C, H, W) or (H, W, C), or an RGB PNG for three channels) or a
    template holding ``{channel}``; ``max_value`` is one value for every channel or one per channel.
    A stack whose channel count differs from ``channels``, a stack whose extra axis the TIFF labels as
    anything but channels (a Z-stack, a time series), a missing channel file and channels of
    different bit depths are errors naming the file and the fix.
    """
    channels = tuple(channels.split(",")) if isinstance(channels, str) else tuple(channels)
    tops = max_value if isinstance(max_value, tuple | list) else (max_value,) * len(channels)
    path = str(path)
    if CHANNEL in path:
        planes, dtypes = [], []
        for name in channels:
            file = Path(path.replace(CHANNEL, name))
            if not file.exists():  # a FIFO or device exists: refused, as one file, when it is read
                raise ChannelError(
                    f"{file}: missing (channel {name} of this cell); add the file or remove the "
                    "cell's other channel files"
                )
            arr = _to_grey(_read_raw(file, max_pixels, z, t), file)
            if planes and arr.shape != planes[0].shape:
                raise ChannelError(
                    f"{file}: {arr.shape[0]}x{arr.shape[1]} px, but channel {channels[0]} is "
                    f"{planes[0].shape[0]}x{planes[0].shape[1]} px; save every channel of a cell at one size"
                )
            if dtypes and arr.dtype != dtypes[0]:
                raise ChannelError(
                    f"{file}: {bit_depth(arr.dtype)}, but channel {channels[0]} of this cell is "
                    f"{bit_depth(dtypes[0])}; save every channel at one bit depth"
                )
            planes.append(arr)
            dtypes.append(arr.dtype)
        stack = np.stack(planes)
        where = Path(path.replace(CHANNEL, channels[0]))
    else:
        where = Path(path)
        arr, axes = _read_stack(where, max_pixels, z, t)
        stack = _channels_first(arr, axes, len(channels), where, channels)
    if stack.size == 0 or min(stack.shape) == 0:
        raise TprobeError(f"{where}: image has zero size; delete the file")
    scaled = [
        _to_8bit_scale(plane, where, top, name if len(channels) > 1 else None)
        for plane, top, name in zip(stack, tops, channels, strict=True)
    ]
    return np.stack(scaled), str(stack.dtype)


def _read_stack(
    path: Path, max_pixels: int | None = None, z: int | None = None, t: int | None = None
) -> tuple[np.ndarray, str]:
    """A stack and its axes, as the file itself says: a TIFF's axes (``C`` channels, ``S`` samples,
    ``YXS`` = interleaved, ``Z``/``T`` = planes that are not channels), a PNG's colour samples
    (``YXS``). Never guessed from the shape, which is ambiguous when a side equals the channel count."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        arr = _read_raw(path, max_pixels)
        if arr.ndim == 3 and arr.shape[-1] == 4 and np.all(arr[..., 3] == np.iinfo(arr.dtype).max):
            arr = arr[..., :3]  # RGBA with an opaque alpha: three channels
        return arr, "YXS" if arr.ndim == 3 else "YX"
    arr, axes = _read_tiff(path, max_pixels, z, t)
    keep = [i for i, n in enumerate(arr.shape) if n != 1 or axes[i] in "YX"]  # drop length-1 axes (T, Z, ...)
    return arr.reshape([arr.shape[i] for i in keep]), "".join(axes[i] for i in keep)


def _channels_first(arr: np.ndarray, axes: str, n: int, path: Path, names) -> np.ndarray:
    if n == 1:  # one named channel: a plain greyscale image
        return _to_grey(arr, path)[None]
    last = axes.endswith("S")
    if arr.ndim == 3:
        axis, count = (axes[-1], arr.shape[-1]) if last else (axes[0], arr.shape[0])
        if axis not in TIFF_CHANNEL_AXES:
            raise ChannelError(
                f"{path}: the TIFF's axes are {axes} (shape {arr.shape}): its {count} planes are "
                f"{axis}, not channels (C or S); save the channels as a C axis, or one plane per "
                "file with --channel-files"
            )
        if count == n:
            return np.moveaxis(arr, -1, 0) if last else arr
        got = f"{count} channels ({'interleaved, ' if last else ''}shape {arr.shape})"
    else:
        got = "one plane" if arr.ndim == 2 else f"shape {arr.shape}, axes {axes}"
    raise ChannelError(
        f"{path}: the image has {got}, but --channels names {n} ({','.join(names)}); "
        "name every channel of the stack, in order"
    )


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
    rx = re.compile(
        "^"
        + re.escape(pattern)
        .replace(r"\{cell\}", "(?P<cell>.+?)")
        .replace(r"\{channel\}", f"(?P<channel>{names})")
        + "$"
    )
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
            raise ChannelError(
                f"{folder / stem}: the cell's channel files end in {', '.join(suffixes)}; "
                "give every channel file of a cell the same suffix"
            )
        template = str(folder / (stem + suffixes[0]))
        missing = [c for c in channels if c not in found]
        if missing:
            raise ChannelError(
                f"{template.replace(CHANNEL, missing[0])}: missing (the cell has "
                f"{', '.join(sorted(found))}); add the {missing[0]} file or remove the cell's other files"
            )
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


def _to_8bit_scale(
    arr: np.ndarray, path: Path, max_value: float | None, channel: str | None = None
) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32) * 255
    if (
        arr.dtype.kind != "u" or arr.dtype.itemsize != 2
    ):  # signed (negative values), 32-bit or float: no fixed 0..top scale
        kind = {"i": "signed integer", "u": "unsigned integer", "f": "floating-point"}.get(arr.dtype.kind, "")
        raise UnsupportedPixels(
            f"{path}: {arr.dtype.itemsize * 8}-bit {kind or str(arr.dtype)} pixels ({arr.dtype}) are "
            "not supported; tprobe reads unsigned 8- or 16-bit integers (uint8, uint16): convert "
            "the file"
        )
    top = float(max_value if max_value is not None else np.iinfo(arr.dtype).max)
    if arr.max() > top:
        raise AboveMaxValue(path, int(arr.max()), top, int((arr > top).sum()), channel)
    return (arr.astype(np.float64) * (255.0 / top)).astype(np.float32)
