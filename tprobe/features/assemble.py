"""Feature sets from what a user names: stores, models' cached stores, feature tables, raw pixels.

``curve``, ``map`` and the notebook compare several sources on the same cells;
:func:`feature_sets` builds them in one call, checking each store against the images it should
come from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tprobe.cache.store import FeatureStore
from tprobe.data.preprocess import PreprocessConfig, Preprocessed, prepare
from tprobe.errors import TprobeError
from tprobe.features.sources import FeatureSet, from_store, from_table

__all__ = ["feature_sets", "table_set", "check_store_matches", "store_patch"]

logger = logging.getLogger(__name__)


def store_patch(store: str | Path) -> int | None:
    """The patch size a store was extracted with (its default canvas is rounded to it)."""
    return FeatureStore.open(store).attrs.get("patch_size")


def check_store_matches(store: str | Path, pre: Preprocessed) -> None:
    """A store named beside ``--data`` must come from that data and preprocessing, row for row."""
    fs = FeatureStore.open(store)
    attrs = fs.attrs
    if (attrs.get("dataset_fingerprint"), attrs.get("preprocess_hash")) != (pre.fingerprint, pre.config.hash):
        raise TprobeError(
            f"{store}: was extracted from another dataset or preprocessing (dataset "
            f"{attrs.get('dataset_fingerprint')}, preprocess {attrs.get('preprocess_hash')}; --data gives "
            f"{pre.fingerprint}, {pre.config.hash}); run `tprobe extract` on this data or drop --store"
        )
    fs.verify_rows(pre.kept["image_id"].tolist(), "--data")


def table_set(
    path: str | Path,
    manifest,
    *,
    id_column: str | None = None,
    exclude: Sequence[str] = (),
    keep_columns: Sequence[str] = (),
    all_table_rows: bool = False,
) -> FeatureSet:
    """A feature table as a FeatureSet (:func:`~tprobe.features.sources.table_note` says what it dropped)."""
    return from_table(
        path, manifest, id_column=id_column, exclude=exclude, keep=keep_columns, all_rows=all_table_rows
    )


def feature_sets(
    *,
    stores: Sequence[str | Path] = (),
    models: Sequence[str] = (),
    revision: str | None = None,
    pool: str = "cls",
    tables: Sequence[str | Path] = (),
    id_column: str | None = None,
    exclude: Sequence[str] = (),
    keep_columns: Sequence[str] = (),
    all_table_rows: bool = False,
    pixels: bool = False,
    data=None,
    config: PreprocessConfig | None = None,
    canvas_set: bool = False,
    cache: str | Path = "cache",
    offline: bool = False,
) -> list[FeatureSet]:
    """One FeatureSet per source: each store, each model's cached store, each table, and the pixels.

    ``data``: what :func:`~tprobe.data.preprocess.prepare` takes, or a Preprocessed. Stores are
    checked against ``data`` when it is given; models' stores are found in ``cache`` for
    ``data`` preprocessed with ``config`` (a canvas left unset is rounded per model's patch size).
    Two sources of one name are told apart as ``name#1``, ``name#2``.
    """
    by_patch: dict[int | None, Preprocessed] = {}  # preprocess once per patch size

    def prepared(patch=None) -> Preprocessed:
        if patch not in by_patch:
            pre = prepare(data, config, patch_size=patch, canvas_set=canvas_set, progress=False)
            for s in pre.skipped:
                logger.warning("skipped: %s", s)
            by_patch[patch] = pre
        return by_patch[patch]

    stores = list(stores)
    if data is not None:
        for st in stores:
            check_store_matches(st, prepared(store_patch(st)))
    if models:
        from tprobe.cache.keys import find_store
        from tprobe.models.backbones import resolve_model

        for m in models:
            ref = resolve_model(m, revision, offline=offline)
            stores.append(find_store(cache, prepared(ref.patch_size), ref))
    out = [from_store(st, pool) for st in stores]
    for t in tables:
        out.append(
            table_set(
                t,
                prepared().manifest,
                id_column=id_column,
                exclude=exclude,
                keep_columns=keep_columns,
                all_table_rows=all_table_rows,
            )
        )
    if pixels:
        from tprobe.features.pixels import pixel_features

        out.append(pixel_features(prepared()))
    if not out:
        raise TprobeError("no features: pass --store PATH, --model M, --features TABLE and/or --pixels")
    names = [fs.name for fs in out]
    for i, fs in enumerate(out):  # two stores of the same model name stay distinguishable
        if names.count(fs.name) > 1:
            fs.source.name = f"{fs.name}#{i + 1}"
    return out
