"""The shared options turned into library inputs: prepared data, feature sets (echoing what they skip)."""

from __future__ import annotations

import click

from tprobe.cli.options import given


def prepare_data(data, prep, *, progress=True, ref=None, patch_size=None):
    """:func:`tprobe.data.preprocess.prepare` for a command (its --canvas given or not); echo skipped files."""
    from tprobe.data.preprocess import prepare

    patch = patch_size or (ref.patch_size if ref is not None else None)
    pre = prepare(
        data,
        prep,
        patch_size=patch,
        canvas_set=given("canvas"),
        model_name=ref.name if ref is not None else "the store's model",
        progress=progress,
    )
    for s in pre.skipped:
        click.echo(f"skipped: {s}", err=True)
    return pre


def table_source(path, manifest, id_column, exclude, keep_columns, all_table_rows):
    """A --features table as a FeatureSet; echoes one line on its dropped columns and one on unused rows."""
    from tprobe.features.assemble import table_set

    fs = table_set(
        path,
        manifest,
        id_column=id_column,
        exclude=exclude,
        keep_columns=keep_columns,
        all_table_rows=all_table_rows,
    )
    echo_table_note(fs)
    return fs


def echo_table_note(fs) -> None:
    from tprobe.features.sources import table_note

    for line in table_note(fs.source):
        click.echo(f"   {line}")


def feature_sources(
    stores,
    models,
    revision,
    pool,
    features,
    id_column,
    exclude,
    pixels,
    cache,
    offline,
    data,
    prep,
    keep_columns=(),
    all_table_rows=False,
):
    """FeatureSets for curve/map (:func:`tprobe.features.assemble.feature_sets`); echoes the tables' notes."""
    from tprobe.features.assemble import feature_sets

    sets = feature_sets(
        stores=stores,
        models=models,
        revision=revision,
        pool=pool,
        tables=features,
        id_column=id_column,
        exclude=exclude,
        keep_columns=keep_columns,
        all_table_rows=all_table_rows,
        pixels=pixels,
        data=data,
        config=prep,
        canvas_set=given("canvas"),
        cache=cache,
        offline=offline,
    )
    for fs in sets:
        if fs.source.kind == "table":
            echo_table_note(fs)
    return sets
