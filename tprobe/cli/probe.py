"""``tprobe probe`` and ``tprobe predict``: parse, refuse what does not apply, one api call, echo."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from tprobe.cli.echo import echo_table
from tprobe.cli.options import (
    CACHE_OPTION,
    DEVICE_OPTION,
    NORMALIZE_OPTION,
    OFFLINE_OPTION,
    SLURM_PARAMS,
    TABLE_PARAMS,
    data_options,
    given,
    prep_rules,
    refuse_unused,
    run_option,
    sbatch_options,
    slurm_options,
    split_options,
    split_rules,
)
from tprobe.errors import TprobeError
from tprobe.models.random_weights import NOTE as RANDOM_NOTE


@click.command()
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
def probe(store, features, pool, prep, no_final_head, **kw):
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
    from tprobe import api

    slurm = {k: kw.pop(k) for k in SLURM_PARAMS if k in kw}
    executor, poll = slurm["executor"], slurm["poll"]
    options = sbatch_options(slurm) if executor == "slurm" else None  # a bad sbatch value: refused first
    if kw["resume"] is not None or kw["sweep_task"] is not None:
        _refuse_resume_settings(kw["resume"])
    else:
        refuse_unused(_probe_rules(store, features, kw["head"], kw["split"], kw["data"]))
    kw["model"] = list(kw["model"]) if len(kw["model"]) > 1 else kw["model"][0]
    res = api.probe(
        features or store,
        pool=None if features else pool,
        config=prep,
        canvas_set=given("canvas"),
        final_head=not no_final_head,
        executor=executor,
        slurm=options,
        poll=poll,
        progress=_echo_task_event if kw["resume"] is not None else _Report(),
        **kw,
    )
    _echo_result(res)


def _probe_rules(store, features, head, split, data):
    """The options `probe` refuses when they do not apply (tprobe.cli.options.refuse_unused)."""
    table = features is not None
    no_table = "with --features (the table is the features; `tprobe curve` compares a table with stores)"
    no_views = "with --features (a table has one row per image, no augmented views)"
    return [
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


def _refuse_resume_settings(resume):
    """--resume takes the sweep's settings from its sweep.json: the options that set them are refused."""
    names = ("model", "store", "features", "head", "pool", "out")
    named = [f"--{p.replace('_', '-')}" for p in names if given(p)]
    if resume is not None and named:
        raise TprobeError(
            f"--resume takes the sweep's own settings ({resume / 'sweep.json'}); leave out {', '.join(named)}"
        )


class _Report:
    """A run's lines: on the console (one run), or into its folder's details.txt (a sweep, which prints
    one summary table instead); a table's notes before its first run."""

    def __init__(self):
        self.noted = set()

    def __call__(self, ev):
        sweep = ev.total > 1
        if ev.kind == "skip":
            click.echo(ev.message, err=True)
        elif ev.kind == "start":
            if ev.features.source.kind == "table" and ev.features.name not in self.noted:
                from tprobe.features.sources import table_note

                self.noted.add(ev.features.name)
                for line in table_note(ev.features.source):
                    click.echo(f"   {line}")
            if not sweep:
                click.echo(f"== {ev.features.name} · {ev.head}: {ev.message}")
        elif ev.kind == "run" and not sweep:  # a sweep wrote the run's lines to its details.txt
            click.echo("\n".join([*ev.run.details(), f"   {ev.message}"]))


def _echo_task_event(ev):
    """One task of a resumed sweep: its start line, its per-donor table and its run folder."""
    if ev.kind == "start":
        click.echo(f"== {ev.features.name} · {ev.head}: {ev.message}")
    elif ev.kind == "run":
        echo_table(ev.run.table())
        click.echo(f"   {ev.message}")


def _echo_result(res):
    """The sweep summary (a local sweep, or one collected from its tasks); the last line: the folder."""
    from tprobe.probing.sweep import RUN_DETAIL, SweepResult

    if not isinstance(res, SweepResult):  # one run, or one task of a sweep
        click.echo(str(getattr(res, "path_", res)))
        return
    for pool, why in res.skipped.items() if res.collected else ():
        click.echo(f"skipped pool {pool}: {why}", err=True)
    click.echo(
        f"== sweep summary (mean over held-out donors; {len(res.runs)} runs collected from {res.out})"
        if res.collected
        else f"== sweep summary (mean over held-out donors); per-donor tables: {res.out}/<run>/{RUN_DETAIL}"
    )
    several = "features" in res.summary and res.summary["features"].nunique() > 1  # which model is which
    echo_table(res.summary.drop(columns=["run"] if several else ["run", "features"], errors="ignore"))
    click.echo(
        f"   run time {res.seconds:.1f} s summed over the tasks"
        if res.collected
        else f"   sweep wall time {res.seconds:.1f} s"
    )
    if res.random_init:
        click.echo(f"   {RANDOM_NOTE}")
    click.echo(str(res.out))


@click.command()
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
    import pandas as pd

    from tprobe import api
    from tprobe.probing.predict import default_csv, overlay_folder

    out = out or default_csv(run_dir, images)
    table = api.predict(
        run_dir,
        images,
        out=out,
        threshold=threshold,
        masks=masks,
        cache=cache,
        device=device,
        offline=offline,
    )
    if table["model_random_init"].any():
        click.echo(RANDOM_NOTE)
    what = "objects" if masks is not None else "images"
    click.echo(
        f"{table['kept'].sum()} of {len(table)} {what} scored; {int((table['label'] == 1).sum())} activated"
    )
    for rec in table[~table["kept"]].itertuples():
        cut = masks is not None and pd.notna(rec.object)  # none: a field not cut into objects
        where = f"{rec.field} object {rec.object}" if cut else rec.field if masks is not None else rec.path
        click.echo(f"not scored: {where}: {rec.drop_reason}", err=True)
    if masks is not None:
        click.echo(f"overlays: {overlay_folder(out)}")
    click.echo(str(out))
