"""The ``tprobe`` command line: thin click commands over the library's public functions."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from tprobe import __version__
from tprobe.cli.echo import RANDOM_NOTE, RUN_DETAIL, echo_table, finish, table_text
from tprobe.cli.inputs import feature_sources, prepare_data, table_source
from tprobe.cli.options import (
    CACHE_OPTION,
    DEVICE_OPTION,
    NORMALIZE_OPTION,
    OFFLINE_OPTION,
    TABLE_PARAMS,
    data_options,
    forward_args,
    parse_shard,
    prep_rules,
    refuse_unused,
    run_option,
    sbatch_options,
    slurm_options,
    source_options,
    source_rules,
    split_options,
    split_rules,
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
    from tprobe.models.backbones import ALIASES, FAMILIES, LAYOUT_TYPES

    for alias, hub in ALIASES.items():
        click.echo(f"{alias:20s} {hub}")
    for family, members in FAMILIES.items():  # extract --model FAMILY: every member in one pass
        click.echo(f"{family:20s} {' + '.join(members)} (one extract pass, one store each)")
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
@click.option(
    "--model",
    required=True,
    multiple=True,
    help="Alias (see `tprobe models`), hub id or local folder; repeat it (or a family alias such as "
    "dinov2-all) to feed several models in one pass, one store each.",
)
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
      tprobe extract --model dinov2-small --model dinov2-base   # one pass, one store each (or dinov2-all)
      tprobe extract --model dinov2-small-reg --workers 4 --devices 0,1,2,3   # one node, 4 GPUs
      tprobe extract --model dinov2-small-reg --executor slurm --shards 8 --partition gpu \\
          --gpus-per-task 1 --time 2:00:00     # one array job, task i runs --shard i/8
    """
    from tprobe.cache.extract import extract as run_extract
    from tprobe.models.backbones import expand_models, resolve_model

    models = expand_models(model)
    if len(models) > 1:
        return _extract_many(ctx, models, data, prep)
    ctx.params["model"] = model = models[0]  # one model: as before
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


def _extract_many(ctx, models, data, prep):
    """Several --model: one pass per patch size (:func:`~tprobe.cache.extract.extract_many`), one store each."""
    from tprobe.cache.extract import extract_many, group_by_patch
    from tprobe.models.backbones import resolve_model

    p = ctx.params
    refuse_unused(
        [
            ("revision", False, "with several --model (give each hub model's revision in its own command)"),
            ("workers", False, "with several --model (run one model per command to use --workers)"),
            ("devices", False, "with several --model"),
            ("executor", False, "with several --model (run one model per command on SLURM)"),
            ("shards", False, "with several --model (run one model per command on SLURM)"),
        ]
    )
    refs = [resolve_model(m, offline=p["offline"]) for m in models]
    paths = []
    for group in group_by_patch(refs):
        pre = prepare_data(data, prep, progress=False, ref=group[0])
        results = extract_many(
            pre,
            group,
            **{k: p[k] for k in ("cache", "fmt", "dtype", "batch_size", "chunk_rows", "device", "precision")},
            **{k: p[k] for k in ("offline", "compression", "layers", "patch_layers")},
            compile=p["compile_"],
            workers=p["loader_workers"],
            shard=parse_shard(p["shard"]),
            tokens=token_names(p["tokens"]),
        )
        for ref, res in zip(group, results, strict=True):
            if res.status == "up to date":
                click.echo(f"{ref.name}: up to date: {res.rows} rows already extracted for {ref.slug}")
            else:
                click.echo(
                    f"{ref.name}: {res.status}: {res.images} views in {res.seconds:.1f} s; {res.times.line()}"
                )
            paths.append(str(res.path))
    if any(r.random_init for r in refs):
        click.echo(RANDOM_NOTE)
    click.echo("\n".join(paths))  # one store per model, in --model order within each patch size
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
@click.option(
    "--model",
    default=("dinov2-small-reg",),
    multiple=True,
    show_default=True,
    help="Model whose cached store to use (alias, hub id or local folder); repeat it (or a family alias "
    "such as dinov2-all) to sweep each model's store.",
)
@click.option("--revision", default=None, help="Hub revision of --model.")
@click.option("--store", type=click.Path(path_type=Path), default=None, help="Use this store directly.")
@click.option(
    "--features",
    type=click.Path(path_type=Path),
    default=None,
    help="Your own feature table (CSV/Parquet, one row per image) instead of a store.",
)
@click.option("--id-column", default=None, help="Column of --features holding file names or image ids.")
@click.option(
    "--drop-columns",
    "--exclude",
    "exclude",
    multiple=True,
    help="Column of --features to leave out, beyond the identifier rule (repeatable).",
)
@click.option(
    "--keep-columns",
    multiple=True,
    help="Column of --features the identifier/position rule drops, to use anyway (repeatable).",
)
@click.option(
    "--all-table-rows",
    is_flag=True,
    help="Score every --features row naming an image, also images the quality filters removed.",
)
@click.option(
    "--head",
    default="logreg",
    show_default=True,
    help="logreg, mlp, xgboost, knn, prototype or all (every head).",
)
@click.option(
    "--pool",
    default="cls",
    show_default=True,
    help="cls, mean, registers, cls+mean, concat, all; with a --layers store also cls@-4 (one layer's CLS), "
    "last4 (DINOv2's linear eval) or layers (cls@ each stored layer, and the AUC-by-layer figure).",
)
@split_options
@click.option("--folds", default=5, show_default=True, help="Folds for --split group-kfold.")
@click.option("--tta", is_flag=True, help="Score each cell by its views' mean probability.")
@click.option(
    "--train-views",
    type=click.Choice(["orig", "all"]),
    default="orig",
    show_default=True,
    help="Train on original views only, or on every augmented view too (2-8x slower).",
)
@click.option(
    "--penalty", type=click.Choice(["l2", "l1"]), default="l2", show_default=True, help="logreg penalty."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--bootstrap", "n_boot", default=2000, show_default=True, help="Deprecated, ignored (CI: t over donors)."
)
@click.option("--no-final-head", is_flag=True, help="Skip refitting a head on all donors (no predict).")
@NORMALIZE_OPTION
@click.option(
    "--solver",
    type=click.Choice(["auto", "lbfgs", "torch"]),
    default="auto",
    show_default=True,
    help="logreg's solver: torch fits the whole C grid as one batched model (tprobe.probing.linear); auto "
    "uses it from 20,000 training cells up, scikit-learn's lbfgs below.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@CACHE_OPTION
@OFFLINE_OPTION
@data_options
@functools.partial(slurm_options, sweep=True)
@click.option(
    "--resume",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Finish the sweep folder of an earlier --executor slurm sweep: run only its missing pool x head "
    "tasks (as an array with --executor slurm, else here), then write its summary.",
)
@click.option(
    "--sweep-task", type=int, default=None, hidden=True, help="[array task] Run task i of --resume."
)
@click.pass_context
def probe(
    ctx,
    model,
    revision,
    store,
    features,
    id_column,
    exclude,
    keep_columns,
    all_table_rows,
    head,
    pool,
    split,
    test_donor,
    folds,
    tta,
    train_views,
    penalty,
    seed,
    n_boot,
    no_final_head,
    normalize,
    solver,
    out,
    cache,
    offline,
    data,
    prep,
    executor,
    resume,
    sweep_task,
    **slurm,
):
    """Train heads on cached features with donor-held-out nested CV; write run directories.

    Prints per-donor accuracy, balanced accuracy, average precision (beside the donor's
    prevalence), ROC AUC and F1, with mean ± sd and the frequency classifier. The last line of
    stdout is the run (or sweep) directory.

    \b
    Examples:
      tprobe probe --head logreg
      tprobe probe --head xgboost --model dinov2-base-reg --pool cls+mean
      tprobe probe --head mlp --pool registers --split test-donor --test-donor 4
      tprobe probe --head all --pool all                      # the sweep, one table
      tprobe probe --model dinov2-all --head all --pool all   # every variant's store, one sweep
      tprobe probe --head all --pool layers --store S.zarr    # which layer to probe: auc_by_layer.png
      tprobe probe --features cellprofiler.csv --id-column FileName_NADH
      tprobe probe --head all --pool all --executor slurm --partition cpu   # one array task per run
      tprobe probe --resume runs/20250101-120000-sweep --executor slurm     # only its missing runs
    """
    if resume is not None or sweep_task is not None:
        return _probe_resume(ctx, resume, sweep_task, executor, slurm)
    from tprobe.models.backbones import expand_models

    models = expand_models(model)
    if executor == "slurm":
        _probe_slurm_checks(features, out, slurm)
        if len(models) > 1:
            raise TprobeError("--executor slurm sweeps one store; give one --model per sweep")
    from tprobe.cache.store import POOLS
    from tprobe.models.tokens import LAYER_POOLS, is_pool
    from tprobe.probing.heads import HEADS
    from tprobe.probing.sweep import run_sweep, store_sources

    table = features is not None
    no_table = "with --features (the table is the features; `tprobe curve` compares a table with stores)"
    no_views = "with --features (a table has one row per image, no augmented views)"
    refuse_unused(
        [
            ("store", not table, no_table),
            *[(n, not table, no_table) for n in ("model", "revision")],
            ("pool", not table, "with --features (it pools a store's tokens)"),
            *[(n, not table, no_views) for n in ("tta", "train_views")],
            *[(n, store is None, "with --store (the store fixes the model)") for n in ("model", "revision")],
            *[(n, table, "without --features TABLE") for n in TABLE_PARAMS],
            *split_rules(split, with_folds=True),
            ("penalty", head in ("logreg", "all"), f"to --head {head} (only logreg has a penalty)"),
            *prep_rules(
                data is not None or store is None,
                "with --store and no --data (the store holds its own "
                "preprocessing; add --data to check the store against those images)",
            ),
        ]
    )
    heads = list(HEADS) if head == "all" else [head]
    pools = list(POOLS) if pool == "all" else [pool]
    for h in heads:
        if h not in HEADS:
            raise TprobeError(f"--head {h!r} is not one of {', '.join(HEADS)}, all")
    for p in pools:
        if p != "layers" and not is_pool(p):
            raise TprobeError(f"--pool {p!r} is not one of {', '.join(POOLS + LAYER_POOLS)}, all, layers")
    if pool == "layers" and features is not None:
        raise TprobeError("--pool layers pools a store's layers; drop --features or pick --store")
    if features is not None:
        pre = prepare_data(data, prep, progress=False)
        sources = [
            (
                "table",
                lambda _p: table_source(
                    features, pre.manifest, id_column, exclude, keep_columns, all_table_rows
                ),
            )
        ]
    else:
        if store is None:
            from tprobe.cache.extract import find_store
            from tprobe.models.backbones import resolve_model

            layered = pool == "layers" or any(p == "last4" or "@" in p for p in pools)
            found = {}
            for m in models:  # each model's store (several: a sweep over them all)
                ref = resolve_model(m, revision, offline=offline)
                pre = prepare_data(data, prep, progress=False, ref=ref)
                found[m] = find_store(cache, pre, ref, layered=layered)
            store = found[models[0]]
        elif data is not None:
            from tprobe.features.assemble import check_store_matches, store_patch

            check_store_matches(
                store, prepare_data(data, prep, progress=False, patch_size=store_patch(store))
            )
        if pool == "layers":
            from tprobe.cache.store import FeatureStore

            pools = FeatureStore.open(store).layer_pools()
        sources = store_sources(store, pools)
        if len(models) > 1 and features is None:
            from tprobe.cache.store import FeatureStore
            from tprobe.probing.sweep import model_sources

            sources = model_sources(
                [
                    (m, s, FeatureStore.open(s).layer_pools() if pool == "layers" else pools)
                    for m, s in found.items()
                ]
            )

    probe_kwargs = dict(
        split=split,
        test_donor=test_donor,
        n_splits=folds,
        tta=tta,
        train_views=train_views,
        penalty=penalty,
        seed=seed,
        n_boot=n_boot,
        final_head=not no_final_head,
        data=str(data) if data else None,
        normalize=normalize,
        solver=solver,
    )
    if executor == "slurm":
        from tprobe.probing.sweep import plan_sweep

        sweep = plan_sweep(store, pools, heads, out=out, probe_kwargs=probe_kwargs)
        click.echo(f"sweep folder {sweep}: one SLURM array task per pool x head", err=True)
        return _sweep_on_slurm(sweep, slurm)
    random_seen = []
    sweep = (
        len(heads) * len(sources) > 1
    )  # a sweep prints one summary table; each run's detail goes to its folder

    def report(ev):
        if ev.kind == "skip":
            click.echo(ev.message, err=True)
        elif ev.kind == "start" and not sweep:
            click.echo(f"== {ev.features.name} · {ev.head}: {ev.message}")
        elif ev.kind == "run":
            run = ev.run
            lines = (
                [
                    f"== {ev.features.name} · {ev.head}: {len(ev.features.meta)} rows x "
                    f"{ev.features.X.shape[1]} features"
                ]
                if sweep
                else []
            )
            if run.features_.source.random_init:
                random_seen.append(True)
                lines.append(f"   {RANDOM_NOTE}")
            lines.append(table_text(run.table()))
            lines.append(
                f"   accuracy, balanced accuracy, f1: {run.summary_['f1']['note']}; brier, ece: "
                "calibration (lower is better; ECE over 10 equal-width bins)"
            )
            chosen = "; ".join(f"fold {c['fold']}: {c['params']}" for c in run.chosen_)
            how = sorted({c.get("selection", "chosen by inner donor CV (mean AP)") for c in run.chosen_})
            lines.append(f"   grid {run.grid_} -> {' / '.join(how)}: {chosen}")
            lines.append(f"   {ev.message}")
            if sweep:
                (ev.path / RUN_DETAIL).write_text("\n".join(lines) + "\n")
            else:
                click.echo("\n".join(lines))

    res = run_sweep(sources, heads, out=out, progress=report, probe_kwargs=probe_kwargs)
    if res.is_sweep:
        click.echo(
            f"== sweep summary (mean over held-out donors); per-donor tables: {res.out}/<run>/{RUN_DETAIL}"
        )
        hide = ["run", "features"] if len(models) == 1 else ["run"]  # several models: which one is which
        echo_table(res.summary.drop(columns=hide, errors="ignore"))
        click.echo(f"   sweep wall time {res.seconds:.1f} s")
        if random_seen:
            click.echo(f"   {RANDOM_NOTE}")
    if res.runs or res.is_sweep:
        click.echo(str(res.out))


# ---- the probe sweep as a SLURM array (tprobe/probing/sweep.py plan/run_task/collect, tprobe/cluster/slurm.py sweep_array) ----
def _probe_slurm_checks(features, out, slurm):
    """Refusals before any work: a feature table, or a value that cannot go into an sbatch script."""
    from tprobe.cluster.slurm import script_value

    if features is not None:
        raise TprobeError(
            "--executor slurm sweeps a feature store (--store/--model); a --features table's "
            "sweep is small: run it without --executor slurm"
        )
    script_value("--out", Path(out).absolute())
    script_value("the working directory", Path.cwd())
    sbatch_options(slurm)


def _probe_resume(ctx, resume, sweep_task, executor, slurm):
    """--resume SWEEP [--sweep-task i]: one array task, or the missing tasks here / as an array, then collect."""
    from tprobe.probing.sweep import SweepPlan, missing_tasks, run_task

    if resume is None:
        raise TprobeError("--sweep-task i needs --resume SWEEP (the sweep folder whose task i to run)")
    given = [
        f"--{p.replace('_', '-')}"
        for p in ("model", "store", "features", "head", "pool", "out")
        if ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        raise TprobeError(
            f"--resume takes the sweep's own settings ({resume / 'sweep.json'}); leave out {', '.join(given)}"
        )
    if sweep_task is not None:
        click.echo(str(run_task(resume, sweep_task, progress=_echo_task_event)))
        return
    if executor == "slurm":
        _probe_slurm_checks(None, resume, slurm)
        return _sweep_on_slurm(resume, slurm)
    plan = SweepPlan.load(resume)
    for i in missing_tasks(resume, plan):
        run_task(resume, i, progress=_echo_task_event)
    _echo_collected(resume)


def _echo_task_event(ev):
    if ev.kind == "start":
        click.echo(f"== {ev.features.name} · {ev.head}: {ev.message}")
    elif ev.kind == "run":
        echo_table(ev.run.table())
        click.echo(f"   {ev.message}")


def _sweep_on_slurm(sweep, slurm):
    from tprobe.cluster.slurm import sweep_array

    sweep_array(sweep, options=sbatch_options(slurm), poll=slurm["poll"])
    _echo_collected(sweep)


def _echo_collected(sweep):
    from tprobe.probing.sweep import collect_sweep

    res = collect_sweep(sweep)
    for pool, why in res.skipped.items():
        click.echo(f"skipped pool {pool}: {why}", err=True)
    click.echo(f"== sweep summary (mean over held-out donors; {len(res.runs)} runs collected from {sweep})")
    echo_table(res.summary.drop(columns=["run", "features"], errors="ignore"))
    click.echo(f"   run time {res.seconds:.1f} s summed over the tasks")
    if res.random_init:
        click.echo(f"   {RANDOM_NOTE}")
    click.echo(str(res.out))


@main.command()
@source_options
@click.option(
    "--head",
    default="logreg",
    show_default=True,
    help="Head(s), comma-separated: logreg, mlp, xgboost, knn, prototype; or all.",
)
@click.option(
    "--shots",
    default="1,2,4,8,16,32,64,all",
    show_default=True,
    help="Labelled cells per class, comma-separated; all = every training cell.",
)
@click.option("--repeats", default=10, show_default=True, help="Draws per k (all is drawn once).")
@split_options
@click.option(
    "--train-views",
    type=click.Choice(["orig", "all"]),
    default="orig",
    show_default=True,
    help="Train on a drawn cell's original view, or on all its views (stores only).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--jobs", default=1, show_default=True, help="Parallel (fold, repeat) fits.")
@NORMALIZE_OPTION
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@CACHE_OPTION
@OFFLINE_OPTION
@data_options
def curve(
    stores,
    models,
    revision,
    pool,
    features,
    id_column,
    exclude,
    keep_columns,
    all_table_rows,
    pixels,
    head,
    shots,
    repeats,
    split,
    test_donor,
    train_views,
    seed,
    jobs,
    normalize,
    out,
    cache,
    offline,
    data,
    prep,
):
    """Label-efficiency curves: held-out-donor AUC against labelled cells per class, several sources.

    For each held-out donor, k cells per class are drawn from the training donors (a cell brings
    its views; nothing from the held-out donor), a head with fixed hyperparameters is fitted and
    scores the held-out donor; repeated --repeats times. Writes curve.parquet, draws.parquet,
    curve_band.csv and curve.png into a new folder; its path is the last line of stdout.

    \b
    Examples:
      tprobe curve --model dinov2-small-reg --pixels
      tprobe curve --store cache/.../float16-fp32-<rows>.zarr --features cellprofiler.csv --id-column FileName --pixels
      tprobe curve --pixels --head logreg,knn,prototype --shots 1,4,16,all --repeats 20
    """
    import pandas as pd

    from tprobe.runs.record import make_run_dir, write_json
    from tprobe.science.curve import LabelCurve, curve_band, is_random_source, plot_curves

    try:
        ks = tuple("all" if k.strip() == "all" else int(k) for k in shots.split(","))
    except ValueError:
        raise TprobeError(f"--shots {shots!r}: use comma-separated positive integers and all") from None
    from tprobe.probing.heads import HEADS

    heads = list(HEADS) if head == "all" else [h.strip() for h in head.split(",")]
    refuse_unused(
        [
            *source_rules(stores, models, features, pixels, data),
            (
                "train_views",
                bool(stores or models),
                "without --store/--model (tables and pixels have one view per cell)",
            ),
            *split_rules(split),
        ]
    )
    sources = feature_sources(
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
        keep_columns,
        all_table_rows,
    )
    results, draws, randoms, meta = [], [], [], []
    for fs in sources:
        if is_random_source(fs.source):
            randoms.append(fs.name)
        for h in heads:
            c = LabelCurve(
                head=h,
                shots=ks,
                repeats=repeats,
                seed=seed,
                split=split,
                test_donor=test_donor,
                train_views=train_views,
                n_jobs=jobs,
                normalize=normalize,
            ).fit(fs)
            click.echo(
                f"== {fs.name} · {h}: {len(fs.meta)} rows x {fs.X.shape[1]} features, {c.seconds_:.1f} s"
            )
            results.append(c.results_)
            draws.append(c.draws_.assign(head=h))
            meta.append({"source": fs.source, "head": h, "seconds": round(c.seconds_, 2)})
    res = pd.concat(results, ignore_index=True)
    run = make_run_dir(out, "curve")
    res.to_parquet(run / "curve.parquet", index=False)
    pd.concat(draws, ignore_index=True).to_parquet(run / "draws.parquet", index=False)
    band = curve_band(res)
    band.to_csv(run / "curve_band.csv", index=False)
    plot_curves(res, run / "curve.png", random_sources=randoms)
    write_json(
        run / "config.json",
        {
            "command": "curve",
            "heads": heads,
            "shots": list(ks),
            "repeats": repeats,
            "seed": seed,
            "split": split,
            "test_donor": test_donor,
            "train_views": train_views,
            "normalize": normalize,
            "sources": meta,
            "random_init_sources": randoms,
        },
    )
    click.echo("== mean ROC AUC over held-out donors [95% t-interval over donors]")
    band = band.assign(
        auc=[
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
            for m, lo, hi in zip(band["mean"], band["low"], band["high"], strict=True)
        ]
    )
    wide = band.pivot(index=["source", "head"], columns="shots", values="auc")
    wide = wide[[str(k) for k in ks if str(k) in wide.columns]]
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        click.echo(wide.to_string())
    for r in randoms:
        click.echo(f"note: {r} comes from a randomly initialised model: a plumbing check, not a result")
    click.echo(str(run))


@main.command("map")
@source_options
@click.option("--no-umap", is_flag=True, help="PCA only (skips umap-learn).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@CACHE_OPTION
@OFFLINE_OPTION
@data_options
def map_(
    stores,
    models,
    revision,
    pool,
    features,
    id_column,
    exclude,
    keep_columns,
    all_table_rows,
    pixels,
    no_umap,
    seed,
    out,
    cache,
    offline,
    data,
    prep,
):
    """Embedding map (PCA, UMAP) coloured by label, donor and imaging batch, with donor diagnostics.

    Prints and saves how well activation, donor and batch can be predicted from the features (same
    classifier, CV grouped by cell, against the majority-class rate) and silhouettes by label, donor
    and batch, and donor and batch within each class against that class's own chance (every batch holds one
    class); warns when donor or batch within class is more predictable than activation. Writes map-<source>.png,
    map-<source>.parquet (coordinates) and diagnostics.json; the folder is the last line of stdout.

    \b
    Examples:
      tprobe map --model dinov2-small-reg
      tprobe map --store cache/.../float16-fp32-<rows>.zarr --pool mean --pixels
    """
    from tprobe.plot.figures import source_label
    from tprobe.runs.record import inside, make_run_dir, safe_name, write_json
    from tprobe.science.curve import is_random_source
    from tprobe.science.embedmap import diagnose, embed, map_data, plot_map

    refuse_unused(source_rules(stores, models, features, pixels, data))
    sources = feature_sources(
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
        keep_columns,
        all_table_rows,
    )
    manifest = None  # tables and pixels take the batch column from the data's manifest (stores: their own)
    run = make_run_dir(out, "map")
    diags = []
    for fs in sources:
        if fs.source.get("kind") != "store" and manifest is None:
            manifest = prepare_data(data, prep, progress=False).manifest
        md = map_data(fs, manifest if fs.source.get("kind") != "store" else None)
        diag = diagnose(md, seed=seed)
        diag["random_init"] = is_random_source(fs.source)
        coords = embed(md, umap=not no_umap, seed=seed)
        safe = safe_name(fs.name)
        coords.to_parquet(inside(run, f"map-{safe}.parquet"), index=False)
        what = "pooled tokens" if fs.source.get("kind") == "store" else "features"
        title = f"{source_label(fs.name)}: {diag['n_cells']} cells (original views), {what}" + (
            " — random weights: plumbing check" if diag["random_init"] else ""
        )
        plot_map(coords, diag, inside(run, f"map-{safe}.png"), title=title)
        diags.append(diag)
        click.echo(
            f"== {fs.name}: {diag['n_cells']} cells x {diag['n_features']} features"
            + (" (random weights: plumbing check)" if diag["random_init"] else "")
        )
        for t, v in diag["predictability"].items():
            if v["accuracy"] is not None:
                given = (
                    f", {v['chance_given_class']:.3f} knowing the class alone"
                    if "chance_given_class" in v
                    else ""
                )
                click.echo(
                    f"   {t:<10s} predicted with accuracy {v['accuracy']:.3f} (chance {v['chance']:.3f}{given}, "
                    f"{v['n_classes']} classes; skill {v['skill']:.2f})"
                )
        for t, w in diag["within_class"].items():
            sk = "–" if w["skill"] is None else f"{w['skill']:.2f}"
            click.echo(
                f"   {t:<10s} within each class: accuracy {w['accuracy']:.3f} (chance within class "
                f"{w['chance']:.3f}; skill {sk})"
            )
        sil = ", ".join(f"{k} {v:.3f}" for k, v in diag["silhouette"].items() if v is not None)
        click.echo(f"   silhouette (cosine): {sil}")
        if diag["warning"]:
            click.echo(diag["warning"])
        click.echo(f"   map: {run / f'map-{safe}.png'}")
    write_json(run / "diagnostics.json", diags)
    click.echo(str(run))


@main.command()
@run_option("probe")
@click.argument("images", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV to write [default: <run>/predictions-<images-folder>.csv].",
)
@click.option("--threshold", default=0.5, show_default=True, help="p_activated at or above -> activated.")
@click.option(
    "--masks",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="IMAGES are fields of view and this folder their label images (same pairing as preprocess "
    "--fov): one row per object and an overlay PNG per field in <csv>-overlays/.",
)
@CACHE_OPTION
@DEVICE_OPTION
@OFFLINE_OPTION
def predict(run_dir, images, out, threshold, masks, cache, device, offline):
    """Label new images with a trained run: path, p_activated, label (CSV).

    Images that fail the quality filters are listed with the reason, not dropped.

    \b
    Example:
      tprobe predict --run runs/20261125-101500-dinov2-small-reg-cls-logreg new_plate/
    """
    from tprobe.probing.predict import predict as run_predict
    from tprobe.runs.record import inside, safe_name

    out = out or inside(run_dir, f"predictions-{safe_name(Path(images).resolve().name)}.csv")
    overlays = Path(out).with_name(Path(out).stem + "-overlays") if masks is not None else None
    table = run_predict(
        run_dir,
        images,
        cache=cache,
        device=device,
        offline=offline,
        threshold=threshold,
        masks=masks,
        overlays=overlays,
    )
    table.to_csv(out, index=False)
    kept = table["kept"].sum()
    if table["model_random_init"].any():
        click.echo(RANDOM_NOTE)
    what = "objects" if masks is not None else "images"
    click.echo(f"{kept} of {len(table)} {what} scored; {int((table['label'] == 1).sum())} activated")
    for rec in table[~table["kept"]].itertuples():
        where = f"{rec.field} object {rec.object}" if masks is not None else rec.path
        click.echo(f"not scored: {where}: {rec.drop_reason}", err=True)
    if overlays is not None:
        click.echo(f"overlays: {overlays}")
    click.echo(str(out))


@main.command()
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
@click.option(
    "--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True
)
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
def finetune(
    model,
    revision,
    pool,
    freeze,
    unfreeze_last,
    epochs,
    batch_size,
    lr_backbone,
    lr_head,
    weight_decay,
    patience,
    pos_weight,
    split,
    test_donor,
    device,
    precision,
    seed,
    saliency_n,
    out,
    resume,
    offline,
    data,
    prep,
):
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
    from tprobe.models.backbones import resolve_model
    from tprobe.runs.record import make_run_dir
    from tprobe.train.finetune import FinetuneRun
    from tprobe.train.loop import TrainConfig

    try:
        pw = None if pos_weight == "none" else (pos_weight if pos_weight == "auto" else float(pos_weight))
    except ValueError:
        raise TprobeError(f"--pos-weight {pos_weight!r}: use auto, none or a number") from None
    if resume is not None:  # the run's own options win: a resumed run must train what it started
        from tprobe.runs.record import RunRecord

        old = RunRecord.load(resume)
        if old.command != "finetune":
            raise TprobeError(
                f"{resume}: is not a `tprobe finetune` run; --resume continues fine-tuning runs"
            )
        click.echo(f"resuming {resume} with its recorded options (command-line training options ignored)")
        o = old.options
        model, revision, pool, freeze = old.features.model_source, None, o["pool"], o["freeze"]
        recorded_name = old.features.model  # `./m` or an alias as first given: the record must match
        unfreeze_last, split, test_donor, data = o["unfreeze_last"], o["split"], o["test_donor"], old.data
        prep = old.preprocess_config()
        cfg = TrainConfig(**o["train"])
    else:
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr_head=lr_head,
            lr_backbone=lr_backbone,
            weight_decay=weight_decay,
            patience=patience,
            pos_weight=pw,
            seed=seed,
            precision=precision,
        )
    ref = resolve_model(model, revision, offline=offline)
    if resume is not None and recorded_name:
        import dataclasses

        ref = dataclasses.replace(ref, name=recorded_name)
    pre = prepare_data(data, prep, progress=False, ref=ref)
    job = FinetuneRun(
        ref,
        pool=pool,
        freeze=freeze,
        unfreeze_last=unfreeze_last,
        split=split,
        test_donor=test_donor,
        device=device,
        train=cfg,
        data=str(data) if data else None,
    )
    run = resume or make_run_dir(out, job.record(pre).name)

    def log(row):
        click.echo(
            "   " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        )

    job.fit(pre, run, log=log)
    if ref.random_init:  # beside the results, where a reader looks (a refusal stays one line)
        click.echo(f"   {RANDOM_NOTE}")
    echo_table(job.evaluation_.table())
    if saliency_n:
        from tprobe.train.saliency_report import saliency_for_run

        for path in saliency_for_run(run, pre, n=saliency_n):
            click.echo(f"saliency: {path}")
    click.echo(str(run))


@main.command()
@run_option("finetune")
@click.option("--n", default=8, show_default=True, help="Images per grid (half right, half wrong calls).")
def saliency(run_dir, n):
    """Saliency grids (gradient, gradient x input, CLS attention) for right and wrong calls per donor.

    \b
    Example:
      tprobe saliency --run runs/<run-id> --n 8
    """
    from tprobe.train.saliency_report import saliency_for_run

    for path in saliency_for_run(run_dir, None, n=n):
        click.echo(f"saliency: {path}")


@main.command()
@click.option(
    "--name",
    default="all",
    show_default=True,
    help="frequency, pixel-logreg, pixel-mlp, lenet, inception-frozen, inception-finetuned, or all (the first "
    "four).",
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
def baseline(
    name, split, test_donor, epochs, inception_weights, inception_size, device, seed, n_boot, out, data, prep
):
    """Wang et al.'s baselines on the same splits and run-directory schema as `tprobe probe`.

    \b
    Examples:
      tprobe baseline --name all
      tprobe baseline --name lenet --epochs 40 --split test-donor --test-donor 4
      tprobe baseline --name inception-frozen
      tprobe baseline --name inception-finetuned --epochs 10 --device cuda
      tprobe baseline --name inception-frozen --inception-weights random --inception-size 75
    """
    from tprobe.train.baselines import ALL, BASELINES, INCEPTION, run_baseline

    names = list(ALL) if name == "all" else [name]
    for n in names:
        if n not in BASELINES:
            raise TprobeError(f"--name {n!r} is not one of {', '.join(BASELINES)}, all")
    inception, trained = any(n in INCEPTION for n in names), {"lenet", "inception-finetuned"} & set(names)
    refuse_unused(
        [
            ("inception_weights", inception, f"to --name {name} (only the inception-* baselines)"),
            ("inception_size", inception, f"to --name {name} (only the inception-* baselines)"),
            (
                "epochs",
                bool(trained),
                f"to --name {name} (only lenet and inception-finetuned train for epochs)",
            ),
            *split_rules(split),
        ]
    )
    if any(n in INCEPTION for n in names):  # before any work: an unreachable hub fails at once
        from tprobe.models.inception import check_size, resolve_weights

        prep.require_one_image("the Inception baselines")  # before the hub is contacted
        check_size(inception_size)
        inception_weights = resolve_weights(inception_weights)
    pre = prepare_data(data, prep, progress=False)
    for n in names:
        click.echo(f"== baseline {n}")
        run, ev = run_baseline(
            n,
            pre,
            out,
            split=split,
            test_donor=test_donor,
            seed=seed,
            n_boot=n_boot,
            epochs=epochs,
            device=device,
            inception_weights=inception_weights,
            inception_size=inception_size,
            data=str(data) if data else None,
        )
        if n in INCEPTION and inception_weights.random_init:
            click.echo(f"   {RANDOM_NOTE}")
        echo_table(ev.table())
        click.echo(str(run))


@main.command()
@click.argument("runs_dir", type=click.Path(path_type=Path, exists=True), default=Path("runs"))
@click.option("--out", type=click.Path(path_type=Path), default=Path("report"), show_default=True)
@click.option(
    "--reference",
    default=None,
    help="Run folder name every other run is compared with (declare it before looking). Default: the "
    "logreg probe on CLS tokens, else the frequency baseline, else the first run folder by path.",
)
def report(runs_dir, out, reference):
    """Collect run directories into one table + figures: report.md, report.html, summary.parquet.

    Paired comparisons: every run against one reference fixed in advance (--reference, or the
    default rule, which reads no result), exact sign-flip test, Holm across those comparisons.

    \b
    Examples:
      tprobe report runs/ --out report/
      tprobe report runs/ --reference 20250101-120000-dinov2-small-reg-cls-logreg
    """
    from tprobe.runs.report import PUBLISHED, write_report
    from tprobe.stats import TEST_NOTE

    res = write_report(runs_dir, out, reference=reference)
    for run in res["incomplete"]:
        click.echo(
            f"incomplete run {run}: no per_donor.parquet (interrupted?); left out of the report", err=True
        )
    click.echo("== measured (mean ± sd over held-out donors; 95% CI: t-interval over donors)")
    click.echo(res["table"].to_string(index=False))
    click.echo("== published reference numbers (not measured here)")
    click.echo(PUBLISHED.to_string(index=False, na_rep="–"))
    for line in res["headline"]:
        click.echo(line.replace("**", ""))
    click.echo(res["batch_confound"].replace("`", ""))
    if len(res["paired"]):
        click.echo(
            "== paired comparisons: each run vs the pre-declared reference on the same held-out donors"
        )
        click.echo(res["reference_line"].replace("`", ""))
        click.echo(res["paired"].drop(columns=["AUC diff per donor"]).to_string(index=False))
        click.echo(res["bound_line"])
        click.echo(TEST_NOTE)
    if len(res["map_signal"]):
        click.echo(
            "== donor and batch signal within each class (tprobe map folders; chance = the class's majority rate)"
        )
        click.echo(res["map_signal"].to_string(index=False))
    for p in res["paths"]:
        click.echo(str(p))


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


if __name__ == "__main__":  # pragma: no cover
    main()
