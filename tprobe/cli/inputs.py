"""The shared source options turned into feature sets through the API, echoing the tables' notes."""

from __future__ import annotations

import click


def echo_table_note(fs) -> None:
    """A table source's lines: the columns it dropped and the table rows it left unused."""
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
    """FeatureSets for curve/map (:func:`tprobe.api.feature_sets`); echoes the tables' notes."""
    from tprobe import api

    sets = api.feature_sets(
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
        cache=cache,
        offline=offline,
    )
    for fs in sets:
        if fs.source.kind == "table":
            echo_table_note(fs)
    return sets
