"""Wang et al. preprocessing: measure, filter, pad to a square canvas, and expand into views.

Every number is a field of :class:`PreprocessConfig`. The result is a manifest with one row per
image *view* (kept images) or one row per dropped image, and a config hash that later stages use
as a cache key.

Measurements are taken on the unpadded original, on the 8-bit intensity scale
(see :mod:`tprobe.images`):

- ``entropy``: Shannon entropy (bits) of the 256-bin intensity histogram;
- ``total_intensity``: the summed raw intensity;
- ``n_components``: connected components (4-connectivity) of ``pixel > binary_threshold``
  with at least ``min_component_area`` pixels.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.measure import label as label_components
from skimage.transform import resize

from tprobe.dataset import Dataset, Skipped
from tprobe.errors import TprobeError
from tprobe.images import read_image

__all__ = [
    "PreprocessConfig", "Preprocessed", "preprocess", "load_view", "apply_view", "pad_to_canvas",
    "measure", "VIEW_SETS", "PREPROCESS_VERSION", "is_saved",
]  # fmt: skip

PREPROCESS_VERSION = 1  # bump when the algorithm changes, so old caches are not reused
VIEW_SETS = {
    "six": ("orig", "r90", "r180", "r270", "fliph", "flipv"),
    "dihedral8": ("orig", "r90", "r180", "r270", "fliph", "flipv", "transpose", "antitranspose"),
    "orig": ("orig",),
}
FIT_MODES = ("pad", "resize", "fill")
DROP_ORDER = ("unreadable", "duplicate", "dim", "multi_cell", "too_large")


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
    max_value: float | None = None

    def __post_init__(self):
        if self.fit not in FIT_MODES:
            raise TprobeError(f"fit={self.fit!r} is not one of {', '.join(FIT_MODES)}")
        if self.views not in VIEW_SETS:
            raise TprobeError(f"views={self.views!r} is not one of {', '.join(VIEW_SETS)}")
        if self.canvas < 1:
            raise TprobeError(f"canvas={self.canvas} must be a positive number of pixels")
        if self.min_component_area < 1 or self.max_components < 1:
            raise TprobeError("min_component_area and max_components must be >= 1")

    @property
    def view_names(self) -> tuple[str, ...]:
        return VIEW_SETS[self.views]

    def to_dict(self) -> dict:
        return {**asdict(self), "version": PREPROCESS_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """The inverse of :meth:`to_dict`; a record from another preprocessing version is refused."""
        if d.get("version", PREPROCESS_VERSION) != PREPROCESS_VERSION:
            raise TprobeError(f"preprocessing version {d.get('version')} was recorded; this tprobe runs version "
                              f"{PREPROCESS_VERSION}: preprocess and extract again")  # fmt: skip
        return cls(**{k: v for k, v in d.items() if k != "version"})

    @property
    def hash(self) -> str:
        return _hash(json.dumps(self.to_dict(), sort_keys=True))


@dataclass
class Preprocessed:
    """The manifest (one row per view, or per dropped image), its keys and the skipped files."""

    manifest: pd.DataFrame
    config: PreprocessConfig
    fingerprint: str
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def kept(self) -> pd.DataFrame:
        return self.manifest[self.manifest["kept"]].reset_index(drop=True)

    def counts(self) -> pd.DataFrame:
        """Per donor x class: images found, dropped by each filter, kept, and views."""
        src = self.manifest[self.manifest["view"] == "orig"]
        src = src.assign(cls=np.where(src["label"] == 1, "activated", "quiescent"))
        table = src.groupby(["donor", "cls"]).size().rename("found").to_frame()
        for reason in DROP_ORDER:
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
        meta = {"artifact": "tprobe.Preprocessed", "config": self.config.to_dict(),
                "preprocess_hash": self.config.hash, "dataset_fingerprint": self.fingerprint,
                "n_rows": len(self.manifest), "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped]}  # fmt: skip
        (out / "preprocess.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path, *, verify_files: bool = True) -> Preprocessed:
        """Open a saved artifact and verify it: the manifest's fingerprint and the config's hash must be
        the recorded ones and (``verify_files``) every kept source file must still hash to its ``source_id``.
        """
        folder = Path(folder)
        try:
            meta = json.loads((folder / "preprocess.json").read_text())
            manifest = pd.read_parquet(folder / "manifest.parquet")
        except FileNotFoundError as exc:
            raise TprobeError(f"{folder}: not a preprocessed folder ({Path(exc.filename).name} missing); "
                              "run `tprobe preprocess --out` first") from None  # fmt: skip
        except (ValueError, OSError) as exc:
            raise TprobeError(f"{folder}: preprocess.json or manifest.parquet is unreadable ({type(exc).__name__}); "
                              "run `tprobe preprocess` again") from None  # fmt: skip
        config = PreprocessConfig.from_dict(meta["config"])
        fingerprint = _fingerprint(manifest)
        if config.hash != meta.get("preprocess_hash") or fingerprint != meta.get("dataset_fingerprint") \
                or len(manifest) != meta.get("n_rows"):  # fmt: skip
            raise TprobeError(f"{folder}: manifest.parquet does not match preprocess.json (edited or mixed up); "
                              "run `tprobe preprocess` again")  # fmt: skip
        if verify_files:
            src = manifest[manifest["kept"] & (manifest["view"] == "orig")]
            for path, sid in zip(src["path"], src["source_id"], strict=True):
                try:
                    same = _hash(Path(path).read_bytes(), 16) == sid
                except OSError:
                    same = False
                if not same:
                    raise TprobeError(f"{path}: changed or missing since {folder} was preprocessed; "
                                      "run `tprobe preprocess` again")  # fmt: skip
        skipped = [Skipped(s["path"], s["reason"]) for s in meta.get("skipped", []) if isinstance(s, dict)]
        return cls(manifest, config, fingerprint, skipped)


def _hash(text: str | bytes, n: int = 12) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:n]


def measure(img: np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> dict:
    """Entropy (bits), total intensity and component count of one unpadded image."""
    hist = np.bincount(np.clip(img, 0, 255).astype(np.uint8).ravel(), minlength=256)
    p = hist[hist > 0] / img.size
    entropy = float(-(p * np.log2(p)).sum())
    labels = label_components(img > config.binary_threshold, connectivity=1)
    areas = np.bincount(labels.ravel())[1:]
    return {
        "height": int(img.shape[0]),
        "width": int(img.shape[1]),
        "entropy": entropy,
        "total_intensity": float(img.sum()),
        "n_components": int((areas >= config.min_component_area).sum()),
    }


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
    """Scale (per ``config.fit``) and zero-pad ``img`` centred on a ``canvas`` x ``canvas`` square."""
    c = config.canvas
    h, w = img.shape
    scale = c / max(h, w)
    if (config.fit == "resize" and scale < 1) or config.fit == "fill":
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
        img = resize(img, shape, order=1, preserve_range=True, anti_aliasing=scale < 1)
        h, w = img.shape
    if h > c or w > c:
        raise TprobeError(f"image of {h}x{w} px does not fit the {c} px canvas; use --fit resize")
    out = np.zeros((c, c), dtype=np.float32)
    top, left = (c - h) // 2, (c - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def apply_view(img: np.ndarray, view: str) -> np.ndarray:
    """Return the named rotation/flip of a square image (exact, no interpolation)."""
    ops = {
        "orig": lambda a: a,
        "r90": lambda a: np.rot90(a, 1),
        "r180": lambda a: np.rot90(a, 2),
        "r270": lambda a: np.rot90(a, 3),
        "fliph": lambda a: a[:, ::-1],
        "flipv": lambda a: a[::-1, :],
        "transpose": lambda a: a.T,
        "antitranspose": lambda a: np.rot90(a, 2).T,
    }
    if view not in ops:
        raise TprobeError(f"unknown view {view!r}; known views: {', '.join(ops)}")
    return np.ascontiguousarray(ops[view](img))


def load_view(path: str | Path, view: str, config: PreprocessConfig) -> np.ndarray:
    """Read, pad and transform one image view: float32 (canvas, canvas) in [0, 1]."""
    img = read_image(path, max_value=config.max_value)
    return apply_view(pad_to_canvas(img, config), view) / 255.0


def preprocess(
    dataset: Dataset, config: PreprocessConfig = PreprocessConfig(), *, progress: bool = False
) -> Preprocessed:
    """Measure and filter every image of ``dataset`` and expand the kept ones into views."""
    from tqdm.auto import tqdm

    rows, skipped, seen = [], list(dataset.skipped), {}
    records = dataset.table.to_dict("records")
    for rec in tqdm(records, desc="preprocess", unit="img", disable=None if progress else True):
        path = rec["path"]
        base = {**rec, "source_id": "", "image_id": "", "group": "", "view": "orig"}
        try:
            raw = Path(path).read_bytes()
            img = read_image(path, max_value=config.max_value)
        except (OSError, TprobeError) as exc:
            msg = str(exc) if isinstance(exc, TprobeError) else f"{path}: cannot be read ({exc})"
            skipped.append(Skipped(path, msg))
            rows.append({**base, "kept": False, "drop_reason": "unreadable"})
            continue
        sid = _hash(raw, 16)
        m = measure(img, config)
        base.update(m, source_id=sid, group=sid, image_id=f"{sid}_orig")
        if sid in seen:
            skipped.append(Skipped(path, f"same content as {seen[sid]}; delete the duplicate"))
            rows.append({**base, "image_id": f"{sid}_dup{len(rows)}", "kept": False,
                         "drop_reason": "duplicate"})  # fmt: skip
            continue
        seen[sid] = path
        reason = _drop_reason(m, config)
        if reason:
            rows.append({**base, "kept": False, "drop_reason": reason})
            continue
        for view in config.view_names:
            rows.append({**base, "view": view, "image_id": f"{sid}_{view}", "kept": True,
                         "drop_reason": ""})  # fmt: skip
    manifest = pd.DataFrame(rows)
    fingerprint = _fingerprint(manifest)
    return Preprocessed(manifest, config, fingerprint, skipped)


def is_saved(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds a saved :class:`Preprocessed` (what ``tprobe preprocess --out`` writes)."""
    return folder is not None and (Path(folder) / "preprocess.json").is_file()


def _fingerprint(manifest: pd.DataFrame) -> str:
    """A key of the dataset's content: file hashes with their labels and donors, order-free."""
    src = manifest[manifest["view"] == "orig"]
    lines = sorted(
        f"{s},{lab},{d}" for s, lab, d in zip(src["source_id"], src["label"], src["donor"], strict=True)
    )
    return _hash("\n".join(lines))
