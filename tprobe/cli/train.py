"""`tprobe finetune`, `tprobe saliency` and `tprobe baseline`: thin shells over :mod:`tprobe.api`."""

from __future__ import annotations

from pathlib import Path

import click

from tprobe.cli.echo import echo_table
from tprobe.cli.options import (
    DEVICE_OPTION,
    OFFLINE_OPTION,
    data_options,
    given,
    refuse_unused,
    run_option,
    split_options,
    split_rules,
)
from tprobe.models.random_weights import NOTE as RANDOM_NOTE
from tprobe.train import BASELINES, INCEPTION, PRECISIONS, TRAINED, baseline_names


def _row_echo(resume):
    """Each training row as one indented line; a resumed run says so first (once its record is read)."""
    said = []

    def log(row):
        if resume is not None and not said:
            click.echo(f"resuming {resume} with its recorded options (command-line training options ignored)")
            said.append(True)
        click.echo(
            "   " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        )

    return log


@click.command()
@click.option("--model", default="dinov2-small-reg", show_default=True, help="Alias, hub id or local folder.")
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option(
    "--pool",
    default="concat",
    show_default=True,
    help="Head input: cls, mean, registers, cls+mean, or concat (CLS + registers + patches, as the study).",
)
@click.option(
    "--freeze", is_flag=True, help="Frozen backbone: train the linear head only (the study's 'Frozen')."
)
@click.option(
    "--unfreeze-last", type=int, default=None, help="Train only the last K transformer layers + head."
)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", "lr_backbone", default=1e-5, show_default=True, help="Backbone learning rate.")
@click.option("--lr-head", default=1e-3, show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option(
    "--patience", default=3, show_default=True, help="Early stopping: epochs without better val AUC."
)
@click.option(
    "--pos-weight",
    default="auto",
    show_default=True,
    help="BCE positive-class weight: auto (negatives/positives), none, or a number.",
)
@split_options
@DEVICE_OPTION
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--saliency-n", default=8, show_default=True, help="Images per saliency grid (0 = none).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@click.option(
    "--resume",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Continue an interrupted run directory from its last finished epoch, with its recorded options.",
)
@OFFLINE_OPTION
@data_options
def finetune(model, revision, saliency_n, out, resume, offline, data, prep, **options):
    """Train backbone + linear head end to end on the probe's donor splits (skips the cache).

    Writes the probe's run-directory files plus curves.csv/curves.png, per-fold weights and
    saliency grids; prints per-donor metrics.

    \b
    Examples:
      tprobe finetune --model dinov2-small-reg
      tprobe finetune --model dinov2-small-reg --freeze
      tprobe finetune --model dinov2-base --unfreeze-last 2 --epochs 20 --lr 1e-5 --batch-size 32
      tprobe finetune --resume runs/20261125-101500-dinov2-small-reg-concat-finetuned
    """
    from tprobe import api

    job = api.finetune(
        data,
        model,
        out=out,
        resume=resume,
        config=prep,
        revision=revision,
        saliency_n=saliency_n,
        offline=offline,
        canvas_set=given("canvas"),
        log=_row_echo(resume),
        **options,
    )
    if job.model.random_init:  # beside the results, where a reader looks (a refusal stays one line)
        click.echo(f"   {RANDOM_NOTE}")
    echo_table(job.evaluation_.table())
    for path in job.saliency_:
        click.echo(f"saliency: {path}")
    click.echo(str(job.run_))


@click.command()
@run_option("finetune")
@click.option("--n", default=8, show_default=True, help="Images per grid (half right, half wrong calls).")
def saliency(run_dir, n):
    """Saliency grids (gradient, gradient x input, CLS attention) for right and wrong calls per donor.

    \b
    Example:
      tprobe saliency --run runs/<run-id> --n 8
    """
    from tprobe import api

    for path in api.saliency(run_dir, n):
        click.echo(f"saliency: {path}")


@click.command()
@click.option(
    "--name",
    default="all",
    show_default=True,
    help=f"{', '.join(BASELINES)}, or all (the first four).",
)
@split_options
@click.option(
    "--epochs",
    default=30,
    show_default=True,
    help="LeNet / inception-finetuned epochs (early stopping may end sooner).",
)
@click.option(
    "--inception-weights",
    default="timm/inception_v3.tv_in1k",
    show_default=True,
    help="Inception v3 weights: a Hugging Face hub id (model.safetensors, cached by the HF cache), a "
    "folder holding model.safetensors, or 'random' (random initialisation: a plumbing check).",
)
@click.option(
    "--inception-size",
    default=299,
    show_default=True,
    help="Inception input side in px: the preprocessing canvas is upsampled to it (>= 75; smaller is "
    "faster on a CPU).",
)
@DEVICE_OPTION
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--bootstrap",
    "n_boot",
    default=2000,
    show_default=True,
    help="Deprecated, ignored: the 95% CI is now the t-interval over donors.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@data_options
def baseline(name, split, epochs, inception_weights, inception_size, data, prep, **options):
    """Wang et al.'s baselines on the same splits and run-directory schema as `tprobe probe`.

    \b
    Examples:
      tprobe baseline --name all
      tprobe baseline --name lenet --epochs 40 --split test-donor --test-donor 4
      tprobe baseline --name inception-frozen
      tprobe baseline --name inception-finetuned --epochs 10 --device cuda
      tprobe baseline --name inception-frozen --inception-weights random --inception-size 75
    """
    from tprobe import api

    names = baseline_names(name)
    inception, trained = set(INCEPTION) & set(names), set(TRAINED) & set(names)
    only_inception = f"to --name {name} (only the inception-* baselines)"
    refuse_unused(
        [
            ("inception_weights", bool(inception), only_inception),
            ("inception_size", bool(inception), only_inception),
            (
                "epochs",
                bool(trained),
                f"to --name {name} (only lenet and inception-finetuned train for epochs)",
            ),
            *split_rules(split),
        ]
    )
    kw = dict(epochs=epochs, inception_weights=inception_weights, inception_size=inception_size)
    for res in api.baseline(name, data, config=prep, split=split, **kw, **options):
        click.echo(f"== baseline {res.name}")
        if res.random_weights:
            click.echo(f"   {RANDOM_NOTE}")
        echo_table(res.evaluation.table())
        click.echo(str(res.path))
