"""The public Python API: one call per stage, each returning a typed artifact.

Every function is re-exported at the top level (``tprobe.extract(...)``); the ``tprobe`` command line
is a thin shell over these calls, and the tutorial notebook (``docs/tutorial.ipynb``) drives them on
the bundled sample. Stage modules are imported inside the functions, so ``import tprobe`` stays light
(no torch, no transformers) until a call needs them.

A session on the bundled sample, with a local model folder::

    import tprobe

    pre = tprobe.preprocess()                                  # discover + filter + views
    res = tprobe.extract(pre, model="path/to/dinov2-small-reg")  # -> ExtractResult (res.path: the store)
    run = tprobe.probe(tprobe.open_store(res.path), pool="cls", head="logreg")
    run.save("runs")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the typed artifacts the calls return
    from tprobe.cache.store import FeatureStore
    from tprobe.data.dataset import Dataset
    from tprobe.data.preprocess import PreprocessConfig, Preprocessed
    from tprobe.features.sources import FeatureSet
    from tprobe.models.backbones import ModelRef

from tprobe import API

__all__ = list(API)  # the names, in the order the docs list them: tprobe.API


# ---- data ---------------------------------------------------------------------------------------
def discover(
    data: str | Path | None = None, *, channel_files: str | None = None, channels: Sequence[str] = ()
) -> Dataset:
    """Find the labelled images under ``data`` (a folder or a CSV/Parquet table; ``None``: the sample).

    Returns a :class:`~tprobe.data.dataset.Dataset`: one row per cell image with its label, donor and
    batch. ``channel_files`` (a stem pattern such as ``{cell}_{channel}``) with ``channels`` groups
    one-file-per-channel images into one row per cell.

    Example::

        ds = tprobe.discover("my_plate/")
        ds.table.groupby(["donor", "label"]).size()
    """
    from tprobe.data.dataset import discover as _discover

    return _discover(data, channel_files=channel_files, channels=tuple(channels))


def preprocess(
    data: str | Path | Dataset | None = None,
    config: PreprocessConfig | None = None,
    *,
    model: str | ModelRef | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    **options,
) -> Preprocessed:
    """Filter, pad and augment cell images into views (Wang et al.'s preprocessing).

    ``data``: an image folder, a CSV/Parquet manifest, a :class:`~tprobe.data.dataset.Dataset`, a
    saved ``tprobe preprocess --out`` folder (verified on opening) or ``None`` for the bundled sample.
    ``config`` (a :class:`~tprobe.data.preprocess.PreprocessConfig`) or keyword ``options`` (its
    fields, e.g. ``views="orig"``) set the preprocessing. With ``model`` (an alias, a folder or a
    :class:`~tprobe.models.backbones.ModelRef`) a canvas left at its default is rounded up to the
    model's patch size. With ``out`` the result is saved there (manifest, counts, config).

    Returns a :class:`~tprobe.data.preprocess.Preprocessed`: ``.kept`` (the views to embed),
    ``.manifest``, ``.counts()`` and ``.skipped`` (files that could not be read, with why).

    Example::

        pre = tprobe.preprocess(views="orig")
        pre.counts()
    """
    from dataclasses import replace

    from tprobe.data.dataset import Dataset as _Dataset
    from tprobe.data.preprocess import PreprocessConfig as _Config
    from tprobe.data.preprocess import ome_defaults, prepare
    from tprobe.data.preprocess import preprocess as _preprocess

    canvas_set = "canvas" in options or (config is not None and config.canvas != _Config().canvas)
    config = replace(config or _Config(), **options)
    patch = None
    if model is not None:
        ref = resolve_model(model, offline=True) if isinstance(model, str | Path) else model
        patch = ref.patch_size
    if isinstance(data, _Dataset):
        if patch:
            from tprobe.models.backbones import fit_canvas

            config = fit_canvas(config, patch, user_set=canvas_set)
        pre = _preprocess(data, ome_defaults(data, config), progress=progress)
    else:
        pre = prepare(data, config, patch_size=patch, canvas_set=canvas_set, progress=progress)
    if out is not None:
        pre.save(out)
    return pre


# ---- models -------------------------------------------------------------------------------------
def list_models() -> dict[str, str]:
    """The model aliases tprobe knows and the Hugging Face ids they stand for.

    Any other hub id (``owner/name``) or a local ``save_pretrained()`` folder of a ViT whose
    ``last_hidden_state`` is CLS + registers + a patch grid works too.
    """
    from tprobe.models.backbones import ALIASES

    return dict(ALIASES)


def resolve_model(model: str | Path, revision: str | None = None, *, offline: bool = False) -> ModelRef:
    """Resolve an alias, hub id or local folder to a :class:`~tprobe.models.backbones.ModelRef`.

    Reads only the model's config (and, for a hub id, resolves ``revision`` to a commit, so a store
    is keyed by the exact snapshot). ``offline`` never contacts the hub.
    """
    from tprobe.models.backbones import resolve_model as _resolve

    return _resolve(str(model), revision, offline=offline)


# ---- cache --------------------------------------------------------------------------------------
def open_store(path: str | Path, *, check: bool = True) -> FeatureStore:
    """Open a complete feature store (Zarr or HDF5) written by :func:`extract`.

    Every chunk the store recorded must exist with its recorded size (``check``), else one line names
    the fix. Read tokens with ``store.pooled(pool)`` or ``store.read(...)``; its key attributes
    (model, snapshot, preprocessing, rows) are in ``store.attrs``.
    """
    from tprobe.cache.store import FeatureStore as _Store

    return _Store.open(path, check=check)


# ---- features -----------------------------------------------------------------------------------
def feature_sets(
    *,
    stores: Sequence[str | Path] = (),
    models: Sequence[str] = (),
    pool: str = "cls",
    tables: Sequence[str | Path] = (),
    pixels: bool = False,
    data: str | Path | None = None,
    config: PreprocessConfig | None = None,
    cache: str | Path = "cache",
    offline: bool = False,
    **table_options,
) -> list[FeatureSet]:
    """Feature sets to compare on the same cells: stores, models' cached stores, tables, raw pixels.

    Each store named is checked against ``data`` when given; each model's store is found in
    ``cache``; ``tables`` are CSV/Parquet feature tables joined to the images (``table_options``:
    ``id_column``, ``exclude``, ``keep_columns``, ``all_table_rows``; identifier and position columns
    are dropped). Returns :class:`~tprobe.features.sources.FeatureSet` objects (``X``, ``meta``,
    ``source``) that :func:`probe`, :func:`curve` and :func:`map` take.

    Example::

        sets = tprobe.feature_sets(stores=[store_path], tables=["cellprofiler.csv"], pixels=True)
    """
    from tprobe.features.assemble import feature_sets as _feature_sets

    return _feature_sets(
        stores=stores,
        models=models,
        pool=pool,
        tables=tables,
        pixels=pixels,
        data=data,
        config=config,
        cache=cache,
        offline=offline,
        **table_options,
    )


# ---- cache: extract, status, export ---------------------------------------------------------------


# ---- probing: probe, predict ----------------------------------------------------------------------


# ---- science and runs: curve, map, report ---------------------------------------------------------


# ---- training: finetune, baseline, saliency -------------------------------------------------------
