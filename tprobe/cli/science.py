"""`tprobe curve`, `tprobe map`, `tprobe report`: the questions asked of the features and of the runs."""

from __future__ import annotations

from pathlib import Path

import click

from tprobe.cli.inputs import feature_sources
from tprobe.cli.options import (
    CACHE_OPTION,
    NORMALIZE_OPTION,
    OFFLINE_OPTION,
    data_options,
    refuse_unused,
    source_options,
    source_rules,
    split_options,
    split_rules,
)
from tprobe.science import TRAIN_VIEWS


def _echo_curve(c) -> None:
    """A fitted curve on the console: each source and head, the AUC table, the random-weights notes."""
    import pandas as pd

    for f in c.fits_:
        n = f"{f['n_rows']} rows x {f['n_features']} features, {f['seconds']:.1f} s"
        click.echo(f"== {f['name']} · {f['head']}: {n}")
    click.echo("== mean ROC AUC over held-out donors [95% t-interval over donors]")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        click.echo(c.auc_table().to_string())
    for r in c.random_sources_:
        click.echo(f"note: {r} comes from a randomly initialised model: a plumbing check, not a result")


def _echo_report(res) -> None:
    """A report on the console: the measured and published tables, the lines, the paired comparisons."""
    from tprobe.runs.report import PUBLISHED
    from tprobe.stats import TEST_NOTE

    click.echo("== measured (mean ± sd over held-out donors; 95% CI: t-interval over donors)")
    click.echo(res.table.to_string(index=False))
    click.echo("== published reference numbers (not measured here)")
    click.echo(PUBLISHED.to_string(index=False, na_rep="–"))
    for line in res.headline:
        click.echo(line.replace("**", ""))
    click.echo(res.batch_confound.replace("`", ""))
    if len(res.paired):
        click.echo(
            "== paired comparisons: each run vs the pre-declared reference on the same held-out donors"
        )
        click.echo(res.reference_line.replace("`", ""))
        click.echo(res.paired.drop(columns=["AUC diff per donor"]).to_string(index=False))
        click.echo(f"{res.bound_line}\n{TEST_NOTE}")
    if len(res.map_signal):
        click.echo(
            "== donor and batch signal within each class (tprobe map folders; chance = the class's majority rate)"
        )
        click.echo(res.map_signal.to_string(index=False))


def _source_rules(src: dict):
    return source_rules(src["stores"], src["models"], src["features"], src["pixels"], src["data"])


@click.command()
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
    type=click.Choice(TRAIN_VIEWS),
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
def curve(head, shots, repeats, split, test_donor, train_views, seed, jobs, normalize, out, **src):
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
    from tprobe import api
    from tprobe.science.curve import parse_heads, parse_shots

    ks, heads = parse_shots(shots), parse_heads(head)
    many = "without --store/--model (tables and pixels have one view per cell)"
    stores = bool(src["stores"] or src["models"])
    refuse_unused([*_source_rules(src), ("train_views", stores, many), *split_rules(split)])
    c = api.curve(
        feature_sources(**src),
        head=heads,
        shots=ks,
        repeats=repeats,
        split=split,
        test_donor=test_donor,
        train_views=train_views,
        seed=seed,
        jobs=jobs,
        normalize=normalize,
    )
    run = c.save(out)
    _echo_curve(c)
    click.echo(str(run))


@click.command("map")
@source_options
@click.option("--no-umap", is_flag=True, help="PCA only (skips umap-learn).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
@CACHE_OPTION
@OFFLINE_OPTION
@data_options
def map_(no_umap, seed, out, **src):
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
    from tprobe import api

    refuse_unused(_source_rules(src))
    emap = api.map(feature_sources(**src), umap=not no_umap, seed=seed, data=src["data"], config=src["prep"])
    run = emap.save(out)
    for m in emap:
        d = m.diagnostics
        click.echo(
            f"== {m.name}: {d.n_cells} cells x {d.n_features} features"
            + (" (random weights: plumbing check)" if d.random_init else "")
        )
        for line in d.lines():
            click.echo(f"   {line}")
        if d.warning:
            click.echo(d.warning)
        click.echo(f"   map: {run / f'map-{m.stem}.png'}")
    click.echo(str(run))


@click.command()
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
    from tprobe import api

    res = api.report(runs_dir, out, reference=reference)
    for run in res.incomplete:
        click.echo(
            f"incomplete run {run}: no per_donor.parquet (interrupted?); left out of the report", err=True
        )
    _echo_report(res)
    for p in res.paths:
        click.echo(str(p))
