"""Figures: preprocessing contact sheet, ROC curves, confusion matrix, sweep bar chart."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tprobe.models.random_weights import TITLE_PREFIX  # noqa: E402

__all__ = [
    "contact_sheet",
    "channel_text",
    "roc_curves",
    "confusion_matrix_plot",
    "sweep_bars",
    "learning_curves",
    "fold_names",
    "source_label",
    "plain_text",
    "reliability_diagram",
    "auc_by_layer",
]


def source_label(name: str) -> str:
    """A feature source's name as a reader meets it in a legend: ``table:cellprofiler_sample`` ->
    ``feature table cellprofiler_sample``, ``pixels`` -> ``raw pixels (64 px canvas)``; a store's
    ``<model>-<pool>`` -> ``<model> · <pool> tokens``; anything else unchanged."""
    from tprobe.cache.store import POOLS

    name = str(name)
    suffix = ""
    if "#" in name:  # two sources of the same name, numbered
        name, n = name.rsplit("#", 1)
        suffix = f" (#{n})"
    if name.startswith("table:"):
        stem = name[len("table:") :]
        every = stem.endswith("+all-rows")
        stem = stem.removesuffix("+all-rows")
        return f"feature table {stem}" + (" (every table row)" if every else "") + suffix
    if name == "pixels":
        from tprobe.data.preprocess import PIXEL_CANVAS

        return f"raw pixels ({PIXEL_CANVAS} px canvas)" + suffix
    for pool in sorted(POOLS, key=len, reverse=True):
        if name.endswith(f"-{pool}") and len(name) > len(pool) + 1:
            return f"{name[: -len(pool) - 1]} · {pool} tokens" + suffix
    return name + suffix


# Draw with mathtext off: a ``$`` in a donor, model, run or channel name is shown as typed, never parsed.
# matplotlib's own rc_context serves as the decorator (a fresh context per call); curve, map, report and
# saliency use the same decorator inline, so they need not import this module (and pyplot) at start-up.
plain_text = matplotlib.rc_context({"text.parse_math": False})


def channel_text(config) -> str:
    """Which channel a contact sheet shows: the one the filters measure (``nadh``), or the grey image."""
    seg = getattr(config, "segment", None)
    if seg:
        return f"channel shown: {seg} (the channel the filters measure)"
    return "channel shown: the grey image (one channel)"


@plain_text
def contact_sheet(manifest: pd.DataFrame, config, out: str | Path, *, per_group: int = 8) -> Path:
    """A grid of kept and dropped example images, one row per outcome (labelled at the left, with how many
    images it holds), each panel titled with its donor, class and entropy; says which channel it shows."""
    from tprobe.data.preprocess import pad_to_canvas, read_cell

    src = manifest[manifest["view"] == "orig"]
    groups = [("kept", src[src["kept"]])] + [
        (reason, src[src["drop_reason"] == reason])
        for reason in ("dim", "multi_cell", "too_large", "duplicate")
        if (src["drop_reason"] == reason).any()
    ]
    fig, axes = plt.subplots(
        len(groups),
        per_group,
        figsize=(1.4 * per_group + 1.1, 1.55 * len(groups) + 0.3),
        squeeze=False,
        gridspec_kw={"hspace": 0.28, "wspace": 0.12},
    )
    for r, (name, rows) in enumerate(groups):
        n_rows = len(rows)
        rows = rows.sample(min(per_group, len(rows)), random_state=0) if len(rows) else rows
        row_label = "kept" if name == "kept" else f"dropped:\n{name.replace('_', ' ')}"
        axes[r, 0].annotate(
            f"{row_label}\n({n_rows} images)",
            xy=(0, 0.5),
            xycoords="axes fraction",
            xytext=(-10, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=7.5,
            fontweight="bold",
        )
        for c in range(per_group):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(rows):
                continue
            row = rows.iloc[c]
            img = read_cell(row["path"], config)[0]  # the channel the filters measured
            if name != "too_large":
                img = pad_to_canvas(img, config)
            ax.imshow(img, cmap="magma", vmin=0, vmax=max(1.0, float(img.max())))
            label = "act" if row["label"] == 1 else "qui"
            ax.set_title(f"{row['donor']} {label} H={row['entropy']:.1f}", fontsize=6, pad=3)
            bar = 20  # px scale bar, bottom left, in image pixels (every image is shown at 1 px = 1 px)
            h = img.shape[0]
            ax.plot([3, 3 + bar], [h - 4, h - 4], c="white", lw=1.5, solid_capstyle="butt")
            ax.text(3, h - 7, f"{bar} px", color="white", fontsize=4.5, va="bottom")
    fig.suptitle(f"kept and dropped examples (of {len(src)} images); {channel_text(config)}", fontsize=9)
    fig.subplots_adjust(bottom=0.05, top=0.9)
    fig.text(
        0.5,
        0.0,
        "Row = kept, or the filter that dropped the image. Title: donor, class (act = activated, "
        "qui = quiescent), H = Shannon entropy of the 8-bit histogram in bits (dim: H < 4.0, or H < 4.7 "
        "and summed intensity < 3500).\nWhite bar: 20 px. Magma colour map, 0 = black.",
        ha="center",
        va="top",
        fontsize=6.5,
        wrap=True,
    )
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


@plain_text
def roc_curves(predictions: pd.DataFrame, out: str | Path, *, title: str = "") -> Path:
    """One ROC curve per held-out donor, with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for donor, d in predictions.groupby("donor"):
        if d["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(d["label"], d["p_activated"])
        ax.plot(fpr, tpr, lw=1.4, label=f"{donor} (AUC {roc_auc_score(d['label'], d['p_activated']):.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    import textwrap

    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(
        "\n".join(textwrap.wrap(f"ROC by held-out donor: {title}" if title else "ROC by held-out donor", 48)),
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


@plain_text
def confusion_matrix_plot(
    predictions: pd.DataFrame, out: str | Path, threshold: float = 0.5, *, title: str = ""
) -> Path:
    """Confusion matrix of all out-of-fold predictions at ``threshold``; ``title`` (the run's
    :attr:`~tprobe.runs.record.RunRecord.title`) carries the random-weights mark."""
    import textwrap

    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(predictions["label"], predictions["p_activated"] >= threshold, labels=[0, 1])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v < cm.max() / 2 else "white")
    names = ["quiescent", "activated"]
    head = f"out-of-fold predictions: {title}" if title else "out-of-fold predictions"
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=names,
        yticklabels=names,
        xlabel=f"predicted (p(activated) >= {threshold:g})",
        ylabel="true",
    )
    ax.set_title("\n".join(textwrap.wrap(head, 40, break_on_hyphens=False)), fontsize=8)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


@plain_text
def reliability_diagram(predictions: pd.DataFrame, out: str | Path, *, title: str = "") -> Path:
    """Reliability diagram of the out-of-fold predictions: activated fraction against mean predicted
    probability in 10 equal-width bins, all held-out donors pooled (thick) and per donor (thin), with
    the per-donor Brier score and ECE in the legend and the cells per bin below."""
    import textwrap

    from tprobe.stats import ECE_BINS, brier_score, expected_calibration_error, reliability_table

    fig, (ax, hx) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfectly calibrated")
    for donor, d in predictions.groupby("donor"):
        t = reliability_table(d["label"], d["p_activated"])
        t = t[t["n"] > 0]
        b, e = (
            brier_score(d["label"], d["p_activated"]),
            expected_calibration_error(d["label"], d["p_activated"]),
        )
        ax.plot(
            t["mean_p"],
            t["frac_activated"],
            "-o",
            ms=2.5,
            lw=0.9,
            alpha=0.7,
            label=f"{donor} (Brier {b:.3f}, ECE {e:.3f})",
        )
    y, p = predictions["label"], predictions["p_activated"]
    t = reliability_table(y, p)
    full = t[t["n"] > 0]
    ax.plot(
        full["mean_p"],
        full["frac_activated"],
        "-s",
        c="k",
        ms=4,
        lw=2.0,
        label=f"all donors (Brier {brier_score(y, p):.3f}, ECE {expected_calibration_error(y, p):.3f})",
    )
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="activated fraction in bin")
    head = f"Reliability: {title}" if title else "Reliability of out-of-fold predictions"
    ax.set_title(
        "\n".join(textwrap.wrap(head, 56, break_on_hyphens=False))
        + f"\n{ECE_BINS} equal-width bins; held-out donors only",
        fontsize=8,
    )
    ax.legend(fontsize=6, loc="upper left")
    hx.bar((t["low"] + t["high"]) / 2, t["n"], width=1 / ECE_BINS * 0.9, color="grey")
    hx.set(xlabel="predicted probability of activated (bin)", ylabel="cells")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


@plain_text
def sweep_bars(
    summary: pd.DataFrame, out: str | Path, metric: str = "roc_auc", *, random_init: bool = False
) -> Path:
    """Bar chart of mean ``metric`` (± sd over donors) by head x pooling, pools and heads in table order;
    a sweep over several models' stores groups the bars by model · pooling. ``random_init``: a source
    came from a randomly initialised model (the title says so)."""
    several = "features" in summary and summary["features"].nunique() > 1
    if several:
        names = [Path(str(f)).name for f in summary["features"]]
        summary = summary.assign(pool=[f"{n} · {p}" for n, p in zip(names, summary["pool"], strict=True)])
    pools = list(dict.fromkeys(summary["pool"]))
    heads = list(dict.fromkeys(summary["head"]))
    piv = summary.pivot(index="pool", columns="head", values=f"{metric}_mean").reindex(
        index=pools, columns=heads
    )
    err = (  # None (one held-out donor: no sd over donors) draws no bar
        summary.pivot(index="pool", columns="head", values=f"{metric}_sd")
        .reindex(index=pools, columns=heads)
        .astype(float)
    )
    fig, ax = plt.subplots(figsize=(2.6 + 0.35 * len(heads) * len(piv), 3.8))
    piv.plot.bar(yerr=err, ax=ax, capsize=2, rot=20 if several else 0)
    ax.axhline(0.5, ls="--", c="grey", lw=0.8, label="chance (0.5)")
    features = summary["features"].iloc[0] if "features" in summary else ""
    ax.set(
        ylabel=f"{metric} (mean ± sd over donors)",
        ylim=(0, 1.08),
        xlabel="model · pooling" if several else "pooling",
    )
    ax.set_yticks(np.arange(0, 1.01, 0.2))
    what = f"{summary['features'].nunique()} models" if several else Path(str(features)).name
    rnd = TITLE_PREFIX if random_init else ""
    ax.set_title(f"{rnd}probe sweep: {what} · donor-held-out CV", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="head", frameon=False)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


def fold_names(curves: pd.DataFrame) -> dict:
    """Each fold's name for a legend: ``held out donor_3`` (from the curves' ``test_donor``), else ``fold N``."""
    out = {}
    for fold, c in curves.groupby("fold", sort=True):
        held = c["test_donor"].iloc[0] if "test_donor" in c and pd.notna(c["test_donor"].iloc[0]) else None
        out[fold] = f"held out {held}" if held else f"fold {fold}"
    return out


@plain_text
def learning_curves(curves: pd.DataFrame, out: str | Path, *, title: str = "") -> Path:
    """Training loss (solid) and validation loss (dashed) per epoch, and validation ROC AUC, one colour
    per fold, each fold named by its held-out donor; whole-epoch ticks (one epoch is one point)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = fold_names(curves)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, (fold, c) in enumerate(curves.groupby("fold", sort=True)):
        col = colours(i % colours.N)
        a.plot(c["epoch"], c["train_loss"], "-o", ms=3, lw=1.2, c=col, label=f"{names[fold]}: training loss")
        a.plot(c["epoch"], c["val_loss"], "--s", ms=3, lw=1.2, c=col, label=f"{names[fold]}: validation loss")
        b.plot(c["epoch"], c["val_auc"], "-o", ms=3, lw=1.2, c=col, label=names[fold])
    epochs = curves["epoch"]
    lo, hi = (int(epochs.min()), int(epochs.max())) if len(epochs) else (1, 1)
    for ax in (a, b):
        if hi - lo < 12:
            ax.set_xticks(range(lo, hi + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(lo - 0.5, hi + 0.5)  # one epoch: one point, centred, tick "1"
    a.set(
        xlabel="epoch", ylabel="binary cross-entropy loss", title="loss (solid: training; dashed: validation)"
    )
    b.set(
        xlabel="epoch",
        ylabel="validation ROC AUC",
        ylim=(0, 1.02),
        title="validation ROC AUC (early stopping)",
    )
    style = [
        Line2D([], [], c="k", ls="-", marker="o", ms=3, label="training loss"),
        Line2D([], [], c="k", ls="--", marker="s", ms=3, label="validation loss"),
    ]
    a.legend(handles=style, fontsize=7, loc="best")
    b.legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        title="fold",
        title_fontsize=7,
    )
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


@plain_text
def auc_by_layer(
    summary: pd.DataFrame,
    out: str | Path,
    *,
    random_init: bool = False,
    metric: str = "roc_auc",
    n_layers: int | None = None,
) -> Path:
    """Mean held-out-donor ``metric`` (± sd over donors) against depth, one line per head, from the
    ``cls@<layer>`` rows of a sweep summary: which layer to probe. ``random_init`` marks random weights."""
    from tprobe.models.tokens import pool_layer

    rows = summary.assign(layer=[pool_layer(p) for p in summary["pool"]]).dropna(subset=["layer"])
    if rows.empty:
        raise ValueError("no cls@<layer> rows in the summary")
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    heads = list(dict.fromkeys(rows["head"]))
    for k, (head, r) in enumerate(rows.groupby("head", sort=False)):
        r = r.sort_values("layer")
        dodge = 0.06 * (k - (len(heads) - 1) / 2)  # side by side, so the donor sd bars stay readable
        ax.errorbar(
            r["layer"] + dodge,
            r[f"{metric}_mean"],
            yerr=r[f"{metric}_sd"].astype(float),  # None (one held-out donor: no sd) -> no bar
            marker="o",
            ms=4,
            capsize=2,
            lw=1.2,
            label=head,
        )
    ax.axhline(0.5, ls="--", c="grey", lw=0.8, label="chance (0.5)")
    layers = sorted(int(v) for v in rows["layer"].unique())
    ax.set_xticks(layers)
    where = f" of {n_layers} blocks" if n_layers else ""
    ax.set(
        xlabel=f"layer (-1 = last block{where}; CLS through the final layer norm)",
        ylabel=f"{metric} (mean ± sd over held-out donors)",
        ylim=(0, 1.05),
    )
    features = summary["features"].iloc[0] if "features" in summary else ""
    rnd = TITLE_PREFIX if random_init else ""
    ax.set_title(f"{rnd}{Path(str(features)).name}: AUC by layer", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="head", frameon=False)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
