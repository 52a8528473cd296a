"""The ``tprobe`` command line: thin click commands over the library's public functions."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from tprobe import __version__
from tprobe.cli import probe, science, train
from tprobe.cli.echo import RANDOM_NOTE, finish
from tprobe.cli.inputs import prepare_data
from tprobe.cli.options import (
    CACHE_OPTION,
    DEVICE_OPTION,
    OFFLINE_OPTION,
    data_options,
    forward_args,
    parse_shard,
    sbatch_options,
    slurm_options,
    token_names,
)
from tprobe.errors import TprobeError


class _Group(click.Group):
    """Turns TprobeError into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TprobeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished work is kept (store chunks, training epochs); rerun the same command "
                "to resume (finetune: --resume RUN_DIR)",
                err=True,
            )
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: one line, with the way to the traceback
            if "-v" in sys.argv or "--verbose" in sys.argv:
                raise
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc}; rerun with `tprobe -v ...` for the "
                "traceback and report it",
                err=True,
            )
            ctx.exit(1)


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
    logging.getLogger("tprobe").setLevel(logging.INFO)  # our own progress and notes reach stderr
    # read by transformers / huggingface_hub when a command first imports them (commands that load no
    # model never do: --help, status, report, export start without torch or transformers); retries and
    # advisory warnings are ours to summarise. Set them yourself to see more.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported already (tests, a notebook calling main): quiet it now
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()


# ---- commands -------------------------------------------------------------------------------
@main.command()
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
    type=click.Choice(["zero", "keep"]),
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
def preprocess(data, prep, out, cache, fov, masks, margin, outside, min_object_area, max_object_area):
    """Filter, pad and augment images; write manifest.parquet, counts and a contact sheet.

    \b
    Examples:
      tprobe preprocess
      tprobe preprocess --data my_plate/ --views dihedral8 --fit resize --out prep/
      tprobe preprocess --fov fields/ --masks masks/ --margin 4 --out prep/   # then extract --data prep/
    """
    import pandas as pd

    from tprobe.plot.figures import contact_sheet

    if fov is None:
        if masks is not None or margin or outside != "zero" or min_object_area != 1 or max_object_area:
            raise TprobeError(
                "--masks, --margin, --outside, --min-object-area and --max-object-area apply to fields "
                "of view: add --fov FIELDS"
            )
        pre = prepare_data(data, prep)
    else:
        pre, out = _prepare_fields(
            data,
            prep,
            out,
            cache,
            fov,
            masks,
            margin=margin,
            outside=outside,
            min_object_area=min_object_area,
            max_object_area=max_object_area,
        )
    out = out or Path(cache) / pre.fingerprint / pre.config.hash
    manifest = pre.save(out)
    contact_sheet(pre.manifest, pre.config, out / "contact_sheet.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        click.echo(pre.counts().to_string())
    click.echo(f"dataset {pre.fingerprint}  preprocess {pre.config.hash}")
    click.echo(f"contact sheet: {out / 'contact_sheet.png'}")
    click.echo(str(manifest))
    finish(pre)


def _prepare_fields(data, prep, out, cache, fov, masks, **crop):
    """``preprocess --fov``: crops under ``OUT/crops/`` (OUT keyed by the fields' paths and options)."""
    import dataclasses
    import hashlib

    from tprobe.data.fov import preprocess_fields

    if data is not None:
        raise TprobeError("--fov and --data are two inputs; give one (fields of view, or single-cell images)")
    prep = dataclasses.replace(prep, fov=True, **crop)
    if out is None:
        key = f"{Path(fov).resolve()}|{Path(masks or fov).resolve()}|{prep.hash}"
        out = Path(cache) / "fov" / hashlib.sha256(key.encode()).hexdigest()[:12]
    pre, warnings = preprocess_fields(fov, masks, prep, Path(out) / "crops", progress=True)
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    for s in pre.skipped:
        click.echo(f"skipped: {s}", err=True)
    return pre, out


@main.command()
def models():
    """List the model aliases and the Hugging Face ids they map to."""
    from tprobe.models.backbones import ALIASES, LAYOUT_TYPES

    for alias, hub in ALIASES.items():
        click.echo(f"{alias:20s} {hub}")
    click.echo(
        "Any other hub id (owner/name) or a local save_pretrained() folder of a ViT whose last_hidden_state "
        f"is CLS + registers + a patch grid works too (model types: {', '.join(LAYOUT_TYPES)})."
    )


def _extract_workers(ctx, pre, ref, n, gpus):
    """``--workers N``: N local processes, each ``tprobe extract ... --shard i/N``; returns when all exit."""
    from tprobe.cache.extract import resolve_precision, run_workers, store_path
    from tprobe.models.backbones import pick_device

    p = ctx.params
    dev = pick_device(p["device"])
    if not gpus and dev.type == "cuda":
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    ctx.params.update(
        canvas=pre.config.canvas, workers=1, devices=None, precision=resolve_precision(p["precision"], dev)
    )
    if gpus and p["device"].startswith("cuda:"):
        ctx.params["device"] = "cuda"  # each worker sees only its own GPU
    path = store_path(
        p["cache"],
        pre,
        ref,
        p["dtype"],
        p["fmt"],
        ctx.params["precision"],
        token_names(p["tokens"]),
        layers=p["layers"],
        patch_layers=p["patch_layers"],
    )
    if path.exists() and not path.with_name(path.name + ".progress").exists():
        click.echo(f"up to date: {len(pre.kept)} rows already extracted for {ref.slug}; no worker started")
        click.echo(str(path))
        return finish(pre)
    res = run_workers(forward_args(ctx), path, n, gpus)
    failed = [f"worker {i} (--shard {i}/{n}) exit status {c}" for i, c in enumerate(res.codes) if c]
    if failed:
        raise TprobeError(
            f"{'; '.join(failed)}: the store is not sealed; finished units are kept, rerun the same "
            "command to redo the rest (the worker's own error is above)"
        )
    if ref.random_init:
        click.echo(RANDOM_NOTE)
    where = f"GPUs {','.join(gpus)}" if gpus else "CPU"
    click.echo(
        f"{res.status}: {len(pre.kept)} views in the store, {n} workers on {where} in {res.seconds:.1f} s"
    )
    click.echo(str(path))
    finish(pre)


def _extract_slurm(ctx, pre, ref, shard, shards, slurm):
    from tprobe.cache.extract import store_path
    from tprobe.cluster.slurm import extract_array

    p = ctx.params
    if shard != "0/1":
        raise TprobeError("--shard is for one worker; with --executor slurm give --shards N instead")
    if not shards:
        raise TprobeError("--executor slurm needs --shards N (array tasks; e.g. the number of GPUs)")
    options = sbatch_options(slurm)
    ctx.params["canvas"] = pre.config.canvas  # the (maybe rounded) canvas, so the tasks key the same store
    if p["precision"] == "auto":  # resolved here, so the tasks (maybe on GPUs) write the store watched here
        ctx.params["precision"] = "fp16" if slurm["gpus_per_task"] else "fp32"
    tokens = token_names(p["tokens"])
    path = store_path(
        p["cache"],
        pre,
        ref,
        p["dtype"],
        p["fmt"],
        ctx.params["precision"],
        tokens,
        layers=p["layers"],
        patch_layers=p["patch_layers"],
    )
    res = extract_array(
        forward_args(ctx),
        path,
        rows=len(pre.kept),
        chunk_rows=p["chunk_rows"],
        shards=shards,
        options=options,
        poll=slurm["poll"],
    )
    if res.status == "up to date":
        click.echo(f"up to date: {len(pre.kept)} rows already extracted for {ref.slug}; nothing submitted")
    else:
        jobs = ", ".join(res.job_ids) or "earlier jobs"
        click.echo(
            f"sealed: {len(pre.kept)} views in the store, written by SLURM array tasks ({jobs}) in "
            f"{res.seconds:.1f} s"
        )
    click.echo(str(path))
    finish(pre)


@main.command()
@click.option("--model", required=True, help="Alias (see `tprobe models`), hub id or local folder.")
@click.option("--revision", default=None, help="Hub branch, tag or commit [default: main].")
@data_options
@CACHE_OPTION
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
@DEVICE_OPTION
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Compute precision; auto = fp16 autocast on GPU, fp32 on CPU.",
)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (pays off on long runs).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this node, worker i taking --shard i/N of the store (as SLURM array "
    "tasks); each gets one device of --devices, or on CPU cores/N threads.",
)
@click.option(
    "--devices",
    default=None,
    metavar="I,J,...",
    help="GPUs for --workers (CUDA_VISIBLE_DEVICES of worker i: the i-th, round robin) [default: every "
    "visible GPU; none on CPU].",
)
@click.option(
    "--loader-workers",
    type=click.IntRange(min=0),
    default=None,
    help="Image-decoding processes per worker [default: 0 on CPU, up to 8 on GPU].",
)
@click.option(
    "--tokens",
    default="cls,registers,patches",
    show_default=True,
    help="Token arrays to store: any of cls, registers, patches (patches are ~98% of the bytes).",
)
@click.option(
    "--layers",
    default="-1",
    show_default=True,
    help="Blocks whose CLS and register tokens to store, e.g. -1,-4,-7 (-1 = last; each through the final "
    "layer norm); more than -1 adds a `layer` axis to the store.",
)
@click.option(
    "--patch-layers",
    default="-1",
    show_default=True,
    help="Blocks whose patch tokens to store (patches are ~98% of the bytes per layer).",
)
@click.option(
    "--compression",
    type=click.Choice(["zstd", "lz4", "none"]),
    default="zstd",
    show_default=True,
    help="Chunk compression (recorded in the store).",
)
@click.option(
    "--shard", default="0/1", show_default=True, help="Take units i::N of the store (SLURM arrays)."
)
@OFFLINE_OPTION
@slurm_options
@click.pass_context
def extract(
    ctx,
    model,
    revision,
    data,
    prep,
    cache,
    fmt,
    dtype,
    batch_size,
    chunk_rows,
    device,
    precision,
    compile_,
    workers,
    devices,
    loader_workers,
    tokens,
    layers,
    patch_layers,
    compression,
    shard,
    offline,
    executor,
    shards,
    **slurm,
):
    """Run every kept image view through a ViT (DINOv2, DINOv3, ...) once; store CLS, register, patch tokens.

    The store lands under cache/<dataset>/<preprocess-hash>/<model>@<revision>/; its path is the
    last line of stdout. Rerunning resumes an interrupted run, or says "up to date".

    \b
    Examples:
      tprobe extract --model dinov2-small-reg
      tprobe extract --model dinov2-base --data path/to/images --format hdf5
      tprobe extract --model ./my-local-dinov2 --batch-size 64 --dtype float32 --device cuda
      tprobe extract --model dinov2-small-reg --layers -1,-2,-3,-4,-7   # then probe --pool layers / last4
      tprobe extract --model dinov2-small-reg --workers 4 --devices 0,1,2,3   # one node, 4 GPUs
      tprobe extract --model dinov2-small-reg --executor slurm --shards 8 --partition gpu \\
          --gpus-per-task 1 --time 2:00:00     # one array job, task i runs --shard i/8
    """
    from tprobe.cache.extract import extract as run_extract
    from tprobe.models.backbones import resolve_model

    if executor == "local" and shards:
        raise TprobeError("--shards N is for --executor slurm; one local worker takes --shard i/N")
    if workers > 1 and (executor == "slurm" or shard != "0/1"):
        raise TprobeError(
            "--workers N runs --shard 0/N ... N-1/N itself on this node; leave out --shard and "
            "--executor slurm (or use --executor slurm --shards N instead of --workers)"
        )
    gpus = [d.strip() for d in devices.split(",")] if devices else []
    if devices and (not all(d.isdigit() for d in gpus) or workers == 1):
        raise TprobeError(f"--devices {devices!r}: give GPU indices like 0,1,2,3, with --workers N")
    if executor == "slurm":
        from tprobe.cluster.slurm import script_value

        sbatch_options(slurm)  # a line break in --partition, --time, --slurm-dir ... is refused up front
        script_value("--cache", Path(cache).absolute())
        script_value("the working directory", Path.cwd())
    ref = resolve_model(model, revision, offline=offline)
    pre = prepare_data(data, prep, progress=False, ref=ref)
    if executor == "slurm":
        return _extract_slurm(ctx, pre, ref, shard, shards, slurm)
    if workers > 1:
        return _extract_workers(ctx, pre, ref, workers, gpus)
    names = token_names(tokens)
    res = run_extract(
        pre,
        ref,
        cache=cache,
        fmt=fmt,
        dtype=dtype,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        device=device,
        precision=precision,
        compile=compile_,
        workers=loader_workers,
        shard=parse_shard(shard),
        offline=offline,
        tokens=names,
        compression=compression,
        layers=layers,
        patch_layers=patch_layers,
    )
    if ref.random_init:
        click.echo(RANDOM_NOTE)
    if res.status == "up to date":
        click.echo(f"up to date: {res.rows} rows already extracted for {ref.slug}")
    else:
        click.echo(
            f"{res.status}: {res.images} views in {res.seconds:.1f} s ({res.images_per_s:.1f} views/s); "
            f"{res.times.line()}"
        )
    click.echo(str(res.path))
    finish(pre)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--shards", type=int, default=1, show_default=True, help="Report per shard for N workers.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--deep",
    is_flag=True,
    help="Re-read every unit and compare it with the hash recorded when it was "
    "written (default: check that every chunk exists with its recorded size).",
)
def status(store, shards, as_json, deep):
    """Units done / pending (in total and per shard), seal state, key attributes and integrity of a store.

    Exits with status 2 when a chunk is missing, truncated or (--deep) altered.

    \b
    Examples:
      tprobe status cache/<dataset>/<hash>/<model>/float16-fp32-<rows>.zarr --shards 8
      tprobe status STORE --json
      tprobe status STORE --deep
    """
    import json

    from tprobe.cache.status import store_status

    st = store_status(store, shards=shards, deep=deep)
    click.echo(json.dumps(st.to_dict(), indent=2) if as_json else "\n".join(st.lines()))
    if not st.ok:
        raise SystemExit(2)


@main.command()
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--to",
    "to",
    type=click.Choice(["anndata", "parquet"]),
    required=True,
    help="anndata: .h5ad (obs, obsm X_<pool>, uns provenance); parquet: one list column per pooling.",
)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never the store or its manifest).")
def export(store, to, out, overwrite):
    """Export a store's manifest and pooled features (cls, mean, registers, cls+mean) for other tools.

    \b
    Examples:
      tprobe export cache/.../float16-fp32-1a2b3c4d.zarr --to anndata cells.h5ad
      tprobe export cache/.../float16-fp32-1a2b3c4d.zarr --to parquet cells.parquet
    """
    from tprobe.cache.export import export as run_export

    click.echo(str(run_export(store, to, out, overwrite=overwrite)))


main.add_command(probe.probe)
main.add_command(probe.predict)
main.add_command(science.curve)
main.add_command(science.map_)
main.add_command(science.report)
main.add_command(train.finetune)
main.add_command(train.saliency)
main.add_command(train.baseline)

if __name__ == "__main__":  # pragma: no cover
    main()
