"""Collect run directories into one comparison table, with figures, as Markdown, Parquet/CSV and HTML.

Published reference numbers are a separate, labelled block and are never mixed with measured rows.
"""

from __future__ import annotations

import base64
import html
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from tprobe.errors import TprobeError
from tprobe.models.random_weights import MARK
from tprobe.runs.record import RunRecord, inside, read_json

log = logging.getLogger(__name__)
__all__ = [
    "Report",
    "build_report",
    "collect_runs",
    "write_report",
    "display_table",
    "choose_reference",
    "variant_table",
    "PUBLISHED",
    "RANDOM_MARK",
    "REFERENCE_RULE",
    "BATCH_CONFOUND",
]

# Published results, as reported (not measured here).
PUBLISHED = pd.DataFrame(
    [
        (
            "Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)",
            "frequency classifier",
            None,
            None,
            0.50,
        ),
        (
            "Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)",
            "pixel logistic regression",
            None,
            None,
            0.79,
        ),
        (
            "Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)",
            "one-layer NN on pixels",
            None,
            None,
            0.86,
        ),
        ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "LeNet", None, None, 0.93),
        (
            "Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)",
            "Inception v3 off-the-shelf",
            None,
            None,
            0.92,
        ),
        (
            "Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)",
            "Inception v3 fine-tuned",
            None,
            None,
            0.94,
        ),
        ("Wang et al. 2019, full data, held-out donors", "Inception v3 fine-tuned", 0.936, 0.964, 0.967),
        ("DINOv2 study, Table 3 (test)", "ViT-S/14 with registers, linear head", 0.922, 0.925, 0.916),
    ],
    columns=["source", "model", "accuracy", "average_precision", "roc_auc"],
)

METRICS = (
    "accuracy",
    "average_precision",
    "roc_auc",
    "brier",
    "ece",
)  # brier, ece: calibration (lower is better)


RANDOM_MARK = "PLUMBING CHECK: random weights, not a result"


def _family(record) -> tuple[str, str]:
    cmd, o, feats = record.command, record.options, record.features
    if cmd == "baseline":
        return "baseline", " · ".join(filter(None, [o.get("baseline", feats.name), record.channels_text]))
    model = " · ".join(filter(None, [record.model_name, record.channels_text]))  # + channel mode and names
    if cmd == "finetune":
        mode = (
            "frozen"
            if o.get("freeze")
            else (f"last {o['unfreeze_last']}" if o.get("unfreeze_last") else "full")
        )
        return "finetune", f"{model} · {feats.pool or o.get('pool')} · {mode}"
    if feats.kind in ("table", "pixels"):
        from tprobe.plot.figures import source_label

        return "probe", f"{source_label(feats.name)} · {o.get('head')}"
    return "probe", f"{model} · {feats.pool} · {o.get('head')}"


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run directory below ``root`` (any folder with config.json + metrics.json).

    Columns: family, model (model · pool · head), run_name (the run folder), random_init, command, head,
    pool (store runs), baseline (baseline runs), split,
    n_donors (the held-out donors the metric means average over: those with both classes, as
    :func:`~tprobe.probing.evaluate.auc_donors`), n_held_out (every held-out donor, one-class ones too),
    n_cells (cells scored, summed over held-out donors), ``<metric>_{mean,sd,ci_low,ci_high}``,
    run (path) and label (model + run name, unique per run).
    """
    rows, incomplete = [], []
    for metrics_path in sorted(Path(root).rglob("metrics.json")):
        run = metrics_path.parent
        if not (run / "config.json").exists():
            continue
        if not (run / "per_donor.parquet").exists():  # interrupted before its results were written
            log.info("incomplete run %s: no per_donor.parquet (interrupted?); left out of the report", run)
            incomplete.append(str(run))
            continue
        try:
            record, met = RunRecord.load(run), read_json(metrics_path)
            met["summary"].get  # noqa: B018 - a metrics.json without a summary dict is skipped
        except (TprobeError, KeyError, TypeError, AttributeError) as exc:
            log.warning("skipping %s: %s", run, exc)
            continue
        family, name = _family(record)
        folds = met.get("folds", [])
        row = {
            "family": family,
            "model": name,
            "run_name": run.name,
            "random_init": record.random_weights,
            "command": record.command,
            "head": record.options.get("head"),
            "pool": record.features.pool if record.features.kind == "store" else None,
            "baseline": record.options.get("baseline"),
            "split": record.options.get("split"),
            "n_donors": _donors_in_means(folds),
            "n_held_out": len(folds),
            "n_cells": int(sum(int(f.get("n") or 0) for f in folds)),
            "run": str(run),
        }
        for m in METRICS:
            s = met["summary"].get(m, {})
            for k in ("mean", "sd", "ci_low", "ci_high"):
                row[f"{m}_{k}"] = s.get(k)
        rows.append(row)
    if not rows:
        raise TprobeError(
            f"{root}: no run directories (readable metrics.json + config.json) found; run `tprobe probe` first"
        )
    rows = _one_per_task(rows)
    out = (
        pd.DataFrame(rows)
        .sort_values(["family", "roc_auc_mean"], ascending=[True, False])
        .reset_index(drop=True)
    )
    out["label"] = [
        f"{m} · {r}" + (f" · {MARK}" if rnd else "")
        for m, r, rnd in zip(out["model"], out["run_name"], out["random_init"], strict=True)
    ]
    out.attrs["incomplete"] = incomplete  # run folders left out: interrupted before per_donor.parquet
    return out


def _donors_in_means(folds: list) -> int:
    """How many held-out donors a run's metric means cover: those whose ROC AUC is defined (both classes),
    or every one when none is (:func:`tprobe.probing.evaluate.auc_donors`' rule)."""
    defined = [f for f in folds if isinstance(f.get("roc_auc"), int | float) and np.isfinite(f["roc_auc"])]
    return len(defined) if defined else len(folds)


# the headline and the "best run" figures rank runs whose means cover at least this many held-out donors
MIN_RANKED_DONORS = 2


def ranked_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs a "best run" is picked from: those whose means cover at least :data:`MIN_RANKED_DONORS`
    held-out donors (one donor's AUC has no spread to rank by), or every run when none does."""
    many = summary[summary["n_donors"] >= MIN_RANKED_DONORS]
    return many if len(many) else summary


def _top(runs: pd.DataFrame) -> pd.Series:
    """The run of ``runs`` with the highest mean ROC AUC."""
    return runs.loc[runs["roc_auc_mean"].astype(float).idxmax()]


def _one_per_task(rows: list[dict]) -> list[dict]:
    """One run per task of a planned sweep (a folder holding ``sweep.json``, :func:`tprobe.probing.sweep.plan_sweep`).

    A task run twice at once (a requeued array task and a local ``--resume``) leaves two complete run
    folders of one pool x head there; the one the task's record (``tasks/<i>.json``) names counts (else
    the first by path), the other is left out with a line."""
    tasks: dict[tuple, list[dict]] = {}
    for row in rows:
        run = Path(row["run"])
        if (run.parent / "sweep.json").is_file():  # sweep.PLAN_FILE (not imported: report starts light)
            tasks.setdefault((str(run.parent), row["pool"], row["head"]), []).append(row)
    dropped = set()
    for (sweep, pool, head), group in tasks.items():
        if len(group) < 2:
            continue
        named = set()
        for rec in sorted(Path(sweep, "tasks").glob("*.json")):
            try:
                named.add(read_json(rec)["row"]["run"])
            except (TprobeError, OSError, KeyError, TypeError):  # a damaged record names none
                continue
        keep = next((r for r in group if r["run_name"] in named), group[0])
        for row in group:
            if row is not keep:
                dropped.add(id(row))
                log.warning(
                    "%s: a second run of sweep task %s · %s (the task ran twice at once: a requeued array "
                    "task and a --resume?); left out of the report, which takes %s",
                    row["run"],
                    pool,
                    head,
                    keep["run_name"],
                )
    return [row for row in rows if id(row) not in dropped]


REFERENCE_RULE = (
    "the default reference is fixed by a rule that reads no result: the logistic-regression probe on CLS "
    "tokens (a model without random weights; with several, the first run folder by path), else the "
    "frequency baseline, else the first run folder by path (preferring runs without random weights); "
    "`tprobe report --reference NAME` sets it"
)

BATCH_CONFOUND = (
    "Batch confound: every imaging batch holds one class (all activated or all quiescent), so features "
    "that recognise the batch or the donor also separate the classes; only donor-held-out numbers count, "
    "and `tprobe map` reports donor and batch predictability within each class."
)


def choose_reference(summary: pd.DataFrame, name: str | None = None) -> tuple[str, str]:
    """The run every other run is compared with, and a sentence saying how it was chosen.

    ``name`` (``--reference``): a run folder's name, its path, or a part of its name matching one run
    only; a name matching no run, or several, is a one-line error. Without ``name`` the rule in
    :data:`REFERENCE_RULE` picks it; it never looks at a metric, so the comparisons are declared
    before the results are seen.
    """
    runs = summary.sort_values("run")
    if name is not None:
        hit = runs[(runs["run_name"] == name) | (runs["run"] == str(name))]
        if not len(hit):
            hit = runs[runs["run_name"].str.contains(str(name), regex=False)]
        if len(hit) != 1:
            have = ", ".join(runs["run_name"])
            what = (
                "matches no run"
                if not len(hit)
                else f"matches {len(hit)} runs ({', '.join(hit['run_name'])})"
            )
            raise TprobeError(f"--reference {name!r} {what}; use one run folder name of: {have}")
        return (
            hit["run"].iloc[0],
            f"`{hit['run_name'].iloc[0]}`, named with --reference (a comparison to fix before looking at the results)",
        )

    def col(c):
        return runs[c] if c in runs.columns else pd.Series(None, index=runs.index)

    logreg_cls = runs[
        (col("command") == "probe")
        & (col("head") == "logreg")
        & (col("pool") == "cls")
        & ~runs["random_init"].astype(bool)
    ]
    if len(logreg_cls):
        r = logreg_cls.iloc[0]
        why = "the logistic-regression probe on CLS tokens" + (
            f" (the first of {len(logreg_cls)} such runs by folder path)" if len(logreg_cls) > 1 else ""
        )
    else:
        freq = runs[(col("command") == "baseline") & (col("baseline") == "frequency")]
        if len(freq):
            r, why = freq.iloc[0], "the frequency baseline (no logistic-regression probe on CLS tokens here)"
        else:
            real = runs[~runs["random_init"].astype(bool)]
            r = (real if len(real) else runs).iloc[0]
            why = (
                "the first run folder by path (without random weights, if any): neither a logistic-regression "
                "probe on CLS tokens nor a frequency baseline is here"
            )
    return r["run"], f"`{r['run_name']}`, {why}; fixed by rule before the results were read"


def _fmt(mean, sd) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and not pd.isna(sd) else f"{mean:.3f}"


def _ci(lo, hi) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return "–"
    return f"[{lo:.3f}, {hi:.3f}]"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Printable table: mean ± sd over donors, the 95% CI of the mean (t over donors), and the status mark."""
    t = summary[["family", "model", "run_name", "n_donors", "n_held_out", "n_cells"]].copy()
    for m in METRICS:
        t[m] = [_fmt(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_sd"], strict=True)]
    for m, short in (("average_precision", "AP"), ("roc_auc", "AUC")):
        t[f"{short} 95% CI"] = [
            _ci(a, b) for a, b in zip(summary[f"{m}_ci_low"], summary[f"{m}_ci_high"], strict=True)
        ]
    t["status"] = [RANDOM_MARK if r else "result" for r in summary["random_init"]]
    return t


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join("–" if pd.isna(v) else str(v) for v in row) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def run_labels(summary: pd.DataFrame) -> list[str]:
    """Readable run labels for figures: ``model · pool · head`` (the ``model`` column), marked when random;
    runs sharing a label are told apart by what differs (split), else by their folder name."""
    base = [
        f"{m}" + (f" · {MARK}" if rnd else "")
        for m, rnd in zip(summary["model"], summary["random_init"], strict=True)
    ]
    out = []
    for i, b in enumerate(base):
        same = [j for j, o in enumerate(base) if o == b]
        if len(same) == 1:
            out.append(b)
            continue
        splits = summary["split"].iloc[same] if "split" in summary else pd.Series([None] * len(same))
        own = summary["split"].iloc[i] if "split" in summary else None
        if splits.nunique(dropna=False) == len(same) and own:
            out.append(f"{b} · {own}")
        else:
            out.append(f"{b} · {summary['run_name'].iloc[i]}")
    return out


def auc_axis(values, *, chance: float = 0.5) -> tuple[float, float]:
    """x limits of a per-donor AUC plot: 0-1 only when the values spread that wide; close values get an axis
    around them (10% margins), so their differences show."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return 0.0, 1.04
    vmin, vmax = float(v.min()), float(v.max())
    span = max(vmax - vmin, 0.1)
    lo, hi = max(0.0, vmin - 0.15 * span), min(1.0, vmax + 0.15 * span) + 0.02
    if lo <= chance + 0.1:  # chance is close: show it
        lo = min(lo, chance - 0.05)
    return lo, hi


@matplotlib.rc_context({"text.parse_math": False})  # a $ in a name is text, not mathtext
def _donor_auc_plot(summary: pd.DataFrame, out: Path) -> Path:
    """ROC AUC per held-out donor, one row per run; colour = donor (legend), bar = mean over donors."""
    import matplotlib.pyplot as plt

    pers = [pd.read_parquet(Path(run) / "per_donor.parquet") for run in summary["run"]]
    donors = sorted({d for per in pers for d in per["donor"]})
    colours = {d: plt.cm.tab10(i % 10) for i, d in enumerate(donors)}
    labels = run_labels(summary)
    width = 6.5 + 0.055 * max(len(s) for s in labels)
    fig, ax = plt.subplots(figsize=(width, 0.42 * len(summary) + 1.9))
    for i, per in enumerate(pers):
        ax.scatter(
            per["roc_auc"],
            [i] * len(per),
            s=22,
            alpha=0.85,
            c=[colours[d] for d in per["donor"]],
            edgecolors="none",
            zorder=3,
        )
        ax.plot([per["roc_auc"].mean()] * 2, [i - 0.32, i + 0.32], c="k", lw=1.6, zorder=4)
    ax.set_yticks(range(len(summary)))
    ax.set_yticklabels(labels, fontsize=7)
    for tick, rnd in zip(ax.get_yticklabels(), summary["random_init"], strict=True):
        if rnd:
            tick.set_color("firebrick")
    ax.invert_yaxis()
    lo, hi = auc_axis([a for per in pers for a in per["roc_auc"]])
    ax.set_xlim(lo, hi)  # room for points at 1.0
    chance_shown = lo < 0.5
    if chance_shown:
        ax.axvline(0.5, ls="--", c="grey", lw=0.8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=colours[d], label=d) for d in donors]
    handles += [Line2D([], [], c="k", lw=1.6, label="mean over donors")]
    if chance_shown:
        handles += [Line2D([], [], c="grey", ls="--", lw=0.8, label="chance (0.5)")]
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="held-out donor",
        title_fontsize=7,
        frameon=False,
    )
    ax.set_xlabel(
        "ROC AUC on the held-out donor (each point: one donor)"
        + ("" if chance_shown else f"; axis from {lo:.2f}, chance (0.5) is off it")
    )
    ax.set_title(
        "ROC AUC per held-out donor, by run (model · pooling · head; red: random weights, a plumbing check)",
        fontsize=9,
    )
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def variant_table(summary: pd.DataFrame, pairs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The model variants' comparison behind ``variants.png``: one row per store probe run (model x pool x
    head) when the runs hold store probes of two or more models, else empty.

    Columns: model (the model's short name: an alias or the local folder's name, never a path), pool,
    head, random_init, roc_auc mean/sd/CI, diff and Holm-adjusted p against the report's reference
    (``pairs``: :func:`tprobe.stats.paired_comparisons`), is_reference, run.
    """
    cols = ["command", "pool", "head"]
    if not all(c in summary for c in cols):
        return pd.DataFrame()
    probes = summary[(summary["command"] == "probe") & summary["pool"].notna()].copy()
    if not len(probes):
        return pd.DataFrame()
    probes["backbone"] = [RunRecord.load(run).model_name for run in probes["run"]]
    if probes["backbone"].nunique() < 2:
        return pd.DataFrame()
    auc = pairs[pairs["metric"] == "roc_auc"].set_index("run") if len(pairs) else pd.DataFrame()
    rows = []
    for r in probes.itertuples():
        hit = auc.loc[r.run] if len(auc) and r.run in auc.index else None
        rows.append(
            {
                "model": r.backbone,
                "pool": r.pool,
                "head": r.head,
                "random_init": bool(r.random_init),
                "roc_auc_mean": r.roc_auc_mean,
                "roc_auc_sd": r.roc_auc_sd,
                "roc_auc_ci_low": r.roc_auc_ci_low,
                "roc_auc_ci_high": r.roc_auc_ci_high,
                "n_donors": r.n_donors,
                "diff": np.nan if hit is None else hit["mean_diff"],
                "p_holm": np.nan if hit is None else hit["p_holm"],
                "is_reference": r.run == reference,
                "run": r.run,
            }
        )
    order = list(dict.fromkeys(probes.sort_values("run")["backbone"]))  # models in run-folder order
    out = pd.DataFrame(rows)
    out["_m"] = out["model"].map(order.index)
    return out.sort_values(["_m", "pool", "head"]).drop(columns="_m").reset_index(drop=True)


@matplotlib.rc_context({"text.parse_math": False})
def _variant_plot(table: pd.DataFrame, out: Path, ref_label: str) -> Path:
    """Mean ROC AUC by model (groups) x pool · head (bars), 95% CI whiskers, each bar's paired difference from
    the reference and its Holm-adjusted p above it; random-weight models in red."""
    import matplotlib.pyplot as plt

    combos = list(dict.fromkeys(f"{p} · {h}" for p, h in zip(table["pool"], table["head"], strict=True)))
    models = list(dict.fromkeys(table["model"]))
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(combos)}
    width = 0.8 / len(combos)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 + len(models) * (0.5 + 0.55 * len(combos))), 4.8))
    for r in table.itertuples():
        combo = f"{r.pool} · {r.head}"
        x = models.index(r.model) - 0.4 + width * (combos.index(combo) + 0.5)
        lo, hi = r.roc_auc_ci_low, r.roc_auc_ci_high
        err = None
        if lo is not None and hi is not None and np.isfinite([lo, hi]).all():
            err = [[max(0.0, r.roc_auc_mean - lo)], [max(0.0, hi - r.roc_auc_mean)]]
        ax.bar(
            x,
            r.roc_auc_mean,
            width * 0.9,
            color=colours[combo],
            edgecolor="k" if r.is_reference else "none",
            hatch="//" if r.random_init else None,
            yerr=err,
            capsize=2,
            error_kw={"lw": 0.8},
        )
        top = hi if err is not None else r.roc_auc_mean
        if r.is_reference:
            note = "reference"
        elif pd.isna(r.p_holm):
            note = "not paired"
        else:
            note = f"{r.diff:+.3f}\np={r.p_holm:.2f}"
        ax.text(x, min(top, 1.0) + 0.01, note, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(models)))
    rnd = table.groupby("model", sort=False)["random_init"].any()
    ax.set_xticklabels([m + (f"\n({MARK})" if rnd[m] else "") for m in models], fontsize=8)
    for tick, m in zip(ax.get_xticklabels(), models, strict=True):
        if rnd[m]:
            tick.set_color("firebrick")
    ax.axhline(0.5, ls="--", c="grey", lw=0.8)
    ax.set_ylim(0.0, 1.15)
    ax.set_ylabel("ROC AUC, mean over held-out donors (whiskers: 95% CI)", fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[c], label=c) for c in combos]
    handles.append(Patch(facecolor="white", edgecolor="k", label="reference run"))
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], c="grey", ls="--", lw=0.8, label="chance (0.5)"))
    if table["random_init"].any():
        handles.append(
            Patch(facecolor="white", edgecolor="grey", hatch="//", label="random weights (plumbing check)")
        )
    ax.legend(
        handles=handles,
        title="pooling · head",
        fontsize=7,
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    n = int(table["n_donors"].max())
    ax.set_title(
        f"Which model variant? Donor-held-out ROC AUC by model x pooling x head ({n} held-out donors)\n"
        f"above each bar: AUC difference from the reference ({ref_label}) and its paired sign-flip p, "
        "Holm-adjusted",
        fontsize=8,
    )
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _own_figure(run, name: str) -> Path | None:
    """``run/name`` when it is a file inside the run folder; a link pointing elsewhere is skipped, not embedded."""
    try:
        path = inside(run, name, what="figure")
    except TprobeError as exc:
        log.warning("skipping %s", exc)
        return None
    return path if path.is_file() else None


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _headline(summary: pd.DataFrame) -> list[str]:
    ranked = ranked_runs(summary)
    best = _top(ranked)
    lines = [
        f"Best measured run by mean ROC AUC: {best['family']} · {best['model']} (`{best['run_name']}`)"
        + (f" — **{RANDOM_MARK}**." if best["random_init"] else ".")
    ]
    few = summary[summary["n_donors"] < MIN_RANKED_DONORS]
    if len(few) and len(ranked) < len(summary):
        lines.append(
            f"Not ranked: {len(few)} run(s) whose means cover fewer than {MIN_RANKED_DONORS} held-out donors "
            f"(one donor's AUC has no spread): {', '.join(f'`{r}`' for r in few['run_name'])}."
        )
    elif len(few):
        lines.append(
            f"Every run's means cover fewer than {MIN_RANKED_DONORS} held-out donors: one donor's AUC has no "
            "spread, so this ranking ranks nothing; hold out more donors (leave-one-donor-out)."
        )
    real = ranked[~ranked["random_init"].astype(bool)]
    if best["random_init"] and len(real):
        b = _top(real)
        lines.append(
            f"Best run without random weights: {b['family']} · {b['model']} (`{b['run_name']}`), "
            f"mean ROC AUC {b['roc_auc_mean']:.3f}."
        )
    return lines


def _paired_display(pairs: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per compared run: difference from the reference, p and Holm-adjusted p, per metric."""
    if not len(pairs):
        return pd.DataFrame()
    rnd = dict(zip(summary["run"], summary["random_init"], strict=True))
    short = {"roc_auc": "AUC", "average_precision": "AP"}
    rows = []
    for run, d in pairs.groupby("run", sort=False):
        row = {
            "run": Path(run).name + (f" ({MARK})" if rnd.get(run) else ""),
            "n_donors": int(d["n_donors"].iloc[0]),
        }
        for r in d.itertuples():
            m = short.get(r.metric, r.metric)
            row[f"{m} diff"] = "–" if pd.isna(r.mean_diff) else f"{r.mean_diff:+.3f}"
            row[f"{m} p"] = "–" if pd.isna(r.p) else f"{r.p:.4f}"
            row[f"{m} p_holm"] = "–" if pd.isna(r.p_holm) else f"{r.p_holm:.4f}"
        auc = d[d["metric"] == "roc_auc"]
        row["AUC diff per donor"] = auc["diffs"].iloc[0] if len(auc) else ""
        row["note"] = d["note"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def map_signal(root: str | Path) -> pd.DataFrame:
    """Donor and batch predictability within each class from every ``tprobe map`` folder under ``root``
    (its ``diagnostics.json``): one row per source, accuracy against the within-class chance."""
    rows = []
    for path in sorted(Path(root).rglob("diagnostics.json")):
        try:
            diags = read_json(path)
        except TprobeError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        for d in diags if isinstance(diags, list) else []:
            within = d.get("within_class") if isinstance(d, dict) else None
            if not within:
                continue  # maps written before the within-class measure
            row = {
                "map": path.parent.name,
                "source": d.get("source", "") + (f" ({MARK})" if d.get("random_init") else ""),
            }
            act = (d.get("predictability") or {}).get("activation") or {}
            if act.get("skill") is not None:
                row["activation skill"] = f"{act['skill']:.2f}"
            for t in ("donor", "batch"):
                w = within.get(t)
                if w:
                    sk = "–" if w.get("skill") is None else f"{w['skill']:.2f}"
                    row[f"{t} within class"] = f"{w['accuracy']:.3f} (chance {w['chance']:.3f}, skill {sk})"
            rows.append(row)
    return pd.DataFrame(rows)


def donors_bound_line(n: int, m: int = 1) -> str:
    """One line: how finely ``n`` donors (and ``m`` Holm-corrected comparisons) let runs be ranked."""
    from tprobe.stats import sign_flip_floor

    if n < 1:
        return ""
    floor = sign_flip_floor(n)
    line = f"With {n} held-out donors the smallest two-sided sign-flip p-value is 2/2^{n} = {floor:.3f}"
    if m > 1:
        line += f"; Holm across {m} comparisons, the smallest adjusted p is {min(1.0, m * floor):.3f}"
    return line + ": n donors bound what can be ranked, whatever the differences."


@dataclass
class Report:
    """The runs under ``root`` compared (:func:`build_report`): the tables and lines of the report.

    ``summary``: one row per run (:func:`collect_runs`); ``table``: its display form; ``pairs``: the
    paired comparisons with the reference (:func:`tprobe.stats.paired_comparisons`) and ``paired`` their
    display form; ``reference``: the reference run's path, ``reference_line`` how it was chosen;
    ``headline``, ``bound_line``, ``batch_confound``: the report's sentences; ``map_signal``: donor and
    batch signal within each class from ``tprobe map`` folders; ``variants``: the model variants'
    comparison (:func:`variant_table`; empty unless the runs probe stores of two or more models);
    ``incomplete``: run folders left out (interrupted); ``paths``: the files :meth:`save` wrote (empty
    until then).
    """

    root: Path
    summary: pd.DataFrame
    table: pd.DataFrame
    pairs: pd.DataFrame
    paired: pd.DataFrame
    headline: list[str]
    reference: str
    reference_line: str
    bound_line: str
    map_signal: pd.DataFrame
    variants: pd.DataFrame = field(default_factory=pd.DataFrame)
    incomplete: list[str] = field(default_factory=list)
    batch_confound: str = BATCH_CONFOUND
    paths: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fields by name (the tables stay DataFrames); what :func:`write_report` returns."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, out: str | Path) -> list[Path]:
        """Write report.md, report.html (figures embedded), summary.parquet, summary.csv, paired.csv,
        donor_auc.png and (with two or more models) variants.png into ``out``; return (and keep in
        ``paths``) the report's main files."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.summary.to_parquet(out / "summary.parquet", index=False)
        self.summary.to_csv(out / "summary.csv", index=False)
        self.pairs.to_csv(out / "paired.csv", index=False)
        dots = _donor_auc_plot(self.summary, out / "donor_auc.png")
        variant_fig = None
        if len(self.variants):
            ref_label = run_labels(self.summary)[list(self.summary["run"]).index(self.reference)]
            variant_fig = _variant_plot(self.variants, out / "variants.png", ref_label)
        md, page = _render(self, dots, variant_fig)
        (out / "report.md").write_text(md)
        (out / "report.html").write_text(page)
        self.paths = [out / "report.md", out / "report.html", out / "summary.parquet", out / "paired.csv"]
        return self.paths


def build_report(root: str | Path, *, reference: str | None = None) -> Report:
    """Compare the run folders under ``root``; write nothing (:meth:`Report.save` does).

    Besides the table: each run against one reference run declared in advance (``reference``, a run
    folder name; default :func:`choose_reference`'s rule, which reads no result) on the same held-out
    donors, with the exact paired sign-flip test and Holm's correction across those comparisons
    (:mod:`tprobe.stats`).
    """
    from tprobe.stats import paired_comparisons

    summary = collect_runs(root)
    ref_run, ref_why = choose_reference(summary, reference)  # a bad --reference stops before any writing
    pairs = paired_comparisons(summary, against=ref_run)
    ref_line = (
        f"Reference: {ref_why}. Every other run is compared with it (declared before looking; Holm "
        "across these comparisons); diff = run minus reference, per held-out donor, then averaged."
    )
    # the donors the paired AUC test runs on: a one-class held-out donor has no AUC (so no difference)
    ref_auc = pd.read_parquet(Path(ref_run) / "per_donor.parquet", columns=["roc_auc"])["roc_auc"]
    n_ref = int(ref_auc.notna().sum())
    m_tests = int(pairs.loc[pairs["metric"] == "roc_auc", "p"].notna().sum()) if len(pairs) else 0
    return Report(
        root=Path(root),
        summary=summary,
        table=display_table(summary),
        pairs=pairs,
        paired=_paired_display(pairs, summary),
        headline=_headline(summary),
        reference=ref_run,
        reference_line=ref_line,
        bound_line=donors_bound_line(n_ref, m_tests),
        map_signal=map_signal(root),
        variants=variant_table(summary, pairs, ref_run),
        incomplete=summary.attrs.get("incomplete", []),
    )


def write_report(root: str | Path, out: str | Path, *, reference: str | None = None) -> dict:
    """:func:`build_report` then :meth:`Report.save` into ``out``; returns :meth:`Report.to_dict`."""
    report = build_report(root, reference=reference)
    report.save(out)
    return report.to_dict()


def _render(report: Report, dots: Path, variant_fig: Path | None = None) -> tuple[str, str]:
    """The report as Markdown and as an HTML page (figures embedded; ``variant_fig``: variants.png)."""
    from tprobe.stats import TEST_NOTE

    root, summary, table, paired = report.root, report.summary, report.table, report.paired
    ref_run, ref_line, bound_line = report.reference, report.reference_line, report.bound_line
    signal, headline, incomplete = report.map_signal, report.headline, report.incomplete
    map_title = (
        "Donor and batch signal within each class (`tprobe map` folders under the runs; chance = each "
        "class's own majority rate, pooled)"
    )
    map_md = [map_title, "", _md(signal), ""] if len(signal) else []
    map_html = (
        (f"<p>{html.escape(map_title)}</p>" + signal.to_html(index=False, na_rep="–")) if len(signal) else ""
    )
    variant_md = (
        [
            "## Model variants (one figure: AUC by model x pooling x head, paired test vs the reference)",
            "",
            "![model variants](variants.png)",
            "",
        ]
        if variant_fig
        else []
    )
    best = _top(ranked_runs(summary))  # the "best" figures: from the runs the headline ranks
    best_per_family = pd.DataFrame([_top(ranked_runs(g)) for _, g in summary.groupby("family")])
    cells = sorted(set(summary["n_cells"]))
    cells_txt = (
        f"{cells[0]:,} cells scored per run"
        if len(cells) == 1
        else ("cells scored per run: " + ", ".join(f"{c:,}" for c in cells))
    )
    n_random = int(summary["random_init"].sum())
    random_txt = (
        f" {n_random} run(s) use randomly initialised weights: they are marked `{RANDOM_MARK}` and "
        "only show that the pipeline runs."
        if n_random
        else ""
    )
    incomplete_txt = (
        f" Incomplete (interrupted, no per_donor.parquet), left out: "
        f"{', '.join(Path(r).name for r in incomplete)}."
        if incomplete
        else ""
    )
    header = (
        f"Runs under `{root}`: {len(summary)}; {cells_txt} (original views of the held-out donors). "
        "Metrics: mean ± sd over held-out donors (n_donors: those with both classes, which the means cover; "
        "n_held_out: every held-out donor, one-class ones too); 95% CI: t-interval over donors of the mean, "
        "mean ± t(0.975, n-1)·sd/√n (metrics.json summary.<metric>.ci_low/ci_high; runs written before "
        "it carry a donor bootstrap CI, too narrow at 6 donors). brier and ece: calibration, lower is better "
        "(ECE over 10 equal-width probability bins; per-run reliability.png); accuracy at a fixed 0.5 "
        f"threshold, tuned on no donor.{random_txt}{incomplete_txt}"
    )
    md = [
        "# tprobe report",
        "",
        header,
        "",
        "## Measured",
        "",
        _md(table),
        "",
        "## Published reference numbers (not measured here)",
        "",
        _md(PUBLISHED),
        "",
        *[line + "\n" for line in headline],
        BATCH_CONFOUND,
        "",
        *map_md,
        "## Paired comparisons (each run vs the pre-declared reference, same held-out donors)",
        "",
        ref_line,
        "",
        _md(paired) if len(paired) else "Only one run: nothing to compare.",
        "",
        bound_line,
        "",
        TEST_NOTE,
        "",
        "![per-donor AUC](donor_auc.png)",
        "",
        *variant_md,
    ]
    figs = [_img(dots, "ROC AUC per held-out donor; colour = donor, bar = mean")]
    if variant_fig:
        figs.append(
            _img(
                variant_fig, "model variants: ROC AUC by model x pooling x head, paired test vs the reference"
            )
        )
    for _, r in best_per_family.iterrows():
        roc = _own_figure(r["run"], "roc.png")
        if roc:
            figs.append(_img(roc, f"ROC, best {r['family']}: {r['label']}"))
    rel = _own_figure(ref_run, "reliability.png")
    if rel:
        figs.append(_img(rel, f"reliability (calibration), reference run: {Path(ref_run).name}"))
    conf = _own_figure(best["run"], "confusion.png")
    if conf:
        figs.append(_img(conf, f"confusion matrix, best run: {best['label']}"))
    for run in summary.loc[summary["family"] == "finetune", "run"]:
        for sal in sorted(Path(run).glob("saliency_*.png")):
            if _own_figure(run, sal.name):
                figs.append(_img(sal, f"saliency {Path(run).name}: {sal.stem}"))
    table_html = table.to_html(index=False, na_rep="–").replace(
        f"<td>{RANDOM_MARK}</td>", f'<td class="random">{RANDOM_MARK}</td>'
    )
    paired_html = paired.to_html(index=False, na_rep="–") if len(paired) else "<p>Only one run.</p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tprobe report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}figure{{display:inline-block;margin:8px}}
img{{max-width:100%}}.ref{{background:#f6f6f6}}.random{{color:#b00;font-weight:bold}}</style></head><body>
<h1>tprobe report</h1><p>{html.escape(header)}</p>
<h2>Measured</h2>{table_html}
<h2>Published reference numbers (not measured here)</h2><div class="ref">{PUBLISHED.to_html(index=False, na_rep="–")}</div>
{"".join(f"<p>{html.escape(line)}</p>" for line in headline)}
<p>{html.escape(BATCH_CONFOUND)}</p>{map_html}
<h2>Paired comparisons (each run vs the pre-declared reference, same held-out donors)</h2><p>{html.escape(ref_line)}</p>{paired_html}<p>{html.escape(bound_line)}</p><p>{html.escape(TEST_NOTE)}</p>
<h2>Figures</h2>{"".join(figs)}</body></html>"""
    return "\n".join(md), page
