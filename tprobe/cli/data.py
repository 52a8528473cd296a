"""The data commands: ``preprocess`` (images or fields of view -> views) and ``models`` (the aliases)."""

from __future__ import annotations

from pathlib import Path

import click

from tprobe.cli.echo import finish
from tprobe.cli.options import CACHE_OPTION, data_options
from tprobe.data.preprocess import OUTSIDE_MODES


@click.command()
@data_options
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder [default: cache/<dataset>/<preprocess-hash>/; fields: cache/fov/<key>/].",
)
@CACHE_OPTION
@click.option(
    "--fov",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Fields of view (folder laid out like --data, or a CSV/Parquet table image,mask,label[,donor]): "
    "each labelled object becomes one cell.",
)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    default=None,
    help="[--fov] Folder of label images, same subfolders: NAME.tif pairs with NAME_masks.tif/.png, "
    "NAME_cp_masks.png (or NAME.tif/.png) [default: the --fov folder].",
)
@click.option(
    "--margin",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="[--fov] Pixels around each object's bounding box.",
)
@click.option(
    "--outside",
    type=click.Choice(OUTSIDE_MODES),
    default="zero",
    show_default=True,
    help="[--fov] Crop pixels outside the object: zeroed, or kept (neighbours included).",
)
@click.option(
    "--min-object-area",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="[--fov] Drop objects of fewer pixels (small_object).",
)
@click.option(
    "--max-object-area",
    type=click.IntRange(min=1),
    default=None,
    help="[--fov] Drop objects of more pixels (large_object) [default: no limit].",
)
def preprocess(data, prep, out, cache, fov, masks, **crop):
    """Filter, pad and augment images; write manifest.parquet, counts and a contact sheet.

    \b
    Examples:
      tprobe preprocess
      tprobe preprocess --data my_plate/ --views dihedral8 --fit resize --out prep/
      tprobe preprocess --fov fields/ --masks masks/ --margin 4 --out prep/   # then extract --data prep/
    """
    import pandas as pd

    from tprobe import api

    pre = api.preprocess(data, prep, out=out, cache=cache, fov=fov, masks=masks, contact_sheet=True, **crop)
    for line in pre.warnings:
        click.echo(f"warning: {line}", err=True)
    for s in pre.skipped:
        click.echo(f"skipped: {s}", err=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        click.echo(pre.counts().to_string())
    click.echo(f"dataset {pre.fingerprint}  preprocess {pre.config.hash}")
    click.echo(f"contact sheet: {pre.folder / 'contact_sheet.png'}")
    click.echo(str(pre.folder / "manifest.parquet"))
    finish(pre)


@click.command()
def models():
    """List the model aliases and the Hugging Face ids they map to."""
    from tprobe import api
    from tprobe.models.backbones import FAMILIES, LAYOUT_TYPES

    for alias, hub in api.list_models().items():
        click.echo(f"{alias:20s} {hub}")
    for family, members in FAMILIES.items():  # extract --model FAMILY: every member in one pass
        click.echo(f"{family:20s} {' + '.join(members)} (one extract pass, one store each)")
    click.echo(
        "Any other hub id (owner/name) or a local save_pretrained() folder of a ViT whose last_hidden_state "
        f"is CLS + registers + a patch grid works too (model types: {', '.join(LAYOUT_TYPES)})."
    )
