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
    import pandas as pd

    from tprobe.cache.store import FeatureStore
    from tprobe.data.dataset import Dataset
    from tprobe.data.preprocess import PreprocessConfig, Preprocessed
    from tprobe.features.sources import FeatureSet
    from tprobe.models.backbones import ModelRef
    from tprobe.runs.report import Report
    from tprobe.science.curve import LabelCurve
    from tprobe.science.embedmap import EmbeddingMap

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
    (report.md, report.html, summary.parquet, summary.csv, paired.csv, donor_auc.png), as ``tprobe
    report`` does; without it nothing is written. A ``reference`` matching no run, or several, is a
    one-line error before anything is written.

    Returns a :class:`~tprobe.runs.report.Report`: ``.summary`` (one row per run), ``.table`` (its
    display form), ``.paired`` (each run vs the reference), ``.headline``, ``.map_signal`` (donor and
    batch signal within class from ``tprobe map`` folders), ``.incomplete`` and ``.paths`` (files written).

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
