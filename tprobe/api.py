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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the typed artifacts the calls return
    import pandas as pd

    from tprobe.cache.extract import ExtractResult
    from tprobe.cache.status import StoreStatus
    from tprobe.cache.store import FeatureStore
    from tprobe.cluster.slurm import SlurmOptions
    from tprobe.data.dataset import Dataset
    from tprobe.data.preprocess import PreprocessConfig, Preprocessed
    from tprobe.features.sources import FeatureSet
    from tprobe.models.backbones import Backbone, ModelRef
    from tprobe.probing.run import ProbeRun
    from tprobe.probing.sweep import SweepEvent, SweepResult
    from tprobe.runs.report import Report
    from tprobe.science.curve import LabelCurve
    from tprobe.science.embedmap import EmbeddingMap

from tprobe.cache.keys import DEFAULT_COMPRESSION
from tprobe.errors import TprobeError

__all__ = [  # one call per stage, in the pipeline's order (the docs list them so)
    "discover",
    "preprocess",
    "list_models",
    "resolve_model",
    "extract",
    "open_store",
    "status",
    "export",
    "feature_sets",
    "probe",
    "predict",
    "curve",
    "map",
    "report",
    "finetune",
    "baseline",
    "saliency",
]


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


def _prepared(
    data,
    config,
    ref=None,
    *,
    canvas_set: bool | None,
    progress: bool = False,
    log_skipped: bool = False,
    log_warnings: bool = False,
) -> Preprocessed:
    """``data`` through :func:`~tprobe.data.preprocess.prepare` with ``config`` (the canvas fitted to
    ``ref``'s patch size unless set; ``canvas_set=None``: set when it is not the default); its skipped
    files (``log_skipped``) and its warnings (``log_skipped`` or ``log_warnings``) logged."""
    import logging

    from tprobe.data.preprocess import PreprocessConfig as _Config
    from tprobe.data.preprocess import prepare

    if canvas_set is None:
        canvas_set = config is not None and config.canvas != _Config().canvas
    pre = prepare(
        data,
        config,
        patch_size=ref.patch_size if ref is not None else None,
        canvas_set=canvas_set,
        model_name=ref.name if ref is not None else "the store's model",
        progress=progress,
    )
    if log_skipped or log_warnings:
        for line in pre.warnings:  # e.g. 16-bit data far below --max-value
            logging.getLogger(__name__).warning("warning: %s", line)
    if log_skipped:
        for s in pre.skipped:
            logging.getLogger(__name__).warning("skipped: %s", s)
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
    revision: str | None = None,
    pool: str = "cls",
    tables: Sequence[str | Path] = (),
    pixels: bool = False,
    data: str | Path | Preprocessed | None = None,
    config: PreprocessConfig | None = None,
    cache: str | Path = "cache",
    offline: bool = False,
    **table_options,
) -> list[FeatureSet]:
    """Feature sets to compare on the same cells: stores, models' cached stores, tables, raw pixels.

    Each store named is checked against ``data`` (a path, or the Preprocessed the store was extracted
    from) when given; each model's store is found in ``cache`` for ``data`` preprocessed with
    ``config`` (a canvas set in ``config`` is kept, a default one rounded to the model's patch size); ``tables`` are CSV/Parquet feature tables joined to the images (``table_options``:
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
        revision=revision,
        pool=pool,
        tables=tables,
        pixels=pixels,
        data=data,
        config=config,
        canvas_set=_config(config, {})[1],
        cache=cache,
        offline=offline,
        **table_options,
    )


# ---- cache: extract, status, export ---------------------------------------------------------------
def extract(
    data: str | Path | Dataset | Preprocessed | None = None,
    model: str | Path | ModelRef | Backbone | Sequence[str | Path | ModelRef | Backbone] = "dinov2-small-reg",
    *,
    config: PreprocessConfig | None = None,
    cache: str | Path = "cache",
    revision: str | None = None,
    fmt: str = "zarr",
    dtype: str = "float16",
    tokens: str | Sequence[str] = ("cls", "registers", "patches"),
    layers: str | Sequence[int] = "-1",
    patch_layers: str | Sequence[int] = "-1",
    compression: str = DEFAULT_COMPRESSION,
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
) -> ExtractResult | list[ExtractResult]:
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

    Several models (a list, or a family alias such as ``"dinov2-all"``) run in one pass per patch size
    (:func:`~tprobe.cache.extract.extract_many`): each view is read and decoded once and fed to every
    model, and each model gets its own store, the same bytes under the same key as its own extract.
    That returns a list of :class:`~tprobe.cache.extract.ExtractResult`, one per model in the order
    given; it runs in this process (no ``workers``, ``devices``, ``executor="slurm"``, ``shards`` or
    ``revision``).

    Example::

        res = tprobe.extract(views="orig", model="path/to/dinov2-small-reg", cache="cache")
        store = tprobe.open_store(res.path)
        small, base = tprobe.extract(views="orig", model=["path/to/small", "path/to/base"])
    """
    from tprobe.cluster.workers import check_executor

    gpus = check_executor(
        executor=executor, workers=workers, devices=devices, shard=shard, shards=shards, cache=cache
    )
    models = _model_list(model)
    if len(models) > 1 and (workers > 1 or executor != "local" or revision is not None):
        raise TprobeError(
            "several models run in one local pass: workers, devices, executor='slurm', shards and "
            "revision are for one model; extract that model on its own"
        )
    if (workers > 1 or executor == "slurm") and task_args is None:
        raise TprobeError(
            "workers > 1 and executor='slurm' run `tprobe extract` processes: pass task_args, the "
            "command's options (e.g. ['--model', 'dinov2-small-reg', '--data', 'imgs/'])"
        )
    if workers > 1 or executor == "slurm":  # the processes run task_args: no argument here may differ
        _check_task_args(
            task_args,
            batch_size=batch_size,
            compression=compression,
            loader_workers=loader_workers,
            chunk_rows=chunk_rows,
            dtype=dtype,
            fmt=fmt,
            compile=compile,
        )
    from tprobe.data.preprocess import Preprocessed as _Preprocessed

    if isinstance(data, _Preprocessed):
        if config is not None or options:
            raise TprobeError("data is preprocessed already; drop config and the preprocessing options")
        canvas_set = None  # used as it is
    else:
        config, canvas_set = _config(config, options)
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
    in_process = dict(  # the arguments of an extract in this process (one model or several)
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
    if len(models) > 1:
        from tprobe.cache.extract import extract_many, group_by_patch

        refs = [resolve_model(m, offline=offline) if isinstance(m, str | Path) else m for m in models]
        done = {}
        for group in group_by_patch(refs):  # one canvas, so one pass, per patch size
            pre = _prepared(
                data, config, getattr(group[0], "ref", group[0]), canvas_set=canvas_set, log_warnings=True
            )
            results = extract_many(pre, group, **in_process)
            for m, res in zip(group, results, strict=True):
                res.skipped = list(pre.skipped)
                done[id(m)] = res
        return [done[id(m)] for m in refs]
    model = (
        resolve_model(models[0], revision, offline=offline)
        if isinstance(models[0], str | Path)
        else models[0]
    )
    ref = getattr(model, "ref", model)  # a loaded Backbone runs as it is, in this process
    pre = _prepared(data, config, ref, canvas_set=canvas_set, progress=False, log_warnings=True)
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

        res = _extract(pre, model, **in_process)
    res.skipped = list(pre.skipped)
    return [res] if isinstance(model, list | tuple) else res  # a list in, a list out


# extract's arguments that worker processes and array tasks take from task_args: (flag, default)
_TASK_FLAGS = {
    "batch_size": ("--batch-size", None),
    "compression": ("--compression", DEFAULT_COMPRESSION),
    "loader_workers": ("--loader-workers", None),
    "chunk_rows": ("--chunk-rows", 64),
    "dtype": ("--dtype", "float16"),
    "fmt": ("--format", "zarr"),
    "compile": ("--compile", False),
}


def _check_task_args(task_args: Sequence[str], **values) -> None:
    """Refuse an argument whose value the processes would not see: set here but absent from ``task_args``,
    or given there with another value (they would write a store other than the one waited for)."""
    args = [str(a) for a in task_args]
    for name, (flag, default) in _TASK_FLAGS.items():
        value = values[name]
        if name == "compile":
            given = flag in args
        else:
            given = args[args.index(flag) + 1] if flag in args[:-1] else None
        differs = (
            given != value
            if name == "compile"
            else (value != default if given is None else str(given) != str(value))
        )
        if differs:
            shown = ("present" if given else "absent") if name == "compile" else given or "absent"
            raise TprobeError(
                f"{name}={value!r} is not what task_args give the worker processes ({flag} {shown}); "
                "put the same value in task_args"
            )


def _model_list(model) -> list:
    """``extract``'s ``model`` as a list: each family alias (``dinov2-all``) as its models, each model once."""
    from tprobe.models.backbones import expand_models

    out: list = []
    for m in model if isinstance(model, list | tuple) else [model]:
        for x in expand_models([m]) if isinstance(m, str) else [m]:
            if not any(x is y or (isinstance(x, str) and x == y) for y in out):
                out.append(x)
    if not out:
        raise TprobeError("no model to extract; give at least one model")
    return out


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
def probe(
    features: FeatureSet | Sequence[FeatureSet] | FeatureStore | str | Path | None = None,
    *,
    head: str | Sequence[str] = "logreg",
    pool: str | Sequence[str] | None = None,
    split: str = "leave-one-donor-out",
    test_donor: str | None = None,
    folds: int = 5,
    out: str | Path | None = None,
    model: str | Sequence[str] | None = None,
    revision: str | None = None,
    data: str | Path | None = None,
    config: PreprocessConfig | None = None,
    canvas_set: bool | None = None,
    cache: str | Path = "cache",
    offline: bool = False,
    id_column: str | None = None,
    exclude: Sequence[str] = (),
    keep_columns: Sequence[str] = (),
    all_table_rows: bool = False,
    executor: str = "local",
    slurm: SlurmOptions | None = None,
    poll: float = 10.0,
    resume: str | Path | None = None,
    sweep_task: int | None = None,
    progress: Callable[[SweepEvent], None] | None = None,
    **options,
) -> ProbeRun | SweepResult | Path:
    """Train heads on features with donor-held-out nested CV: one run, or a sweep of heads x pools.

    ``features``: a :class:`~tprobe.features.sources.FeatureSet` (or a list of them), a feature store
    (its path or a :class:`~tprobe.cache.store.FeatureStore`; ``pool`` says how its tokens are pooled),
    a CSV/Parquet feature table (joined to the images of ``data``: ``id_column``, ``exclude``,
    ``keep_columns``, ``all_table_rows``), or ``None``: ``model``'s store in ``cache`` for ``data``
    preprocessed with ``config`` (``canvas_set``: whether the canvas was set by hand; default: it
    differs from the default canvas). Several ``model`` values (or a family alias such as
    ``dinov2-all``) sweep each model's store, the runs named ``<model> · <pool>``. ``head`` and
    ``pool`` take a name, ``all``, a list, and for ``pool`` also ``layers`` (``cls@`` each layer a ``--layers`` store holds). ``options`` are
    :class:`~tprobe.probing.run.ProbeRun` parameters (``tta``, ``train_views``, ``penalty``, ``seed``,
    ``n_boot``, ``final_head``, ``normalize``, ``solver``, ...). ``progress`` gets every
    :class:`~tprobe.probing.sweep.SweepEvent`.

    One head on one feature set returns the fitted :class:`~tprobe.probing.run.ProbeRun`, saved under
    ``out`` when given (its folder: ``run.path_``). Several return the
    :class:`~tprobe.probing.sweep.SweepResult`; the sweep folder goes under ``out`` (default ``runs``).
    ``executor="slurm"`` runs a store's sweep as one SLURM array job (``slurm``: the
    :class:`~tprobe.cluster.slurm.SlurmOptions`; ``poll``: seconds between checks). ``resume`` (a
    sweep folder) runs only its missing tasks (here, or as an array with ``executor="slurm"``) and
    collects it; with ``sweep_task`` it runs that one task and returns its run folder.

    Example::

        run = tprobe.probe(store_path, pool="cls", head="logreg", out="runs")
        run.summary_["roc_auc"]["mean"], run.path_
        res = tprobe.probe(store_path, pool="all", head="all")   # the sweep
        res.summary.sort_values("roc_auc_mean")
    """
    from dataclasses import fields

    from tprobe.data.preprocess import PreprocessConfig as _Config
    from tprobe.errors import TprobeError
    from tprobe.probing import sweep as _sweep
    from tprobe.probing.run import ProbeRun as _Run

    known = {f.name for f in fields(_Run)} - {"head", "split", "test_donor", "n_splits", "data"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TprobeError(
            f"probe: unknown option(s) {', '.join(unknown)}; ProbeRun takes {', '.join(sorted(known))}"
        )
    if executor not in ("local", "slurm"):
        raise TprobeError(f"--executor {executor!r} is not one of local, slurm")
    if resume is not None or sweep_task is not None:
        return _resume_sweep(resume, sweep_task, executor, slurm, poll, progress)
    if executor == "slurm":
        from tprobe.cluster.slurm import check_sweep

        if features is None and model is not None and len(_model_list(model)) > 1:
            raise TprobeError("--executor slurm sweeps one store; give one --model per sweep")
        check_sweep("runs" if out is None else out, store=_sweep.is_store_input(features))
    heads, pools = _sweep.expand_names(head, "cls" if pool is None else pool)
    if canvas_set is None:
        canvas_set = config is not None and config.canvas != _Config().canvas
    sources, store, pools = _sweep.probe_sources(
        features,
        None if pool is None else pools,
        model=model,
        revision=revision,
        data=data,
        config=config,
        canvas_set=canvas_set,
        cache=cache,
        offline=offline,
        table_options=dict(
            id_column=id_column, exclude=exclude, keep_columns=keep_columns, all_table_rows=all_table_rows
        ),
    )
    kwargs = dict(split=split, test_donor=test_donor, n_splits=folds, data=str(data) if data else None)
    kwargs.update(options)
    if executor == "slurm":
        from tprobe.cluster.slurm import sweep_on_slurm

        out = "runs" if out is None else out
        return sweep_on_slurm(store, pools, heads, out=out, probe_kwargs=kwargs, options=slurm, poll=poll)
    return _sweep.run_probes(sources, heads, out=out, probe_kwargs=kwargs, progress=progress)


def _resume_sweep(resume, sweep_task, executor, slurm, poll, progress):
    """:func:`probe`'s ``resume``: one task of the sweep folder, or its missing tasks, then its summary."""
    from tprobe.errors import TprobeError
    from tprobe.probing.sweep import resume_sweep, run_task

    if resume is None:
        raise TprobeError("--sweep-task i needs --resume SWEEP (the sweep folder whose task i to run)")
    if sweep_task is not None:
        return run_task(resume, sweep_task, progress=progress)
    if executor == "slurm":
        from tprobe.cluster.slurm import resume_on_slurm

        return resume_on_slurm(resume, options=slurm, poll=poll)
    return resume_sweep(resume, progress=progress)


def predict(
    run: str | Path,
    images: str | Path,
    *,
    out: str | Path | None = None,
    threshold: float = 0.5,
    masks: str | Path | None = None,
    cache: str | Path = "cache",
    device: str = "auto",
    offline: bool = False,
) -> pd.DataFrame:
    """Label new images with a trained probe run: one row per image (``path, p_activated, label, ...``).

    ``run``: a run folder :func:`probe` saved from a feature store (a sweep folder: its best run by
    mean ROC AUC); runs trained on a feature table, raw pixels or a baseline are refused (they have no
    model to embed new images with). The images are preprocessed as the run's were and embedded
    through the cache with the run's model; images that fail the quality filters keep their row, with
    no probability and the reason. ``threshold``: ``p_activated`` at or above it -> activated. With
    ``masks`` (label images), ``images`` are fields of view: one row per object, and with ``out`` an
    overlay PNG per field in ``<out stem>-overlays/``. With ``out`` the table is also written there as
    CSV.

    Example::

        table = tprobe.predict(run.path_, "new_plate/", out="new_plate.csv")
        table["label_name"].value_counts()
    """
    from tprobe.probing.predict import overlay_folder
    from tprobe.probing.predict import predict as _predict

    overlays = overlay_folder(out) if masks is not None and out is not None else None
    table = _predict(
        run,
        images,
        cache=cache,
        device=device,
        offline=offline,
        threshold=threshold,
        masks=masks,
        overlays=overlays,
    )
    if out is not None:
        table.to_csv(out, index=False)
    return table


# ---- science and runs: curve, map, report ---------------------------------------------------------
def curve(
    sources: FeatureSet | Sequence[FeatureSet],
    *,
    head: str | Sequence[str] = "logreg",
    shots: Sequence[int | str] = (1, 2, 4, 8, 16, 32, 64, "all"),
    repeats: int = 10,
    split: str = "leave-one-donor-out",
    test_donor: str | None = None,
    train_views: str = "orig",
    seed: int = 0,
    jobs: int = 1,
    normalize: str = "standard",
) -> LabelCurve:
    """Label-efficiency curves: held-out-donor AUC against labelled cells per class, per source and head.

    For each held-out donor, ``k`` cells per class (each of ``shots``; ``"all"``: every training cell)
    are drawn from the training donors only (a cell brings its views; ``train_views="all"``: its
    augmented views too, stores only), a head with fixed hyperparameters is fitted and scores the
    held-out donor; repeated ``repeats`` times. Every source gets the same draws, so the curves are
    paired. ``sources``: FeatureSets from :func:`feature_sets`; ``head``: a head name, several, or
    ``"all"``; ``split``: ``leave-one-donor-out`` or ``test-donor`` (with ``test_donor``);
    ``normalize``: ``none``, ``standard`` or ``donor-center``; ``jobs``: parallel (fold, repeat) fits.

    Returns the fitted :class:`~tprobe.science.curve.LabelCurve`: ``.results_`` (one row per held-out
    donor, draw and k), ``.draws_``, ``.band()`` (mean AUC and 95% t-interval over donors),
    ``.auc_table()``, and ``.save(out)``, which writes the run folder ``tprobe curve`` writes
    (curve.parquet, draws.parquet, curve_band.csv, curve.png, config.json) and returns its path.

    Example::

        sets = tprobe.feature_sets(stores=[store_path], pixels=True)
        c = tprobe.curve(sets, head=["logreg", "knn"], shots=[1, 4, 16, "all"], repeats=5)
        c.auc_table()
        c.save("runs")
    """
    from tprobe.science.curve import LabelCurve as _Curve

    return _Curve(
        head=head if isinstance(head, str) else list(head),
        shots=tuple(shots),
        repeats=repeats,
        seed=seed,
        split=split,
        test_donor=test_donor,
        train_views=train_views,
        n_jobs=jobs,
        normalize=normalize,
    ).fit(sources)


def map(  # noqa: A001 - the public name of the stage, as `tprobe map`
    sources: FeatureSet | Sequence[FeatureSet],
    *,
    umap: bool = True,
    seed: int = 0,
    data: str | Path | None = None,
    config: PreprocessConfig | None = None,
    manifest: pd.DataFrame | None = None,
) -> EmbeddingMap:
    """Embedding maps (PCA, UMAP) of each source's original views, with donor and batch diagnostics.

    For each source: how well activation, donor and imaging batch are predicted from the features
    (the same classifier, CV grouped by cell, against the majority-class rate), donor and batch within
    each class against that class's own chance, and silhouettes; a warning when donor or batch within
    class is more predictable than activation. ``umap=False``: PCA only (no umap-learn). Tables and
    pixels take each cell's imaging batch from the data's manifest: ``manifest`` (e.g.
    ``pre.manifest``), else ``data`` preprocessed with ``config`` (a store reads its own).

    Returns an :class:`~tprobe.science.embedmap.EmbeddingMap`: one
    :class:`~tprobe.science.embedmap.SourceMap` per source (``.coords``, ``.diagnostics``, a typed
    :class:`~tprobe.science.embedmap.MapDiagnostics`), and ``.save(out)``, which writes the run folder
    ``tprobe map`` writes (map-<source>.png, map-<source>.parquet, diagnostics.json) and returns its path.

    Example::

        m = tprobe.map(tprobe.feature_sets(stores=[store_path], pixels=True), umap=False)
        m["pixels"].diagnostics.within_class["donor"]
        m.save("runs")
    """
    from tprobe.features.sources import FeatureSet as _Set
    from tprobe.science.embedmap import embedding_map

    sets = [sources] if isinstance(sources, _Set) else list(sources)
    if manifest is None and any(fs.source.get("kind") != "store" for fs in sets):
        from tprobe.data.preprocess import prepare

        manifest = prepare(data, config, progress=False).manifest
    return embedding_map(sets, manifest, umap=umap, seed=seed)


def report(
    runs_dir: str | Path = "runs", out: str | Path | None = None, *, reference: str | None = None
) -> Report:
    """Compare the run folders under ``runs_dir``: one table, paired tests against one reference, figures.

    Every run (probe, baseline, finetune) is compared with one reference run declared in advance
    (``reference``: a run folder's name; default: the logreg probe on CLS tokens, else the frequency
    baseline, else the first run folder by path; the rule reads no result) on the same held-out donors:
    exact sign-flip test, Holm across the comparisons. With ``out`` the report is written there
    (report.md, report.html, summary.parquet, summary.csv, paired.csv, donor_auc.png, and variants.png
    when the runs probe stores of two or more models), as ``tprobe report`` does; without it nothing
    is written. A ``reference`` matching no run, or several, is a
    one-line error before anything is written.

    Returns a :class:`~tprobe.runs.report.Report`: ``.summary`` (one row per run), ``.table`` (its
    display form), ``.paired`` (each run vs the reference), ``.headline``, ``.map_signal`` (donor and
    batch signal within class from ``tprobe map`` folders), ``.variants`` (the model variants' AUC by
    model x pooling x head against the reference; empty with one model), ``.incomplete`` and ``.paths``
    (files written).

    Example::

        rep = tprobe.report("runs", "report")
        rep.table
    """
    from tprobe.runs.report import build_report

    rep = build_report(runs_dir, reference=reference)
    if out is not None:
        rep.save(out)
    return rep


# ---- training: finetune, baseline, saliency -------------------------------------------------------
if TYPE_CHECKING:
    from tprobe.train.baselines import BaselineRun
    from tprobe.train.finetune import FinetuneRun
    from tprobe.train.loop import TrainConfig


def finetune(
    data: str | Path | Preprocessed | None = None,
    model: str | Path | ModelRef = "dinov2-small-reg",
    *,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    config: PreprocessConfig | None = None,
    revision: str | None = None,
    pool: str = "concat",
    freeze: bool = False,
    unfreeze_last: int | None = None,
    split: str = "leave-one-donor-out",
    test_donor: str | None = None,
    train: TrainConfig | None = None,
    device: str = "auto",
    saliency_n: int = 8,
    offline: bool = False,
    canvas_set: bool | None = None,
    log: Callable[[dict], None] | None = None,
    **train_options,
) -> FinetuneRun:
    """Train a backbone + linear head end to end on the probe's donor splits (skips the cache).

    ``data``: what :func:`preprocess` takes (a folder, a manifest, a saved preprocessed folder or
    ``None`` for the sample) with ``config``, or a :class:`~tprobe.data.preprocess.Preprocessed`. A
    canvas not chosen (``canvas_set``; default: chosen when not the default 140) is rounded up to the
    model's patch size. ``model``: an alias, hub id, local folder or
    :class:`~tprobe.models.backbones.ModelRef`. ``train`` (a :class:`~tprobe.train.loop.TrainConfig`)
    or keyword ``train_options`` (its fields: ``epochs``, ``batch_size``, ``lr_backbone``, ``lr_head``,
    ``weight_decay``, ``patience``, ``pos_weight`` ("auto", "none" or a number), ``seed``,
    ``precision``) set the training; ``freeze`` trains the head only, ``unfreeze_last`` the last K
    layers and the head.

    Writes a new run folder under ``out``: the probe's run files plus curves.csv/curves.png, the
    per-fold trainable weights ``fold<i>.pt``, a checkpoint per epoch and (``saliency_n`` > 0) saliency
    grids of that many images per held-out donor. ``resume``: an interrupted run folder, continued
    from its last finished epoch with the options it recorded (then every other argument but
    ``device``, ``saliency_n``, ``offline`` and ``log`` is ignored). ``log(row: dict)`` gets each fold's
    start and each epoch's losses [default: INFO lines of the ``tprobe.api`` logger].

    Returns the fitted :class:`~tprobe.train.finetune.FinetuneRun`: ``.evaluation_`` (per-donor
    metrics), ``.curves_``, ``.run_`` (the run folder), ``.saliency_`` (the grids written). On a
    randomly initialised model (``.model.random_init``) the results are a plumbing check, and the
    figures say so.

    Example::

        job = tprobe.finetune(model="dinov2-small-reg", freeze=True, epochs=5)
        job.evaluation_.table()
    """
    from dataclasses import replace

    from tprobe.runs.record import RunRecord, make_run_dir
    from tprobe.train.finetune import FinetuneRun as _Run
    from tprobe.train.loop import TrainConfig as _Train

    if resume is not None:  # the run's own options win: a resumed run must train what it started
        job = replace(_Run.from_run(resume, offline=offline), device=device)
        data, config, canvas_set = job.data, RunRecord.load(resume).preprocess_config(), False
    else:
        ref = resolve_model(model, revision, offline=offline) if isinstance(model, str | Path) else model
        job = _Run(
            ref,
            pool=pool,
            freeze=freeze,
            unfreeze_last=unfreeze_last,
            split=split,
            test_donor=test_donor,
            device=device,
            train=replace(train or _Train(), **train_options),
            data=str(data) if isinstance(data, str | Path) else None,
        )
    pre = _prepared(data, config, job.model, canvas_set=canvas_set, log_skipped=True)
    run = Path(resume) if resume is not None else make_run_dir(out, job.record(pre).name)
    job.fit(pre, run, log=log or _row_logger("finetune"))
    job.saliency(saliency_n, pre)
    return job


def baseline(
    name: str = "all",
    data: str | Path | Preprocessed | None = None,
    *,
    out: str | Path = "runs",
    config: PreprocessConfig | None = None,
    split: str = "leave-one-donor-out",
    test_donor: str | None = None,
    epochs: int = 30,
    inception_weights: str = "timm/inception_v3.tv_in1k",
    inception_size: int = 299,
    device: str = "auto",
    seed: int = 0,
    n_boot: int = 2000,
    log: Callable[[dict], None] | None = None,
) -> list[BaselineRun]:
    """Wang et al.'s baselines on the same donor splits and run-folder files as the probes.

    ``name``: one of ``tprobe.train.BASELINES`` (frequency, pixel-logreg, pixel-mlp, lenet,
    inception-frozen, inception-finetuned) or ``all`` (the first four: the Inception ones download
    ImageNet weights, name them explicitly). ``data`` and ``config``: as :func:`finetune` takes them.
    ``epochs``: lenet and inception-finetuned (early stopping may end sooner). ``inception_weights``:
    a hub id, a folder holding ``model.safetensors`` or ``random`` (a plumbing check), resolved before
    any image is read (an unreachable hub fails at once); ``inception_size``: the Inception input side
    in px (>= 75). ``log(row: dict)`` gets the progress [default: INFO lines of the
    ``tprobe.train.baselines`` logger].

    Returns one :class:`~tprobe.train.baselines.BaselineRun` per baseline, in order: ``.path`` (a new
    run folder under ``out``), ``.evaluation`` (per-donor metrics), ``.random_weights``.

    Example::

        runs = tprobe.baseline("all")
        runs[0].evaluation.table()
    """
    from tprobe.train import INCEPTION
    from tprobe.train.baselines import baseline_names, run_baseline

    names = baseline_names(name)
    if any(n in INCEPTION for n in names):  # before any work: an unreachable hub fails at once
        from tprobe.data.preprocess import PreprocessConfig as _Config
        from tprobe.models.inception import check_size, resolve_weights

        prep = getattr(data, "config", None) or config or _Config()
        prep.require_one_image("the Inception baselines")  # before the hub is contacted
        check_size(inception_size)
        inception_weights = resolve_weights(inception_weights)
    pre = _prepared(data, config, canvas_set=False, log_skipped=True)
    kw = dict(split=split, test_donor=test_donor, seed=seed, n_boot=n_boot, epochs=epochs, device=device)
    return [
        run_baseline(
            n,
            pre,
            out,
            inception_weights=inception_weights,
            inception_size=inception_size,
            log=log,
            data=str(data) if isinstance(data, str | Path) else None,
            **kw,
        )
        for n in names
    ]


def saliency(run: str | Path, n: int = 8, *, data: Preprocessed | None = None) -> list[Path]:
    """Saliency grids of a :func:`finetune` run: per held-out donor, ``n`` images (half right, half
    wrong calls) with their gradient, gradient x input and CLS-attention maps.

    ``data``: the run's images already preprocessed [default: read again from the data the run
    recorded, with its preprocessing; a run fitted on a ``Preprocessed`` object recorded no data
    path, so pass that object again]. Writes ``saliency_<donor>.png`` into the run folder (a donor
    name never makes a path outside it) and returns their paths.

    Example::

        tprobe.saliency("runs/20261125-101500-dinov2-small-reg-concat-finetuned", n=8)
    """
    from tprobe.train.finetune import saliency_for_run

    return saliency_for_run(run, data, n=n)


def _row_logger(what: str) -> Callable[[dict], None]:
    """A training ``log``: each row (a fold's start, an epoch's losses) as one INFO line."""
    import logging

    def log(row: dict) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        logging.getLogger(__name__).info("%s: %s", what, text)

    return log
