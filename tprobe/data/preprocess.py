"""Wang et al. preprocessing: measure, filter, pad to a square canvas, and expand into views.

Every number is a field of :class:`PreprocessConfig`. The result is a manifest with one row per
image *view* (kept images) or one row per dropped image, and a config hash that later stages use
as a cache key.

Measurements are taken on the unpadded original, on the 8-bit intensity scale
(see :mod:`tprobe.data.images`):

- ``entropy``: Shannon entropy (bits) of the 256-bin intensity histogram;
- ``total_intensity``: the summed raw intensity;
- ``n_components``: connected components (4-connectivity) of ``pixel > binary_threshold``
  with at least ``min_component_area`` pixels.

With several channels (``channels``), the measurements and filters run on the segmentation
channel (``segment_channel``, default the first channel the model sees), and ``channel_mode`` says
what the model sees: ``grey`` one channel (today's single-channel input), ``rgb`` three channels as
R, G, B, ``per-channel`` every chosen channel on its own as grey (a channel axis in the store,
pooled per channel then concatenated). Each channel is scaled by its own ``max_value`` (one value
for all, or one per channel, recorded); nothing is computed from the data. The default config
(one grey channel) keeps the hash, and so the stores, of tprobe 0.2.

Filters, in order: dim (``entropy < entropy_min``, or ``entropy < entropy_dim`` and
``total_intensity < intensity_dim``), multi-cell (``n_components > 1``), too large for the canvas.

``min_component_area = 30`` px: on the bundled sample the largest above-threshold component (the
cell) has a 5th percentile of 34 px and a median of 177 px, while 56% of all components are
1-6 px specks of noise. A blob under 30 px (about 6x5 px, a quarter of a cell's width) is too
small to be a second cell; 30 is the smallest round value under the smallest cells.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tprobe.data.dataset import Dataset, Skipped
from tprobe.data.images import (
    CHANNEL,
    DEFAULT_MAX_PIXELS,
    AboveMaxValue,
    UnsupportedPixels,
    bit_depth,
    check_regular,
    ome_info,
    read_channels,
    read_grey,
)
from tprobe.errors import ChannelError, TprobeError

if TYPE_CHECKING:  # pandas (~0.2 s) on use: `tprobe --help` builds its options without it
    import pandas as pd

__all__ = [
    "PreprocessConfig",
    "Preprocessed",
    "preprocess",
    "prepare",
    "load_view",
    "load_canvas",
    "read_cell",
    "apply_view",
    "VIEW_OPS",
    "pad_to_canvas",
    "measure",
    "VIEW_SETS",
    "PREPROCESS_VERSION",
    "CHANNEL_MODES",
    "is_saved",
    "ome_defaults",
    "FOV_DROPS",
]

PREPROCESS_VERSION = 1  # bump when the algorithm changes, so old caches are not reused
VIEW_SETS = {
    "six": ("orig", "r90", "r180", "r270", "fliph", "flipv"),
    "dihedral8": ("orig", "r90", "r180", "r270", "fliph", "flipv", "transpose", "antitranspose"),
    "orig": ("orig",),
}
FIT_MODES = ("pad", "resize", "fill")
# the canvas of the raw-pixel baselines (tprobe.train.baselines): each cell resized onto a 64 px square
PIXEL_CANVAS = 64
DROP_ORDER = ("unreadable", "duplicate", "dim", "multi_cell", "too_large")
FOV_DROPS = ("touches_border", "small_object", "large_object")  # objects of a field of view (tprobe.data.fov)
OUTSIDE_MODES = ("zero", "keep")
CHANNEL_MODES = ("grey", "rgb", "per-channel")
# fields left out of to_dict() at their defaults, so a one-channel config keeps its 0.2 hash
CHANNEL_DEFAULTS = {
    "channels": (),
    "channel_mode": "grey",
    "use": (),
    "segment_channel": None,
    "channel_files": None,
    "max_pixels": DEFAULT_MAX_PIXELS,
    "z": None,
    "t": None,
    "fov": False,
    "margin": 0,
    "outside": "zero",
    "min_object_area": 1,
    "max_object_area": None,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of the preprocessing; defaults follow Wang et al. (2019)."""

    entropy_min: float = 4.0
    entropy_dim: float = 4.7
    intensity_dim: float = 3500.0
    binary_threshold: float = 20.0
    min_component_area: int = 30
    max_components: int = 1
    canvas: int = 140
    fit: str = "pad"
    views: str = "six"
    max_value: float | tuple[float | None, ...] | None = None  # one for all channels, or one per channel
    channels: tuple[str, ...] = ()  # a stack's planes in order, or the per-channel files' names; () = grey
    channel_mode: str = "grey"
    use: tuple[str, ...] = ()  # the channels the model sees, in order; () = the mode's default
    segment_channel: str | None = None  # the channel the filters measure; None = the first used channel
    channel_files: str | None = None  # one file per channel: a stem pattern with {cell} and {channel}
    max_pixels: int = (
        DEFAULT_MAX_PIXELS  # a file whose header declares more values (W x H x planes) is skipped
    )
    z: int | None = None  # the Z plane of a TIFF with a Z axis (OME (T, C, Z, Y, X)); needed when Z > 1
    t: int | None = None  # the time point of a TIFF with a T axis; needed when T > 1
    # fields of view cut into one crop per labelled object (tprobe.data.fov); recorded only when fov is set
    fov: bool = False
    margin: int = 0  # px around each object's bounding box
    outside: str = "zero"  # pixels of the crop outside the object: zero, or keep (neighbours included)
    min_object_area: int = 1  # objects of fewer pixels are dropped (small_object)
    max_object_area: int | None = None  # objects of more pixels are dropped (large_object)

    def __post_init__(self):
        for name in ("channels", "use"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.max_value, list):
            object.__setattr__(self, "max_value", tuple(self.max_value))
        tops = self.max_value if isinstance(self.max_value, tuple) else (self.max_value,)
        if any(t is not None and not (np.isfinite(t) and t > 0) for t in tops):
            given = (
                ",".join(f"{n}={t:g}" for n, t in zip(self.channels, tops, strict=False))
                if isinstance(self.max_value, tuple)
                else f"{self.max_value:g}"
            )
            raise TprobeError(
                f"--max-value {given}: the camera's top value must be a positive number "
                "(e.g. 4095 for 12-bit, 65535 for 16-bit)"
            )
        self._check_channels()
        if self.fit not in FIT_MODES:
            raise TprobeError(f"fit={self.fit!r} is not one of {', '.join(FIT_MODES)}")
        if self.views not in VIEW_SETS:
            raise TprobeError(f"views={self.views!r} is not one of {', '.join(VIEW_SETS)}")
        if self.canvas < 1:
            raise TprobeError(f"canvas={self.canvas} must be a positive number of pixels")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise TprobeError(f"--max-pixels {self.max_pixels}: give a positive whole number of pixels")
        if self.min_component_area < 1 or self.max_components < 1:
            raise TprobeError("min_component_area and max_components must be >= 1")
        for name in ("z", "t"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise TprobeError(f"--{name} {value}: give a plane index, 0 or more")
        if self.outside not in OUTSIDE_MODES:
            raise TprobeError(f"--outside {self.outside!r} is not one of {', '.join(OUTSIDE_MODES)}")
        if self.margin < 0 or self.min_object_area < 1 or (self.max_object_area or 1) < self.min_object_area:
            raise TprobeError(
                f"--margin {self.margin}, --min-object-area {self.min_object_area}, --max-object-area "
                f"{self.max_object_area}: give margin >= 0 and 1 <= min-object-area <= "
                "max-object-area"
            )

    def _check_channels(self) -> None:
        names, mode = self.channels, self.channel_mode
        if mode not in CHANNEL_MODES:
            raise TprobeError(f"--channel-mode {mode!r} is not one of {', '.join(CHANNEL_MODES)}")
        if not names:
            if mode != "grey" or self.use or self.segment_channel or self.channel_files:
                raise TprobeError(
                    "--channel-mode, --use, --segment-channel and --channel-files need --channels "
                    "NAME,NAME,... naming the image's channels"
                )
            if isinstance(self.max_value, tuple):
                raise TprobeError("--max-value NAME=VALUE needs --channels naming the channels")
            return
        bad = [n for n in names if not n or any(c in n for c in ",={}/\\ ")]
        if bad or len(set(names)) != len(names):
            raise TprobeError(
                f"--channels {','.join(names)}: names must be non-empty and unique, without , = {{ }} / or spaces"
            )
        unknown = [n for n in (*self.use, self.segment_channel or names[0]) if n not in names]
        if unknown:
            raise TprobeError(f"channel {unknown[0]!r} is not one of --channels {','.join(names)}")
        want = {"grey": 1, "rgb": 3}.get(mode)
        if want and len(self.used_channels) != want:
            raise TprobeError(
                f"--channel-mode {mode} uses {want} channel(s), got {len(self.used_channels)} "
                f"({','.join(self.used_channels)}); choose them with --use"
            )
        if isinstance(self.max_value, tuple) and len(self.max_value) != len(names):
            raise TprobeError(
                f"--max-value gives {len(self.max_value)} values for {len(names)} channels; give "
                "one value, or NAME=VALUE for each channel"
            )

    @property
    def view_names(self) -> tuple[str, ...]:
        return VIEW_SETS[self.views]

    @property
    def used_channels(self) -> tuple[str, ...]:
        """The channels the model sees, in order (empty for one-channel images)."""
        if not self.channels or self.use:
            return self.use
        return {"grey": self.channels[:1], "rgb": self.channels[:3]}.get(self.channel_mode, self.channels)

    @property
    def segment(self) -> str | None:
        """The channel the filters measure."""
        return self.segment_channel or (self.used_channels[0] if self.channels else None)

    @property
    def per_channel(self) -> tuple[str, ...]:
        """The channel axis of the store: the used channels in ``per-channel`` mode, else none."""
        return self.used_channels if self.channel_mode == "per-channel" else ()

    def require_one_image(self, what: str) -> None:
        """Refuse ``per-channel`` input for ``what``, which takes one image (grey or RGB) per cell."""
        if self.channel_mode == "per-channel":
            raise TprobeError(
                f"{what} needs one image per cell: use --channel-mode grey or rgb (per-channel "
                "embeddings are for extract and probe)"
            )

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if CHANNEL_DEFAULTS.get(k, object()) != v}
        return {**d, "version": PREPROCESS_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """The inverse of :meth:`to_dict`; a record from another preprocessing version is refused."""
        if d.get("version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
            raise TprobeError(
                f"preprocessing version {d.get('version')} was recorded; this tprobe runs version "
                f"{PREPROCESS_VERSION}: preprocess and extract again"
            )
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "version"}
        return cls(**d)

    @property
    def hash(self) -> str:
        return _hash(json.dumps(self.to_dict(), sort_keys=True))


@dataclass
class Preprocessed:
    """The manifest (one row per view, or per dropped image), its keys and the skipped files.

    ``warnings``: notes on the input that are not skipped files (e.g. a field's empty label image);
    ``folder``: where it was saved or loaded from (``None`` while only in memory). Neither is saved.
    """

    manifest: pd.DataFrame
    config: PreprocessConfig
    fingerprint: str
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list, compare=False)
    folder: Path | None = field(default=None, compare=False)

    @property
    def kept(self) -> pd.DataFrame:
        return self.manifest[self.manifest["kept"]].reset_index(drop=True)

    def counts(self) -> pd.DataFrame:
        """Per donor x class: images found, dropped by each filter, kept, and views."""
        import pandas as pd

        src = self.manifest[self.manifest["view"] == "orig"]
        src = src.assign(cls=np.where(src["label"] == 1, "activated", "quiescent"))
        table = src.groupby(["donor", "cls"]).size().rename("found").to_frame()
        for reason in DROP_ORDER + (FOV_DROPS if self.config.fov else ()):
            hit = src[src["drop_reason"] == reason].groupby(["donor", "cls"]).size()
            table[reason] = hit.reindex(table.index, fill_value=0)
        kept = src[src["kept"]].groupby(["donor", "cls"]).size()
        table["kept"] = kept.reindex(table.index, fill_value=0)
        table["views"] = table["kept"] * len(self.config.view_names)
        table.index.names = ["donor", "class"]
        total = table.sum(numeric_only=True).to_frame(("total", "")).T
        return pd.concat([table, total]).astype(int)

    def save(self, out: str | Path) -> Path:
        """Write ``manifest.parquet``, ``preprocess.json`` and ``counts.csv`` into ``out``; return the manifest path.

        ``preprocess.json`` is written last, so a folder holding it holds a whole artifact.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "manifest.parquet"
        self.manifest.to_parquet(path, index=False)
        self.counts().to_csv(out / "counts.csv")
        meta = {
            "artifact": "tprobe.Preprocessed",
            "config": self.config.to_dict(),
            "preprocess_hash": self.config.hash,
            "dataset_fingerprint": self.fingerprint,
            "n_rows": len(self.manifest),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
        }
        (out / "preprocess.json").write_text(json.dumps(meta, indent=2))
        self.folder = out
        return path

    @classmethod
    def load(cls, folder: str | Path, *, verify_files: bool = True) -> Preprocessed:
        """Open a saved artifact and verify it: the manifest's fingerprint and the config's hash must be
        the recorded ones and (``verify_files``) every kept source file must still hash to its ``source_id``.
        """
        import pandas as pd

        folder = Path(folder)
        try:
            meta = json.loads((folder / "preprocess.json").read_text())
            manifest = pd.read_parquet(folder / "manifest.parquet")
        except FileNotFoundError as exc:
            raise TprobeError(
                f"{folder}: not a preprocessed folder ({Path(exc.filename).name} missing); "
                "run `tprobe preprocess --out` first"
            ) from None
        except (ValueError, OSError) as exc:
            raise TprobeError(
                f"{folder}: preprocess.json or manifest.parquet is unreadable ({type(exc).__name__}); "
                "run `tprobe preprocess` again"
            ) from None
        missing = [c for c in _SAVED_COLUMNS if c not in manifest.columns]
        if missing:
            raise TprobeError(
                f"{folder}: manifest.parquet has no {', '.join(missing)} column (edited or mixed up); "
                "run `tprobe preprocess` again"
            )
        if manifest["label"].dtype.kind not in "iu":  # "0" and 0 alike in the fingerprint (f"{label}")
            raise TprobeError(
                f"{folder}: manifest.parquet's label column holds {manifest['label'].dtype} values, not "
                "the integer labels it was written with (edited?); run `tprobe preprocess` again"
            )
        config = PreprocessConfig.from_dict(meta["config"])
        fingerprint = _fingerprint(manifest)
        if (
            config.hash != meta.get("preprocess_hash")
            or fingerprint != meta.get("dataset_fingerprint")
            or len(manifest) != meta.get("n_rows")
        ):
            raise TprobeError(
                f"{folder}: manifest.parquet does not match preprocess.json (edited or mixed up); "
                "run `tprobe preprocess` again"
            )
        if verify_files:
            src = manifest[manifest["kept"] & (manifest["view"] == "orig")]
            ids = (
                src["crop_id"] if "crop_id" in src.columns else src["source_id"]
            )  # a crop: its own bytes' hash
            for path, sid in zip(src["path"], ids, strict=True):
                try:
                    same = _hash(source_bytes(path, config), 16) == sid
                except (OSError, TprobeError):  # gone, or no longer a regular file
                    same = False
                if not same:
                    raise TprobeError(
                        f"{path}: changed or missing since {folder} was preprocessed; "
                        "run `tprobe preprocess` again"
                    )
        skipped = [Skipped(s["path"], s["reason"]) for s in meta.get("skipped", []) if isinstance(s, dict)]
        return cls(manifest, config, fingerprint, skipped, folder=folder)


# the columns of a saved manifest that opening it and extracting from it read
_SAVED_COLUMNS = ("path", "label", "donor", "source_id", "image_id", "group", "view", "kept")


def _hash(text: str | bytes, n: int = 12) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:n]


def measure(img: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> dict:
    """Entropy (bits), total intensity and component count of one unpadded image."""
    hist = np.bincount(np.clip(img, 0, 255).astype(np.uint8).ravel(), minlength=256)
    p = hist[hist > 0] / img.size
    entropy = float(-(p * np.log2(p)).sum())
    areas = np.bincount(_components(img > config.binary_threshold).ravel())[1:]
    return {
        "height": int(img.shape[0]),
        "width": int(img.shape[1]),
        "entropy": entropy,
        "total_intensity": float(img.sum()),
        "n_components": int((areas >= config.min_component_area).sum()),
    }


def _components(mask: np.ndarray) -> np.ndarray:
    """The 4-connected components of a 2-D boolean mask, labelled 1..n (0: background), as
    ``skimage.measure.label(mask, connectivity=1)`` labels them.

    scikit-image's union-find labeller is called on the mask's bytes: its public ``label`` hands a
    boolean mask to ``scipy.ndimage.label``, whose import (with scikit-image's morphology) was
    0.2-0.4 s of ``tprobe extract``'s start-up (issue 20), for the same labels. The labeller is
    private to scikit-image, so any version without it gets the public function.
    """
    try:
        from skimage.measure._ccomp import label_cython
    except ImportError:  # another scikit-image: the public function, the same labels
        from skimage.measure import label

        return label(mask, connectivity=1)
    return label_cython(np.ascontiguousarray(mask).view(np.uint8), 0, False, 1)


def _drop_reason(m: dict, config: PreprocessConfig) -> str | None:
    if m["entropy"] < config.entropy_min or (
        m["entropy"] < config.entropy_dim and m["total_intensity"] < config.intensity_dim
    ):
        return "dim"
    if m["n_components"] > config.max_components:
        return "multi_cell"
    if config.fit == "pad" and max(m["height"], m["width"]) > config.canvas:
        return "too_large"
    return None


def pad_to_canvas(img: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Scale (per ``config.fit``) and zero-pad ``img`` (H, W) or (C, H, W) centred on a ``canvas`` square."""
    if img.ndim == 3:
        return np.stack([pad_to_canvas(plane, config) for plane in img])
    c = config.canvas
    h, w = img.shape
    scale = c / max(h, w)
    if (config.fit == "resize" and scale < 1) or config.fit == "fill":
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
        from skimage.transform import resize

        img = resize(img, shape, order=1, preserve_range=True, anti_aliasing=scale < 1)
        h, w = img.shape
    if h > c or w > c:
        raise TprobeError(f"image of {h}x{w} px does not fit the {c} px canvas; use --fit resize")
    out = np.zeros((c, c), dtype=np.float32)
    top, left = (c - h) // 2, (c - w) // 2
    out[top : top + h, left : left + w] = img
    return out


_AX = (-2, -1)
# each view's rotation/flip on the last two axes, as a view of its input (no copy)
VIEW_OPS = {
    "orig": lambda a: a,
    "r90": lambda a: np.rot90(a, 1, axes=_AX),
    "r180": lambda a: np.rot90(a, 2, axes=_AX),
    "r270": lambda a: np.rot90(a, 3, axes=_AX),
    "fliph": lambda a: a[..., :, ::-1],
    "flipv": lambda a: a[..., ::-1, :],
    "transpose": lambda a: np.swapaxes(a, -1, -2),
    "antitranspose": lambda a: np.swapaxes(np.rot90(a, 2, axes=_AX), -1, -2),
}


def apply_view(img: np.ndarray, view: str) -> np.ndarray:
    """Return the named rotation/flip of a square image, (H, W) or (C, H, W) (exact, no interpolation)."""
    if view not in VIEW_OPS:
        raise TprobeError(f"unknown view {view!r}; known views: {', '.join(VIEW_OPS)}")
    return np.ascontiguousarray(VIEW_OPS[view](img))


def read_cell(path: str | Path, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """One cell's (segmentation channel (H, W), model input (H, W) or (C, H, W), raw pixel type), 0..255 scale."""
    if not config.channels:
        if CHANNEL in str(path):
            raise ChannelError(
                f"{path}: is a per-channel template; pass --channels NAME,NAME,... naming its channels"
            )
        img, dtype = read_grey(
            path, max_value=config.max_value, max_pixels=config.max_pixels, z=config.z, t=config.t
        )
        return img, img, dtype
    names = config.channels
    tops = config.max_value if isinstance(config.max_value, tuple) else (config.max_value,) * len(names)
    needed = {*config.used_channels, config.segment}  # a channel nobody reads is not range-checked
    tops = tuple(t if n in needed else None for n, t in zip(names, tops, strict=True))
    stack, dtype = read_channels(
        path, names, max_value=tops, max_pixels=config.max_pixels, z=config.z, t=config.t
    )
    index = {n: i for i, n in enumerate(names)}
    used = stack[[index[n] for n in config.used_channels]]
    return stack[index[config.segment]], used[0] if config.channel_mode == "grey" else used, dtype


def load_canvas(path: str | Path, config: PreprocessConfig) -> np.ndarray:
    """The model's input for one cell on its canvas, before any view: (canvas, canvas) or (C, canvas, canvas), 0..255."""
    return pad_to_canvas(read_cell(path, config)[1], config)


def load_view(path: str | Path, view: str, config: PreprocessConfig) -> np.ndarray:
    """Read, pad and transform one image view: float32 (canvas, canvas) or (C, canvas, canvas) in [0, 1]."""
    return apply_view(load_canvas(path, config), view) / 255.0


def source_bytes(path: str | Path, config: PreprocessConfig) -> bytes:
    """The bytes a cell's ``source_id`` hashes: its file, or its channel files in channel order."""
    path = str(path)
    files = [Path(path.replace(CHANNEL, c)) for c in config.channels] if CHANNEL in path else [Path(path)]
    for file in files:  # never a FIFO (blocks) or a device (/dev/zero never ends)
        check_regular(file)
    return b"".join(file.read_bytes() for file in files)


def preprocess(
    dataset: Dataset,
    config: PreprocessConfig = PreprocessConfig(),
    *,
    progress: bool = False,
    each_file: bool = False,
) -> Preprocessed:
    """Measure and filter every image of ``dataset`` and expand the kept ones into views.

    Images above ``--max-value`` or with pixels of no fixed scale (signed, 32-bit, float) are refused
    together, counted (skipping the bright ones would select cells by brightness); with ``each_file``
    (``predict``, whose scaling is the run's) each is skipped with its line instead. Files of two bit
    depths (8-bit read as they are, 16-bit scaled by ``max_value``) are one line: the two parts would
    be on one scale only by chance.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    rows, skipped, seen = [], list(dataset.skipped), {}
    first = None  # (pixel type, path) of the first cell read: the others must share its bit depth
    above: list[AboveMaxValue] = []  # cells over --max-value: refused together, never skipped one by one
    untyped: list[UnsupportedPixels] = []  # signed/32-bit/float cells: refused together, counted
    wide = [0, 0.0]  # 16-bit cells read, and their brightest pixel on the 8-bit scale
    records = dataset.table.to_dict("records")
    for rec in tqdm(records, desc="preprocess", unit="img", disable=None if progress else True):
        path = rec["path"]
        base = {**rec, "source_id": "", "image_id": "", "group": "", "view": "orig"}
        try:
            img, _, depth = read_cell(path, config)  # first: it checks the file's type and declared size
            raw = source_bytes(path, config)
            ome = (
                _ome_columns(path, config)
                if config.channels or str(path).lower().endswith((".tif", ".tiff"))
                else {}
            )
        except ChannelError:
            raise
        except (AboveMaxValue, UnsupportedPixels) as exc:
            if not each_file:
                (above if isinstance(exc, AboveMaxValue) else untyped).append(exc)
                continue
            skipped.append(Skipped(path, str(exc)))
            rows.append({**base, "kept": False, "drop_reason": "unreadable"})
            continue
        except (OSError, TprobeError) as exc:
            msg = str(exc) if isinstance(exc, TprobeError) else f"{path}: cannot be read ({exc})"
            skipped.append(Skipped(path, msg))
            rows.append({**base, "kept": False, "drop_reason": "unreadable"})
            continue
        first = first or (depth, path)
        if depth == "uint16":
            wide[0], wide[1] = wide[0] + 1, max(wide[1], float(img.max()))
        if first[0] != depth:
            raise ChannelError(
                f"{path}: {bit_depth(depth)} pixels, but {first[1]} is {bit_depth(first[0])}; convert the "
                "dataset to one bit depth (or preprocess the two parts separately)"
            )
        sid = _hash(raw, 16)
        if dataset.layout == "crops" and rec.get("cell_id"):  # a crop of a field: field hash + label
            base["crop_id"], sid = sid, rec["cell_id"]
        base.update(ome, pixel_type=depth)  # the raw bit depth: a run records it, predict checks it
        m = measure(img, config)
        base.update(m, source_id=sid, group=sid, image_id=f"{sid}_orig")
        if sid in seen:
            skipped.append(Skipped(path, f"same content as {seen[sid]}; delete the duplicate"))
            rows.append(
                {**base, "image_id": f"{sid}_dup{len(rows)}", "kept": False, "drop_reason": "duplicate"}
            )
            continue
        seen[sid] = path
        reason = _drop_reason(m, config)
        if reason:
            rows.append({**base, "kept": False, "drop_reason": reason})
            continue
        for view in config.view_names:
            rows.append({**base, "view": view, "image_id": f"{sid}_{view}", "kept": True, "drop_reason": ""})
    if untyped:  # every cell would be "dim" (or worse): refuse, never skip them one by one
        raise TprobeError(
            f"{len(untyped)} of {len(records)} images have pixels tprobe cannot scale, e.g. {untyped[0]}"
        )
    if above:  # skipping them would keep the dim cells and drop the bright ones: a selection by brightness
        top = max(above, key=lambda e: e.value)
        raise TprobeError(
            f"--max-value {top.top:g} is below the data: {len(above)} of {len(records)} images have "
            f"pixels above it ({sum(e.n_pixels for e in above):,} pixels; the brightest, {top.value}, "
            f"in {top.path}{f' channel {top.channel}' if top.channel else ''}); raise --max-value to "
            "the camera's range"
        )
    manifest = pd.DataFrame(rows)
    fingerprint = _fingerprint(manifest)
    return Preprocessed(manifest, config, fingerprint, skipped, warnings=_dark_16bit(config, *wide))


def _dark_16bit(config: PreprocessConfig, n: int, brightest: float) -> list[str]:
    """A warning when no 16-bit cell reaches 1/8 of ``--max-value`` (12-bit data under the default 65535):
    every cell is then scaled dim, and the dim filter drops them without another hint."""
    tops = config.max_value if isinstance(config.max_value, tuple) else (config.max_value,)
    top = tops[config.channels.index(config.segment)] if len(tops) > 1 else tops[0]
    top = 65535.0 if top is None else float(top)
    raw = round(brightest * top / 255.0)  # the raw value: cells are scaled by 255 / top
    if not n or raw >= top / 8:
        return []
    camera = next(2**b - 1 for b in (8, 10, 12, 14, 16) if raw <= 2**b - 1)
    channel = f" (channel {config.segment})" if config.channels else ""
    return [
        f"the brightest pixel of the {n} 16-bit images{channel} is {raw}, under 1/8 of --max-value "
        f"{top:g}: every cell is scaled to under 32 of 255, so the dim filter sees dark cells; give the "
        f"camera's range, e.g. --max-value {camera} ({camera.bit_length()}-bit)"
    ]


def _ome_columns(path: str, config: PreprocessConfig) -> dict:
    """An OME-TIFF's physical pixel size for the manifest; its channel names must be ``config.channels``."""
    if CHANNEL in str(path):
        return {}
    info = ome_info(path)
    if info is None:
        return {}
    if info["channels"] and config.channels and info["channels"] != config.channels:
        raise ChannelError(
            f"{path}: the OME-XML names the channels {','.join(info['channels'])}, but --channels "
            f"is {','.join(config.channels)}; give the file's names (or leave --channels out)"
        )
    return {k: info[k] for k in ("pixel_size_y", "pixel_size_x", "pixel_size_unit")}


def ome_defaults(dataset: Dataset, config: PreprocessConfig) -> PreprocessConfig:
    """``config`` with ``channels`` taken from the first OME-TIFF's channel names when none were given.

    The names of every file are checked against them while preprocessing; a file naming other
    channels is an error naming both.
    """
    if config.channels or config.channel_files:
        return config
    for path in dataset.table["path"]:  # the first TIFF decides: one header read, not one per file
        if Path(str(path)).suffix.lower() in (".tif", ".tiff"):
            try:
                info = ome_info(path)
            except TprobeError:  # unreadable: skipped with its line when preprocessed
                continue
            return replace(config, channels=info["channels"]) if info and info["channels"] else config
    return config


def is_saved(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds a saved :class:`Preprocessed` (what ``tprobe preprocess --out`` writes)."""
    return folder is not None and (Path(folder) / "preprocess.json").is_file()


def _fingerprint(manifest: pd.DataFrame) -> str:
    """A key of the dataset's content: file hashes with their labels and donors, order-free."""
    src = manifest[manifest["view"] == "orig"]
    lines = sorted(
        f"{s},{lab},{d}" for s, lab, d in zip(src["source_id"], src["label"], src["donor"], strict=True)
    )
    if "crop_id" in src.columns:  # crops of fields: their content (margin, outside, the mask) counts too
        lines = sorted([*lines, *(f"crop,{c}" for c in src["crop_id"].fillna("") if c)])
    return _hash("\n".join(lines))


def prepare(
    data=None,
    config: PreprocessConfig | None = None,
    *,
    patch_size: int | None = None,
    canvas_set: bool = False,
    model_name: str = "the store's model",
    progress: bool = True,
) -> Preprocessed:
    """Discover and preprocess ``data``, or open a saved ``tprobe preprocess --out`` folder.

    ``data``: an image folder, a CSV/Parquet manifest, a saved preprocessed folder (verified on
    opening), a :class:`Dataset` (from ``discover``), a :class:`Preprocessed` (returned as it is) or
    ``None`` for the bundled sample. With a model's ``patch_size``, a canvas the user did not set
    (``canvas_set=False``) is first rounded up to the patch size; a saved folder whose canvas does not
    fit the patch size is refused with the fix. Skipped files are listed in :attr:`Preprocessed.skipped`.
    """
    from tprobe.data.dataset import discover
    from tprobe.models.backbones import fit_canvas, round_canvas

    if isinstance(data, Preprocessed):  # prepared already (a notebook's `pre`)
        if config not in (None, PreprocessConfig(), data.config):
            raise TprobeError("data is preprocessed already; drop the preprocessing options (config)")
        return data
    config = config or PreprocessConfig()
    if is_saved(data):
        pre = Preprocessed.load(data)
        if config not in (PreprocessConfig(), pre.config):
            raise TprobeError(
                f"{data}: is a preprocessed folder with its own options; drop the preprocessing "
                "options or pass the image folder as --data"
            )
        if patch_size and pre.config.canvas % patch_size:
            raise TprobeError(
                f"{data}: was preprocessed on a {pre.config.canvas} px canvas, not a multiple of the "
                f"patch size {patch_size} of {model_name}; rerun `tprobe preprocess` with --canvas "
                f"{round_canvas(pre.config.canvas, patch_size)} or pass the image folder as --data"
            )
        return pre
    if patch_size:
        config = fit_canvas(config, patch_size, user_set=canvas_set)
    found = (
        data
        if isinstance(data, Dataset)
        else discover(data, channel_files=config.channel_files, channels=config.channels)
    )
    return preprocess(found, ome_defaults(found, config), progress=progress)  # OME-TIFF names the channels
