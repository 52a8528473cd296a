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
    from tprobe.cache.extract import ExtractResult
    from tprobe.cache.status import StoreStatus
    from tprobe.cache.store import FeatureStore
    from tprobe.cluster.slurm import SlurmOptions
    from tprobe.data.dataset import Dataset
    from tprobe.data.preprocess import PreprocessConfig, Preprocessed
    from tprobe.features.sources import FeatureSet
    from tprobe.models.backbones import Backbone, ModelRef

from tprobe import API
from tprobe.errors import TprobeError

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
    cache: str | Path | None = None,
    fov: str | Path | None = None,
    masks: str | Path | None = None,
    contact_sheet: bool = False,
    progress: bool = True,
    **options,
) -> Preprocessed:
    """Filter, pad and augment cell images into views (Wang et al.'s preprocessing).

    ``data``: an image folder, a CSV/Parquet manifest, a :class:`~tprobe.data.dataset.Dataset`, a
    saved ``tprobe preprocess --out`` folder (verified on opening) or ``None`` for the bundled sample.
    ``config`` (a :class:`~tprobe.data.preprocess.PreprocessConfig`) or keyword ``options`` (its
    fields, e.g. ``views="orig"``) set the preprocessing. With ``model`` (an alias, a folder or a
    :class:`~tprobe.models.backbones.ModelRef`) a canvas left at its default is rounded up to the
    model's patch size. With ``out`` the result is saved there (manifest, counts, config); with
    ``cache`` and no ``out``, in the cache's folder for this data and preprocessing
    (``cache/<dataset>/<preprocess-hash>/``, where ``tprobe preprocess`` saves). ``contact_sheet``
    also draws ``contact_sheet.png`` into that folder.

    Fields of view: ``fov`` (a folder laid out like ``data``, or a CSV/Parquet table
    ``image,mask,label[,donor]``) with ``masks`` (label images; default: beside the fields) cuts each
    labelled object into one crop (the crop options ``margin``, ``outside``, ``min_object_area``,
    ``max_object_area`` are ``options``). The crops are written under ``out/crops/`` (default
    ``out``: ``cache/fov/<key>/``, keyed by the fields' and masks' paths and the options; ``cache``
    defaults to ``cache``); label images without objects are listed in ``.warnings``.

    Returns a :class:`~tprobe.data.preprocess.Preprocessed`: ``.kept`` (the views to embed),
    ``.manifest``, ``.counts()``, ``.skipped`` (files that could not be read, with why) and
    ``.folder`` (where it was saved, if it was).

    Example::

        pre = tprobe.preprocess(views="orig")
        pre.counts()
        crops = tprobe.preprocess(fov="fields/", masks="masks/", margin=4, out="prep/")
    """
    from dataclasses import replace

    from tprobe.cache.keys import DEFAULT_CACHE, fields_dir, prep_dir
    from tprobe.data.preprocess import PreprocessConfig as _Config

    config, canvas_set = _config(config, options)
    ref = _model_ref(model) if model is not None else None
    if fov is None:
        crop = [k for k in _CROP_OPTIONS if getattr(config, k) != getattr(_Config(), k)]
        if masks is not None or crop:
            raise TprobeError(
                "--masks, --margin, --outside, --min-object-area and --max-object-area apply to fields "
                "of view: add --fov FIELDS"
            )
        pre = _prepared(data, config, ref, canvas_set=canvas_set, progress=progress)
        out = out if out is not None or cache is None else prep_dir(cache, pre)
    else:
        from tprobe.data.fov import preprocess_fields

        if data is not None:
            raise TprobeError(
                "--fov and --data are two inputs; give one (fields of view, or single-cell images)"
            )
        config = replace(config, fov=True)
        if ref is not None:
            from tprobe.models.backbones import fit_canvas

            config = fit_canvas(config, ref.patch_size, user_set=canvas_set)
        out = Path(out if out is not None else fields_dir(cache or DEFAULT_CACHE, fov, masks, config))
        pre, warnings = preprocess_fields(fov, masks, config, out / "crops", progress=progress)
        pre.warnings = list(warnings)
    if out is not None:
        pre.save(out)
        if contact_sheet:
            from tprobe.plot.figures import contact_sheet as _sheet

            _sheet(pre.manifest, pre.config, Path(out) / "contact_sheet.png")
    return pre


_CROP_OPTIONS = ("margin", "outside", "min_object_area", "max_object_area")


def _config(config: PreprocessConfig | None, options: dict) -> tuple[PreprocessConfig, bool]:
    """``config`` with ``options`` (its fields) set, and whether the canvas was set by the caller."""
    from dataclasses import replace

    from tprobe.data.preprocess import PreprocessConfig as _Config

    canvas_set = "canvas" in options or (config is not None and config.canvas != _Config().canvas)
    return replace(config or _Config(), **options), canvas_set


def _model_ref(model) -> ModelRef:
    return resolve_model(model, offline=True) if isinstance(model, str | Path) else model


def _prepared(data, config, ref, *, canvas_set: bool, progress: bool) -> Preprocessed:
    """``data`` preprocessed with ``config`` (the canvas fitted to ``ref``'s patch size unless set)."""
    from tprobe.data.dataset import Dataset as _Dataset
    from tprobe.data.preprocess import ome_defaults, prepare
    from tprobe.data.preprocess import preprocess as _preprocess

    patch = ref.patch_size if ref is not None else None
    if isinstance(data, _Dataset):
        if patch:
            from tprobe.models.backbones import fit_canvas

            config = fit_canvas(config, patch, user_set=canvas_set)
        return _preprocess(data, ome_defaults(data, config), progress=progress)
    return prepare(
        data,
        config,
        patch_size=patch,
        canvas_set=canvas_set,
        model_name=ref.name if ref is not None else "the store's model",
        progress=progress,
    )


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
def extract(
    data: str | Path | Dataset | Preprocessed | None = None,
    model: str | Path | ModelRef | Backbone = "dinov2-small-reg",
    *,
    config: PreprocessConfig | None = None,
    cache: str | Path = "cache",
    revision: str | None = None,
    fmt: str = "zarr",
    dtype: str = "float16",
    tokens: str | Sequence[str] = ("cls", "registers", "patches"),
    layers: str | Sequence[int] = "-1",
    patch_layers: str | Sequence[int] = "-1",
    compression: str = "zstd",
    chunk_rows: int = 64,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    loader_workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    workers: int = 1,
    devices: str | Sequence[str] | None = None,
    executor: str = "local",
    shards: int | None = None,
    slurm: SlurmOptions | None = None,
    poll: float = 10.0,
    task_args: Sequence[str] | None = None,
    offline: bool = False,
    progress: bool | None = None,
    **options,
) -> ExtractResult:
    """Run every kept view through a ViT once and store its CLS, register and patch tokens in the cache.

    ``data``: a :class:`~tprobe.data.preprocess.Preprocessed` (used as it is) or anything
    :func:`preprocess` takes, with ``config`` / ``options`` (a canvas left at its default is rounded up
    to the model's patch size). ``model``: an alias (:func:`list_models`), a hub id (``revision``: a
    branch, tag or commit) or a local folder, or a :class:`~tprobe.models.backbones.ModelRef`.

    The store lands under ``cache/<dataset>/<preprocess-hash>/<model>@<revision>/``, keyed by the
    data, preprocessing, row order, model content, ``precision``, ``dtype``, ``tokens`` (any of
    ``cls``, ``registers``, ``patches``) and ``layers`` / ``patch_layers`` (``"-1,-4"``: blocks whose
    CLS + registers / patches are stored). Calling again resumes an interrupted run; a complete store is
    left as it is (``status == "up to date"``).

    How it runs: in this process (``shard=(i, N)`` takes units ``i::N``; ``loader_workers`` decoding
    processes); ``workers=N`` local processes, one device of ``devices`` (``"0,1"``) each; or
    ``executor="slurm"``: one SLURM array job of ``shards`` tasks with ``slurm``
    (:class:`~tprobe.cluster.slurm.SlurmOptions`), watched every ``poll`` seconds. Workers and array
    tasks run ``tprobe extract`` on ``task_args`` (the command's own options, without ``--shard`` and the
    SLURM options), which are required for them.

    Returns an :class:`~tprobe.cache.extract.ExtractResult`: ``.path`` (the store: open it with
    :func:`open_store`), ``.status``, ``.rows``, ``.seconds``, ``.model`` and ``.skipped`` (input files
    that could not be read).

    Example::

        res = tprobe.extract(views="orig", model="path/to/dinov2-small-reg", cache="cache")
        store = tprobe.open_store(res.path)
    """
    from tprobe.cluster.workers import check_executor

    gpus = check_executor(
        executor=executor, workers=workers, devices=devices, shard=shard, shards=shards, cache=cache
    )
    if (workers > 1 or executor == "slurm") and task_args is None:
        raise TprobeError(
            "workers > 1 and executor='slurm' run `tprobe extract` processes: pass task_args, the "
            "command's options (e.g. ['--model', 'dinov2-small-reg', '--data', 'imgs/'])"
        )
    from tprobe.data.preprocess import Preprocessed as _Preprocessed

    model = resolve_model(model, revision, offline=offline) if isinstance(model, str | Path) else model
    ref = getattr(model, "ref", model)  # a loaded Backbone runs as it is, in this process
    if isinstance(data, _Preprocessed):
        if config is not None or options:
            raise TprobeError("data is preprocessed already; drop config and the preprocessing options")
        pre = data
    else:
        config, canvas_set = _config(config, options)
        pre = _prepared(data, config, ref, canvas_set=canvas_set, progress=False)
    names = (
        tuple(t.strip() for t in tokens.split(",") if t.strip()) if isinstance(tokens, str) else tuple(tokens)
    )
    common = dict(
        cache=cache,
        fmt=fmt,
        dtype=dtype,
        precision=precision,
        tokens=names,
        layers=layers,
        patch_layers=patch_layers,
    )
    if executor == "slurm":
        from tprobe.cluster.slurm import extract_slurm

        res = extract_slurm(
            pre,
            ref,
            args=task_args,
            shards=shards,
            options=slurm,
            chunk_rows=chunk_rows,
            poll=poll,
            **common,
        )
    elif workers > 1:
        from tprobe.cluster.workers import extract_workers

        res = extract_workers(
            pre,
            ref,
            workers=workers,
            devices=gpus,
            args=task_args,
            device=device,
            **common,
        )
    else:
        from tprobe.cache.extract import extract as _extract

        res = _extract(
            pre,
            model,
            batch_size=batch_size,
            chunk_rows=chunk_rows,
            device=device,
            compile=compile,
            workers=loader_workers,
            shard=tuple(shard),
            offline=offline,
            progress=progress,
            compression=compression,
            **common,
        )
    res.skipped = list(pre.skipped)
    return res


def status(store: str | Path, *, shards: int = 1, deep: bool = False) -> StoreStatus:
    """How far a store's extraction got and whether it is whole: units done / pending (per shard of
    ``shards`` workers), seal state, key attributes, row and chunk checks.

    Read-only, so it is what to watch while workers run. ``deep`` re-reads every unit and compares it
    with the hash recorded when it was written (default: every chunk exists with its recorded size).
    Returns a :class:`~tprobe.cache.status.StoreStatus` (``.ok`` is False when a chunk is missing,
    truncated or altered; ``.lines()``, ``.to_dict()``).

    Example::

        st = tprobe.status("cache/.../float16-fp32-1a2b3c4d.zarr", shards=8)
        print("\\n".join(st.lines()))
    """
    from tprobe.cache.status import store_status

    return store_status(store, shards=shards, deep=deep)


def export(store: str | Path, to: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export a store's manifest and pooled features (``cls``, ``mean``, ``registers``, ``cls+mean``; per
    layer for a store of several layers) for other tools; returns the written file.

    ``to``: ``anndata`` (an ``.h5ad``: ``obs`` = the manifest, ``obsm["X_<pool>"]``, provenance in
    ``uns["tprobe"]``) or ``parquet`` (one fixed-size list column per pooling, provenance in the schema
    metadata). An existing ``out`` is replaced only with ``overwrite``; never the store or its manifest.

    Example::

        tprobe.export(res.path, "anndata", "cells.h5ad")
    """
    from tprobe.cache.export import export as _export

    return _export(store, to, out, overwrite=overwrite)


# ---- probing: probe, predict ----------------------------------------------------------------------


# ---- science and runs: curve, map, report ---------------------------------------------------------


# ---- training: finetune, baseline, saliency -------------------------------------------------------
