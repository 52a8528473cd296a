"""The ``tprobe`` command line: thin click commands over the library's public functions."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from tprobe import __version__
from tprobe.cli import probe, train
from tprobe.cli.echo import RANDOM_NOTE, finish
from tprobe.cli.inputs import feature_sources, prepare_data
from tprobe.cli.options import (
    CACHE_OPTION,
    DEVICE_OPTION,
    NORMALIZE_OPTION,
    OFFLINE_OPTION,
    data_options,
    forward_args,
    parse_shard,
    refuse_unused,
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


main.add_command(probe.probe)
main.add_command(probe.predict)
main.add_command(train.finetune)
main.add_command(train.saliency)
main.add_command(train.baseline)

if __name__ == "__main__":  # pragma: no cover
    main()
