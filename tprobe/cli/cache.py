"""The cache commands: ``extract`` (embed every kept view once), ``status`` and ``export`` of a store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import click

from tprobe.cache.keys import COMPRESSIONS, DEFAULT_COMPRESSION, DTYPES, EXPORT_FORMATS, FORMATS, PRECISIONS
from tprobe.cli.echo import finish
from tprobe.cli.options import (
    CACHE_OPTION,
    DEVICE_OPTION,
    OFFLINE_OPTION,
    SLURM_PARAMS,
    data_options,
    forward_args,
    given,
    parse_shard,
    refuse_unused,
    sbatch_options,
    slurm_options,
)
from tprobe.models.random_weights import NOTE as RANDOM_NOTE

SBATCH_PARAMS = tuple(p for p in SLURM_PARAMS if p not in ("executor", "shards"))  # -> SlurmOptions, poll


@click.command()
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
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="zarr", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
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
    type=click.Choice(PRECISIONS),
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
    type=click.Choice(COMPRESSIONS),
    default=DEFAULT_COMPRESSION,
    show_default=True,
    help="Chunk compression (Blosc level 3, byte shuffle; recorded in the store).",
)
@click.option(
    "--shard", default="0/1", show_default=True, help="Take units i::N of the store (SLURM arrays)."
)
@OFFLINE_OPTION
@slurm_options
@click.pass_context
def extract(ctx, model, data, prep, shard, compile_, **kw):
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
    from tprobe import api
    from tprobe.models.backbones import expand_models

    models = expand_models(model)
    if len(models) > 1:
        refuse_unused(MANY_MODELS_RULES)
    else:
        ctx.params["model"] = models[0]  # one model: as before (its workers / array tasks rerun it)
    slurm = {k: kw.pop(k) for k in SBATCH_PARAMS}
    res = api.extract(
        data,
        models if len(models) > 1 else models[0],
        config=prep,
        **({"canvas": prep.canvas} if given("canvas") else {}),  # a canvas given is kept as given
        shard=parse_shard(shard),
        compile=compile_,
        slurm=sbatch_options(slurm) if kw["executor"] == "slurm" else None,  # refused before any work
        poll=slurm["poll"],
        task_args=forward_args(ctx) if len(models) == 1 else None,  # several: one pass here, no tasks
        **kw,
    )
    results = res if isinstance(res, list) else [res]  # several models: one result each
    skipped = list(dict.fromkeys(s for r in results for s in r.skipped))
    for s in skipped:
        click.echo(f"skipped: {s}", err=True)
    for line in _many_summary(results) if len(results) > 1 else _summary(res):
        click.echo(line)
    finish(SimpleNamespace(skipped=skipped))


MANY_MODELS_RULES = [
    ("revision", False, "with several --model (give each hub model's revision in its own command)"),
    ("workers", False, "with several --model (run one model per command to use --workers)"),
    ("devices", False, "with several --model"),
    ("executor", False, "with several --model (run one model per command on SLURM)"),
    ("shards", False, "with several --model (run one model per command on SLURM)"),
]


def _many_summary(results) -> list[str]:
    """Several models: a line per model, the random-weights note, then each store's path (in --model order)."""
    lines = [
        f"{r.model.name}: up to date: {r.rows} rows already extracted for {r.model.slug}"
        if r.status == "up to date"
        else f"{r.model.name}: {r.status}: {r.images} views in {r.seconds:.1f} s; {r.times.line()}"
        for r in results
    ]
    lines += [RANDOM_NOTE] * any(r.model.random_init for r in results)
    return [*lines, *(str(r.path) for r in results)]


def _summary(res) -> list[str]:
    """The lines extract prints: the random-weights note, what ran, and the store's path last."""
    n, slug, random = res.rows, res.model.slug, res.model.random_init
    if res.executor == "slurm":
        jobs = ", ".join(res.job_ids) or "earlier jobs"
        done = f"sealed: {n} views in the store, written by SLURM array tasks ({jobs}) in {res.seconds:.1f} s"
        up = f"up to date: {n} rows already extracted for {slug}; nothing submitted"
        lines = [up if res.status == "up to date" else done]
    elif res.workers > 1:
        where = f"GPUs {','.join(res.devices)}" if res.devices else "CPU"
        done = (
            f"{res.status}: {n} views in the store, {res.workers} workers on {where} in {res.seconds:.1f} s"
        )
        up = f"up to date: {n} rows already extracted for {slug}; no worker started"
        lines = [up] if res.status == "up to date" else [RANDOM_NOTE] * random + [done]
    else:
        done = f"{res.status}: {res.images} views in {res.seconds:.1f} s ({res.images_per_s:.1f} views/s); "
        up = f"up to date: {n} rows already extracted for {slug}"
        lines = [RANDOM_NOTE] * random + [up if res.status == "up to date" else done + res.times.line()]
    return [*lines, str(res.path)]


@click.command()
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

    Exits with status 2 when a chunk is missing, truncated or (--deep) altered, or the rows check
    fails (the store's manifest is missing, unreadable, or lists other rows, labels or donors).

    \b
    Examples:
      tprobe status cache/<dataset>/<hash>/<model>/float16-fp32-<rows>.zarr --shards 8
      tprobe status STORE --json
      tprobe status STORE --deep
    """
    import json

    from tprobe import api

    st = api.status(store, shards=shards, deep=deep)
    click.echo(json.dumps(st.to_dict(), indent=2) if as_json else "\n".join(st.lines()))
    if not st.ok:
        raise SystemExit(2)


@click.command()
@click.argument("store", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--to",
    "to",
    type=click.Choice(EXPORT_FORMATS),
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
    from tprobe import api

    click.echo(str(api.export(store, to, out, overwrite=overwrite)))
