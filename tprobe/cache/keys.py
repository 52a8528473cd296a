"""Where the cache puts things and what keys them: store folders and names, progress folders, manifests.

Torch-free, so ``tprobe status``, ``export``, ``report`` and the SLURM watcher can name a store's files
without loading a model. The layout::

    cache/<dataset-fingerprint>/<preprocess-hash>/                  preprocessed views (manifest.parquet, ...)
    cache/<dataset-fingerprint>/<preprocess-hash>/<model>@<commit>/ stores of that model:
        <dtype>-<precision>-<rows-hash>[-<tokens>][-n<norm>][-L<layers>][-P<patch layers>].zarr|.h5
        <store>.manifest.parquet                                  the store's rows, in order
        <store>.progress/                                         while the store is being written
    cache/fov/<key>/                                              crops of fields of view (preprocess --fov)

A store is complete (sealed) when it exists and its progress folder does not (:func:`is_sealed`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tprobe.errors import TprobeError
from tprobe.models.tokens import TOKENS

if TYPE_CHECKING:
    from tprobe.data.preprocess import PreprocessConfig, Preprocessed
    from tprobe.models.backbones import ModelRef

__all__ = [
    "DEFAULT_CACHE",
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "FORMATS",
    "DTYPES",
    "PRECISIONS",
    "PROGRESS_SUFFIX",
    "progress_dir",
    "is_sealed",
    "manifest_path",
    "rows_hash",
    "prep_dir",
    "fields_dir",
    "store_dir",
    "store_name",
    "store_path",
    "find_store",
]

COMPRESSIONS = ("lz4", "zstd", "none")
# what `tprobe export --to` writes (here, not in export.py, so the CLI builds its options without pandas)
EXPORT_FORMATS = ("anndata", "parquet")
# Blosc level 3 with byte shuffle; lz4 by default: ~3.5x zstd's speed for ~8% more bytes on float16 tokens
# (scripts/bench_codecs.py). Stores without the attribute were written with zstd.
DEFAULT_COMPRESSION = "lz4"

DEFAULT_CACHE = Path("cache")
FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}  # --format -> the store's suffix
DTYPES = ("float16", "float32")  # storage dtype of the tokens
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # compute precision (auto: fp16 on CUDA, fp32 elsewhere)
PROGRESS_SUFFIX = ".progress"


def progress_dir(store: str | Path) -> Path:
    """``<store>.progress``: the folder of a store being written (meta, locks, one marker per unit)."""
    store = Path(store)
    return store.with_name(store.name + PROGRESS_SUFFIX)


def is_sealed(store: str | Path) -> bool:
    """Whether the store exists and is complete (no progress folder beside it)."""
    return Path(store).exists() and not progress_dir(store).exists()


def manifest_path(store: str | Path) -> Path:
    """The store's own manifest (its rows, in order), written beside it before its first row."""
    store = Path(store)
    return store.with_name(store.name + ".manifest.parquet")


def rows_hash(row_ids: Sequence[str]) -> str:
    """Hash of the ordered row ids: equal only for the same images in the same order."""
    return hashlib.sha256("\n".join(map(str, row_ids)).encode()).hexdigest()[:16]


def prep_dir(cache: str | Path, pre: Preprocessed) -> Path:
    """``cache/<dataset-fingerprint>/<preprocess-hash>``: where ``tprobe preprocess`` saves by default."""
    return Path(cache) / pre.fingerprint / pre.config.hash


def fields_dir(
    cache: str | Path, fov: str | Path, masks: str | Path | None, config: PreprocessConfig
) -> Path:
    """``cache/fov/<key>``: the default folder of fields' crops, keyed by the fields' and masks' paths and
    the preprocessing (crop options included)."""
    key = f"{Path(fov).resolve()}|{Path(masks or fov).resolve()}|{config.hash}"
    return Path(cache) / "fov" / hashlib.sha256(key.encode()).hexdigest()[:12]


def store_dir(cache: str | Path, pre: Preprocessed, ref: ModelRef) -> Path:
    """``cache/<dataset-fingerprint>/<preprocess-hash>/<model-slug>@<resolved-revision>``."""
    return prep_dir(cache, pre) / ref.slug


def store_name(
    pre: Preprocessed,
    *,
    dtype: str = "float16",
    precision: str = "fp32",
    fmt: str = "zarr",
    tokens=TOKENS,
    norm: tuple | None = None,
    layers=(-1,),
    patch_layers=(-1,),
) -> str:
    """``<dtype>-<precision>-<rows-hash>[-<tokens>][-n<norm>][-L<layers>][-P<patch layers>].zarr|.h5``: all that
    keys a store beyond its folder.

    ``layers`` / ``patch_layers`` (negative indices, :func:`~tprobe.models.backbones.parse_layers`) add
    ``-L-7_-4_-1`` / ``-P-4_-1`` unless they are ``(-1,)``: a store of the last block keeps today's name.

    ``norm`` (the model's input mean, std) adds ``-n<hash>`` unless it is ImageNet's
    (:func:`~tprobe.models.backbones.normalisation_tag`); the rest of what changes pixel values (canvas,
    resize, channel mapping) is in the preprocessing hash of the folder.
    """
    if fmt not in FORMATS:
        raise TprobeError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    part = "" if set(tokens) == set(TOKENS) else "-" + "+".join(t for t in TOKENS if t in tokens)
    if norm:
        from tprobe.models.backbones import normalisation_tag

        part += normalisation_tag(*norm)
    part += "" if tuple(layers) == (-1,) else "-L" + "_".join(map(str, layers))
    part += (
        ""
        if tuple(patch_layers) == (-1,) or "patches" not in tokens
        else "-P" + "_".join(map(str, patch_layers))
    )
    return f"{dtype}-{precision}-{rows_hash(pre.kept['image_id'])[:8]}{part}{FORMATS[fmt]}"


def store_path(
    cache,
    pre: Preprocessed,
    ref: ModelRef,
    dtype="float16",
    fmt="zarr",
    precision="fp32",
    tokens=TOKENS,
    norm: tuple | None = None,
    layers=(-1,),
    patch_layers=(-1,),
) -> Path:
    """The store's path; ``norm`` defaults to the normalisation ``ref``'s files give (read offline);
    ``layers`` / ``patch_layers`` as given to ``--layers`` (text or ints, checked against the model)."""
    from tprobe.models.backbones import normalisation, parse_layers

    norm = norm or normalisation(ref, offline=True)
    layers = parse_layers(layers, ref.num_layers)
    patch_layers = parse_layers(patch_layers, ref.num_layers, "--patch-layers")
    return store_dir(cache, pre, ref) / store_name(
        pre,
        dtype=dtype,
        precision=precision,
        fmt=fmt,
        tokens=tokens,
        norm=norm,
        layers=layers,
        patch_layers=patch_layers,
    )


def find_store(
    cache, pre: Preprocessed, ref: ModelRef, dtype=None, fmt=None, precision=None, layered: bool = False
) -> Path:
    """The complete store for this data, preprocessing, row order and model; error naming the fix if none.

    ``layered``: first the most recently written complete store of several layers (``--layers``), if any."""
    from tprobe.models.backbones import normalisation

    norm = normalisation(ref, offline=True)
    if layered:
        rows = rows_hash(pre.kept["image_id"])[:8]
        found = sorted(
            (
                p
                for p in store_dir(cache, pre, ref).glob(f"*-{rows}*-L*")
                if p.suffix in FORMATS.values() and is_sealed(p)
            ),
            key=lambda p: p.stat().st_mtime,
        )
        if found:
            return found[-1]
    candidates = [
        store_path(cache, pre, ref, d, f, p, norm=norm)
        for d in ([dtype] if dtype else list(DTYPES))
        for p in ([precision] if precision else ["fp32", "bf16", "fp16"])
        for f in ([fmt] if fmt else list(FORMATS))
    ]
    for path in candidates:
        if is_sealed(path):
            return path
    raise TprobeError(
        f"no complete feature store for model {ref.name!r} on this data and preprocessing under "
        f"{store_dir(cache, pre, ref)}; run `tprobe extract --model {ref.name}` with the same --data and "
        "preprocessing options first"
    )
