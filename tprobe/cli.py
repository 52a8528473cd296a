"""The ``tprobe`` command line: thin click commands over the library's public functions."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from tprobe import __version__
from tprobe.errors import TprobeError

EXIT_SKIPPED = 3  # finished, but some input files were skipped (listed on stderr)


class _Group(click.Group):
    """Turns TprobeError into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TprobeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished chunks are kept; rerun the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tprobe")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def main(verbose: bool):
    """tprobe: an embedding cache and probe toolkit for microscopy cell images.

    \b
    Typical session on the bundled T-cell sample:
      tprobe preprocess                      # filter, pad and augment; manifest + contact sheet
      tprobe extract --model dinov2-small-reg
      tprobe probe --head logreg             # donor-held-out metrics, plots, run dir
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()  # retries are ours to summarise
    except ImportError:  # pragma: no cover
        pass


# ---- shared options -----------------------------------------------------------------------
def data_options(f):
    """--data plus every preprocessing parameter, turned into (dataset, config) for the command."""
    from tprobe.preprocess import PreprocessConfig

    d = PreprocessConfig()
    opts = [
        click.option("--data", type=click.Path(path_type=Path), default=None,
                     help="Image folder or CSV/Parquet manifest [default: bundled T-cell sample]."),
        click.option("--canvas", type=int, default=d.canvas, show_default=True,
                     help="Square canvas side in px (a multiple of the patch size, 14)."),
        click.option("--fit", type=click.Choice(["pad", "resize", "fill"]), default=d.fit, show_default=True,
                     help="pad: drop cells larger than the canvas; resize: shrink those; fill: scale every cell to fill it."),
        click.option("--views", type=click.Choice(["six", "dihedral8", "orig"]), default=d.views, show_default=True,
                     help="Augmented views per cell: six (orig, r90/180/270, fliph, flipv), all eight, or orig only."),
        click.option("--entropy-min", type=float, default=d.entropy_min, show_default=True, help="Drop below this entropy (bits)."),
        click.option("--entropy-dim", type=float, default=d.entropy_dim, show_default=True,
                     help="Drop below this entropy when also dimmer than --intensity-dim."),
        click.option("--intensity-dim", type=float, default=d.intensity_dim, show_default=True, help="Summed-intensity dim limit."),
        click.option("--binary-threshold", type=float, default=d.binary_threshold, show_default=True,
                     help="Pixel threshold for the cell mask (8-bit scale)."),
        click.option("--min-area", "min_component_area", type=int, default=d.min_component_area, show_default=True,
                     help="Ignore mask components smaller than this (px) when counting cells."),
        click.option("--max-value", type=float, default=None,
                     help="Top of the camera range for 16-bit input (e.g. 4095) [default: 65535]."),
    ]  # fmt: skip

    @functools.wraps(f)
    def wrapper(*args, data, **kw):
        keys = ("canvas", "fit", "views", "entropy_min", "entropy_dim", "intensity_dim",
                "binary_threshold", "min_component_area", "max_value")  # fmt: skip
        config = PreprocessConfig(**{k: kw.pop(k) for k in keys})
        return f(*args, data=data, prep=config, **kw)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def _prepare(data, prep, *, progress=True):
    """Discover + preprocess, echo skipped files to stderr; returns (Preprocessed, n_skipped)."""
    from tprobe.dataset import discover
    from tprobe.preprocess import preprocess

    pre = preprocess(discover(data), prep, progress=progress)
    for s in pre.skipped:
        click.echo(f"skipped: {s}", err=True)
    return pre


def _finish(pre):
    if pre.skipped:
        click.echo(f"{len(pre.skipped)} file(s) skipped (listed above); exit status {EXIT_SKIPPED}", err=True)
        sys.exit(EXIT_SKIPPED)


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in value.split("/"))
        assert 0 <= i < k
    except (ValueError, AssertionError):
        raise click.BadParameter(f"{value!r}: use i/N with 0 <= i < N, e.g. 0/4") from None
    return i, k


# ---- commands -------------------------------------------------------------------------------
@main.command()
@data_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: cache/<dataset>/<preprocess-hash>/].")  # fmt: skip
@click.option("--cache", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
def preprocess(data, prep, out, cache):
    """Filter, pad and augment images; write manifest.parquet, counts and a contact sheet.

    \b
    Examples:
      tprobe preprocess
      tprobe preprocess --data my_plate/ --views dihedral8 --fit resize --out prep/
    """
    import pandas as pd

    from tprobe.plots import contact_sheet

    pre = _prepare(data, prep)
    out = out or Path(cache) / pre.fingerprint / pre.config.hash
    manifest = pre.save(out)
    contact_sheet(pre.manifest, pre.config, out / "contact_sheet.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        click.echo(pre.counts().to_string())
    click.echo(f"dataset {pre.fingerprint}  preprocess {pre.config.hash}")
    click.echo(f"contact sheet: {out / 'contact_sheet.png'}")
    click.echo(str(manifest))
    _finish(pre)


@main.command()
def models():
    """List the model aliases and the Hugging Face ids they map to."""
    from tprobe.backbones import ALIASES

    for alias, hub in ALIASES.items():
        click.echo(f"{alias:20s} {hub}")
    click.echo("Any other hub id (owner/name) or a local save_pretrained() folder works too.")


@main.command()
@click.option("--model", required=True, help="Alias (see `tprobe models`), hub id or local folder.")
@click.option("--revision", default=None, help="Hub branch, tag or commit [default: main].")
@data_options
@click.option("--cache", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage dtype of the tokens.",
)
@click.option("--batch-size", type=int, default=None, help="[default: 16 on CPU, 64 on GPU]")
@click.option(
    "--chunk-rows", type=int, default=64, show_default=True, help="Rows per store chunk (unit of resume)."
)
@click.option(
    "--device", default="auto", show_default=True, help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Compute precision; auto = fp16 autocast on GPU, fp32 on CPU.",
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (pays off on long runs).")
@click.option(
    "--workers", type=int, default=None, help="DataLoader workers [default: 0 on CPU, up to 8 on GPU]."
)
@click.option(
    "--shard", default="0/1", show_default=True, help="Take units i::N of the store (SLURM arrays)."
)
@click.option("--offline", is_flag=True, help="Never contact the hub; use the HF cache only.")
def extract(model, revision, data, prep, cache, fmt, dtype, batch_size, chunk_rows, device, precision,
            compile_, workers, shard, offline):  # fmt: skip
    """Run every kept image view through a DINOv2 model once; store CLS, register, patch tokens.

    The store lands under cache/<dataset>/<preprocess-hash>/<model>@<revision>/; its path is the
    last line of stdout. Rerunning resumes an interrupted run, or says "up to date".

    \b
    Examples:
      tprobe extract --model dinov2-small-reg
      tprobe extract --model dinov2-base --data path/to/images --format hdf5
      tprobe extract --model ./my-local-dinov2 --batch-size 64 --dtype float32 --device cuda
    """
    from tprobe.backbones import resolve_model
    from tprobe.extract import extract as run_extract

    pre = _prepare(data, prep, progress=False)
    ref = resolve_model(model, revision, offline=offline)
    res = run_extract(pre, ref, cache=cache, fmt=fmt, dtype=dtype, batch_size=batch_size,
                      chunk_rows=chunk_rows, device=device, precision=precision, compile=compile_,
                      workers=workers, shard=_parse_shard(shard), offline=offline)  # fmt: skip
    if res.status == "up to date":
        click.echo(f"up to date: {res.rows} rows already extracted for {ref.slug}")
    else:
        click.echo(f"{res.status}: {res.images} views in {res.seconds:.1f} s ({res.images_per_s:.1f} img/s)")
    click.echo(str(res.path))
    _finish(pre)


if __name__ == "__main__":  # pragma: no cover
    main()
