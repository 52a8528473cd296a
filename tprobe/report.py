"""Collect run directories into one comparison table, with figures, as Markdown, Parquet/CSV and HTML.

Published reference numbers are a separate, labelled block and are never mixed with measured rows.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import pandas as pd

from tprobe.errors import TprobeError

__all__ = ["collect_runs", "write_report", "PUBLISHED"]
log = logging.getLogger(__name__)

# Published results, as reported (not measured here).
PUBLISHED = pd.DataFrame([
    ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "frequency classifier", None, None, 0.50),
    ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "pixel logistic regression", None, None, 0.79),
    ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "one-layer NN on pixels", None, None, 0.86),
    ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "LeNet", None, None, 0.93),
    ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "Inception v3 off-the-shelf", None, None, 0.92),
    ("Wang et al. 2019, sample, test donors 1,2,3,5,6 (mean AUC)", "Inception v3 fine-tuned", None, None, 0.94),
    ("Wang et al. 2019, full data, held-out donors", "Inception v3 fine-tuned", 0.936, 0.964, 0.967),
    ("DINOv2 study, Table 3 (test)", "ViT-S/14 with registers, linear head", 0.922, 0.925, 0.916),
], columns=["source", "model", "accuracy", "average_precision", "roc_auc"])  # fmt: skip

METRICS = ("accuracy", "average_precision", "roc_auc")


def _family(record) -> tuple[str, str]:
    cmd = record.command
    if cmd == "baseline":
        return "baseline", record.options.get("baseline", record.features.name)
    feats = record.features
    model = Path(str(feats.model or feats.name)).name
    if cmd == "finetune":
        o = record.options
        mode = (
            "frozen"
            if o.get("freeze")
            else (f"last {o['unfreeze_last']}" if o.get("unfreeze_last") else "full")
        )
        return "finetune", f"{model} · {o.get('pool')} · {mode}"
    if feats.kind == "table":
        return "probe", f"{feats.name} · {record.options.get('head')}"
    return "probe", f"{model} · {feats.pool} · {record.options.get('head')}"


def collect_runs(root: str | Path) -> pd.DataFrame:
    """One row per run directory below ``root`` (any folder with config.json + metrics.json).

    A run whose files cannot be read as a tprobe run is skipped with a warning naming it.
    """
    from tprobe.runs import RunRecord, read_json

    rows = []
    for metrics_path in sorted(Path(root).rglob("metrics.json")):
        run = metrics_path.parent
        if not (run / "config.json").exists():
            continue
        try:
            record, met = RunRecord.load(run), read_json(metrics_path)
            summary = met["summary"]
        except (TprobeError, KeyError, TypeError) as exc:
            log.warning("skipping %s: %s", run, exc)
            continue
        family, name = _family(record)
        if record.random_init:
            name += " · RANDOM WEIGHTS"
        row = {"family": family, "model": name, "run": str(run), "n_donors": len(met.get("folds", [])),
               "random_init": record.random_init}  # fmt: skip
        for m in METRICS:
            s = summary.get(m) or {}
            row[f"{m}_mean"], row[f"{m}_sd"] = s.get("mean"), s.get("sd")
        rows.append(row)
    if not rows:
        raise TprobeError(
            f"{root}: no run directories (readable metrics.json + config.json) found; run `tprobe probe` first"
        )
    return (
        pd.DataFrame(rows)
        .sort_values(["family", "roc_auc_mean"], ascending=[True, False])
        .reset_index(drop=True)
    )


def _fmt(mean, sd) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and not pd.isna(sd) else f"{mean:.3f}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    t = summary[["family", "model", "n_donors"]].copy()
    for m in METRICS:
        t[m] = [_fmt(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_sd"], strict=True)]
    return t


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [
        "| " + " | ".join("–" if pd.isna(v) else str(v) for v in row) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join(lines)


def _donor_auc_plot(summary: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.45 * len(summary) + 1.2))
    for i, run in enumerate(summary["run"]):
        per = pd.read_parquet(Path(run) / "per_donor.parquet")
        ax.scatter(per["roc_auc"], [i] * len(per), s=14, alpha=0.7)
        ax.plot([per["roc_auc"].mean()] * 2, [i - 0.3, i + 0.3], c="k", lw=1.5)
    ax.set_yticks(range(len(summary)))
    ax.set_yticklabels(
        [f"{f}: {m}" for f, m in zip(summary["family"], summary["model"], strict=True)], fontsize=7
    )
    ax.axvline(0.5, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="ROC AUC per held-out donor (bar: mean)", xlim=(0, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def write_report(root: str | Path, out: str | Path) -> dict:
    """Write report.md, report.html (figures embedded), summary.parquet and summary.csv into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = collect_runs(root)
    summary.to_parquet(out / "summary.parquet", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    table = display_table(summary)
    dots = _donor_auc_plot(summary, out / "donor_auc.png")
    best = summary.loc[summary["roc_auc_mean"].astype(float).idxmax()]
    best_per_family = summary.loc[summary.groupby("family")["roc_auc_mean"].idxmax()]
    md = ["# tprobe report", "", f"Runs under `{root}`: {len(summary)}. Metrics: mean ± sd over held-out donors.", "",
          "## Measured", "", _md(table), "",
          "## Published reference numbers (not measured here)", "", _md(PUBLISHED), "",
          f"Best measured run: {best['family']} · {best['model']} (`{best['run']}`).", "",
          "![per-donor AUC](donor_auc.png)", ""]  # fmt: skip
    figs = [_img(dots, "ROC AUC per held-out donor")]
    for _, r in best_per_family.iterrows():
        roc = Path(r["run"]) / "roc.png"
        if roc.exists():
            figs.append(_img(roc, f"ROC, best {r['family']}: {r['model']}"))
    conf = Path(best["run"]) / "confusion.png"
    if conf.exists():
        figs.append(_img(conf, f"confusion matrix, best run: {best['model']}"))
    for run in summary.loc[summary["family"] == "finetune", "run"]:
        for sal in sorted(Path(run).glob("saliency_*.png")):
            figs.append(_img(sal, f"saliency {Path(run).name}: {sal.stem}"))
    (out / "report.md").write_text("\n".join(md))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tprobe report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}figure{{display:inline-block;margin:8px}}
img{{max-width:520px}}.ref{{background:#f6f6f6}}</style></head><body>
<h1>tprobe report</h1><p>{len(summary)} runs under <code>{html.escape(str(root))}</code>; mean ± sd over held-out donors.</p>
<h2>Measured</h2>{table.to_html(index=False, na_rep="–")}
<h2>Published reference numbers (not measured here)</h2><div class="ref">{PUBLISHED.to_html(index=False, na_rep="–")}</div>
<h2>Figures</h2>{"".join(figs)}</body></html>"""
    (out / "report.html").write_text(page)
    return {
        "summary": summary,
        "table": table,
        "paths": [out / "report.md", out / "report.html", out / "summary.parquet"],
    }
