"""Embedding maps and donor/batch diagnostics: do the features separate activation, or donors and batches?

In the T-cell data each imaging batch of a donor holds one class, so features that pick up the
donor or the batch can look as if they separate activation. :func:`diagnose` measures, on the same
footing, how well the pooled features predict **activation**, **donor** and **imaging batch**:

- the same classifier (multinomial logistic regression, C=0.1, on the top 64 principal components of
  the standardised features, PCA fitted inside each training fold) and the
  same 5-fold cross-validation, stratified and grouped by cell (all views of a cell in one fold);
- accuracy against chance = the majority-class rate, and the *skill* (accuracy - chance) /
  (1 - chance), which puts a 2-class and a 6-class target on one scale (0 = chance, 1 = perfect);
- silhouette scores (cosine) of the features grouped by label, by donor and by batch.

Every imaging batch holds one class and the class mix differs by donor, so knowing activation alone
already predicts donor and batch better than the majority rate. Donor and batch are therefore also
measured **within each class** (:func:`within_class`): the same classifier and CV run on the cells of
one class at a time, against that class's own majority rate, pooled over classes weighted by cells
(the conditional chance). ``chance_given_class`` is what knowing the class alone would score on the
whole data. The warning compares like with like: donor (and batch) skill within class, beyond what
the class gives away, against activation skill. Batch is ``donor·batch`` (the manifest's ``batch``
column numbers batches within a donor); it is absent when the data has no batch column.

:func:`embed` computes 2-D PCA and UMAP (``umap-learn``) of the standardised features; :func:`plot_map`
draws them coloured by label, donor and batch, side by side.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tprobe.errors import TprobeError
from tprobe.features.sources import CLASS_NAMES, FeatureSet

__all__ = [
    "EmbeddingMap",
    "SourceMap",
    "MapDiagnostics",
    "embedding_map",
    "MapData",
    "map_data",
    "diagnose",
    "embed",
    "plot_map",
    "predictability",
    "within_class",
    "chance_given_class",
    "PCA_DIMS",
]

log = logging.getLogger(__name__)
PCA_DIMS = 64  # the diagnostic classifier sees the top principal components (fitted in each training fold)


@dataclass
class MapData:
    """Original views only: ``X`` and ``meta`` with ``label``, ``donor``, ``group`` and ``batch`` (or None)."""

    X: np.ndarray
    meta: pd.DataFrame
    name: str


def map_data(fs: FeatureSet, manifest: pd.DataFrame | None = None) -> MapData:
    """The original views of ``fs`` with a ``batch`` column (``donor·b<batch>``) from ``manifest``.

    Without ``manifest`` a store source reads the store's own manifest.
    """
    from tprobe.cache.store import read_own_manifest

    keep = (fs.meta["view"] == "orig").to_numpy()
    meta = fs.meta[keep].reset_index(drop=True).copy()
    if manifest is None and fs.source.get("kind") == "store":
        manifest = read_own_manifest(fs.source["store"])
    batch = None
    if "batch" in meta.columns:
        batch = meta["batch"]
    elif manifest is not None and "batch" in manifest.columns:
        batch = meta["image_id"].map(manifest.drop_duplicates("image_id").set_index("image_id")["batch"])
        if (
            len(batch) and batch.isna().all()
        ):  # another dataset's manifest: the batch diagnostics would vanish
            raise TprobeError(
                f"{fs.name}: none of its {len(batch)} cells is in the manifest given for the imaging batches; "
                "pass the data (or manifest) the features come from"
            )
    if batch is not None and batch.notna().any():
        meta["batch"] = [
            f"{d}·b{b}" if pd.notna(b) else f"{d}·b?" for d, b in zip(meta["donor"], batch, strict=True)
        ]
    else:
        meta["batch"] = None
    return MapData(np.asarray(fs.X[keep], dtype=np.float32), meta, fs.name)


def predictability(X: np.ndarray, target, groups, *, n_splits: int = 5, seed: int = 0) -> dict:
    """Cross-validated accuracy of predicting ``target`` from ``X`` (folds grouped by ``groups``).

    Returns accuracy, balanced accuracy, chance (majority-class rate), skill and the class count.
    """
    y = pd.Series(target).astype(str).to_numpy()
    classes, counts = np.unique(y, return_counts=True)
    chance = float(counts.max() / counts.sum())
    if len(classes) < 2:
        return {"accuracy": None, "balanced_accuracy": None, "chance": chance, "skill": None, "n_classes": 1}
    k = int(min(n_splits, counts.min() if counts.min() >= 2 else n_splits))
    k = max(2, k)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    pred = np.empty(len(y), dtype=object)
    with warnings.catch_warnings():  # rare classes (a 1-cell batch) cannot be in every fold: expected
        warnings.filterwarnings("ignore", message="The least populated class")
        splits = list(cv.split(X, y, groups))
    for tr, te in splits:
        if len(np.unique(y[tr])) < 2:
            pred[te] = y[tr][0]
            continue
        n_comp = int(min(PCA_DIMS, X.shape[1], len(tr) - 1))
        model = make_pipeline(
            StandardScaler(), PCA(n_comp, random_state=seed), LogisticRegression(C=0.1, max_iter=1000)
        )
        pred[te] = model.fit(X[tr], y[tr]).predict(X[te])
    acc = float(np.mean(pred == y))
    recalls = [np.mean(pred[y == c] == c) for c in classes]
    return {
        "accuracy": acc,
        "balanced_accuracy": float(np.mean(recalls)),
        "chance": chance,
        "skill": (acc - chance) / (1 - chance),
        "n_classes": int(len(classes)),
        "n_splits": k,
    }


def chance_given_class(target, label) -> float:
    """Accuracy of guessing ``target`` from the class alone: each class's most common target value."""
    t = pd.DataFrame(
        {"t": pd.Series(target).astype(str).to_numpy(), "c": pd.Series(label).astype(str).to_numpy()}
    )
    return float(t.groupby("c")["t"].agg(lambda v: v.value_counts().iloc[0]).sum() / len(t))


def within_class(X: np.ndarray, target, label, groups, *, seed: int = 0) -> dict:
    """:func:`predictability` of ``target`` within each class of ``label``, pooled weighted by cells.

    ``chance`` is the within-class majority rate pooled the same way (= :func:`chance_given_class`);
    ``skill`` = (accuracy - chance) / (1 - chance): what the features say about ``target`` beyond the
    class. ``per_class`` keeps each class's own numbers.
    """
    t = pd.Series(target).astype(str).to_numpy()
    c = pd.Series(label).astype(str).to_numpy()
    g = np.asarray(groups)
    per, acc_n, ch_n, n = {}, 0.0, 0.0, 0
    for cls in sorted(set(c)):
        sel = c == cls
        r = predictability(X[sel], t[sel], g[sel], seed=seed)
        per[cls] = {**r, "n_cells": int(sel.sum())}
        acc = r["accuracy"] if r["accuracy"] is not None else r["chance"]  # one value: always right
        acc_n += acc * sel.sum()
        ch_n += r["chance"] * sel.sum()
        n += int(sel.sum())
    acc, chance = acc_n / n, ch_n / n
    skill = (acc - chance) / (1 - chance) if chance < 1 else None
    return {"accuracy": float(acc), "chance": float(chance), "skill": skill, "per_class": per}


def _silhouette(Z: np.ndarray, labels) -> float | None:
    labels = pd.Series(labels).astype(str).to_numpy()
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return None
    return float(silhouette_score(Z, labels, metric="cosine"))


def diagnose(data: MapData, *, seed: int = 0) -> dict:
    """Predictability of activation, donor and batch (same classifier and CV) and silhouettes."""
    X, meta = data.X, data.meta
    if len(meta) < 10:
        raise TprobeError(f"{data.name}: {len(meta)} cells; the diagnostics need at least 10")
    groups = meta["group"].astype(str).to_numpy()
    label = meta["label"].map(CLASS_NAMES).fillna(meta["label"].astype(str))
    targets = {"activation": label, "donor": meta["donor"]}
    if meta["batch"].notna().all():
        targets["batch"] = meta["batch"]
    t0 = time.perf_counter()
    pred = {}
    for t, v in targets.items():
        log.info(
            "map %s: predicting %s from %d cells x %d features (5-fold CV)...",
            data.name,
            t,
            len(meta),
            X.shape[1],
        )
        pred[t] = predictability(X, v, groups, seed=seed)
    within = {}
    for t in [t for t in targets if t != "activation"]:
        log.info("map %s: predicting %s within each class...", data.name, t)
        pred[t]["chance_given_class"] = chance_given_class(targets[t], label)
        within[t] = within_class(X, targets[t], label, groups, seed=seed)
    log.info("map %s: silhouettes (%.0f s so far)", data.name, time.perf_counter() - t0)
    Z = StandardScaler().fit_transform(X)
    sil = {
        t: _silhouette(Z, v)
        for t, v in {"label": label, **{k: v for k, v in targets.items() if k != "activation"}}.items()
    }
    warning = None
    a = pred["activation"]["skill"]
    over = [
        (t, w["skill"])
        for t, w in within.items()
        if w["skill"] is not None and a is not None and w["skill"] > a
    ]
    if over:
        names = " and ".join(t for t, _ in over)
        skills = ", ".join(f"{t} {s_:.2f}" for t, s_ in over)
        warning = (
            f"WARNING {data.name}: {names} {'is' if len(over) == 1 else 'are'} more predictable than activation "
            f"within each class (skill within class {skills} vs activation {a:.2f}; 0 = chance, 1 = perfect; "
            "measured against each class's own majority rate, so beyond what the class gives away): the "
            "features carry donor/batch identity; trust only donor-held-out results"
        )
    return {
        "source": data.name,
        "n_cells": int(len(meta)),
        "n_features": int(X.shape[1]),
        "predictability": pred,
        "within_class": within,
        "silhouette": sil,
        "warning": warning,
        "method": "multinomial logistic regression (C=0.1) on the top 64 PCs of standardised features, 5-fold CV stratified and grouped "
        "by cell; chance = majority-class rate; skill = (accuracy - chance) / (1 - chance); "
        "chance_given_class = accuracy of guessing from the class alone; within_class = the same "
        "classifier on one class's cells at a time against that class's majority rate, pooled "
        "weighted by cells; silhouette: cosine on standardised features",
    }


@dataclass
class MapDiagnostics:
    """:func:`diagnose`'s measures of one feature source, typed (``to_dict``: one entry of diagnostics.json).

    ``predictability``: per target (activation, donor, batch) the cross-validated accuracy, chance,
    skill and class count; ``within_class``: donor and batch predicted within each class against that
    class's own chance; ``silhouette``: per grouping; ``warning``: set when donor or batch is more
    predictable within class than activation; ``random_init``: the source is a random-weights model.
    """

    source: str
    n_cells: int
    n_features: int
    predictability: dict
    within_class: dict
    silhouette: dict
    warning: str | None = None
    method: str = ""
    random_init: bool = False

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> MapDiagnostics:
        known = {f.name for f in fields(cls)}
        d = {"within_class": {}, "silhouette": {}, "predictability": {}, **d}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lines(self) -> list[str]:
        """The diagnostics in words, one line each (what ``tprobe map`` prints under the source)."""
        out = []
        for t, v in self.predictability.items():
            if v["accuracy"] is not None:
                given = (
                    f", {v['chance_given_class']:.3f} knowing the class alone"
                    if "chance_given_class" in v
                    else ""
                )
                out.append(
                    f"{t:<10s} predicted with accuracy {v['accuracy']:.3f} (chance {v['chance']:.3f}{given}, "
                    f"{v['n_classes']} classes; skill {v['skill']:.2f})"
                )
        for t, w in self.within_class.items():
            sk = "–" if w["skill"] is None else f"{w['skill']:.2f}"
            out.append(
                f"{t:<10s} within each class: accuracy {w['accuracy']:.3f} (chance within class "
                f"{w['chance']:.3f}; skill {sk})"
            )
        sil = ", ".join(f"{k} {v:.3f}" for k, v in self.silhouette.items() if v is not None)
        out.append(f"silhouette (cosine): {sil}")
        return out


@dataclass
class SourceMap:
    """One feature source's map: PCA (and UMAP) coordinates beside each cell, and its diagnostics."""

    name: str
    kind: str  # the source's kind: store, table, pixels, ...
    coords: pd.DataFrame
    diagnostics: MapDiagnostics

    @property
    def stem(self) -> str:
        """The file-name part of this source: ``map-<stem>.png`` and ``map-<stem>.parquet``."""
        from tprobe.runs.record import safe_name

        return safe_name(self.name)

    @property
    def title(self) -> str:
        """The figure's title: the source's readable name, its cells and what was mapped."""
        from tprobe.plot.figures import source_label

        d = self.diagnostics
        what = "pooled tokens" if self.kind == "store" else "features"
        return f"{source_label(self.name)}: {d.n_cells} cells (original views), {what}" + (
            " — random weights: plumbing check" if d.random_init else ""
        )

    def plot(self, path: str | Path) -> Path:
        """Draw the map figure (:func:`plot_map`) to ``path``."""
        return plot_map(self.coords, self.diagnostics, path, title=self.title)


@dataclass
class EmbeddingMap:
    """Embedding maps of one or more feature sources (:func:`embedding_map`), typed.

    ``maps``: one :class:`SourceMap` per source, in order; ``diagnostics`` lists their
    :class:`MapDiagnostics`. ``save(out)`` writes the run folder ``tprobe map`` writes.
    """

    maps: list[SourceMap] = field(default_factory=list)
    umap: bool = True
    seed: int = 0

    @property
    def diagnostics(self) -> list[MapDiagnostics]:
        return [m.diagnostics for m in self.maps]

    def __getitem__(self, name: str) -> SourceMap:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(f"{name!r}: no such source; have {', '.join(m.name for m in self.maps)}")

    def __iter__(self):
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def save(self, out: str | Path) -> Path:
        """Write a new run folder ``out/<timestamp>-map`` and return its path.

        Per source ``map-<source>.parquet`` (the coordinates) and ``map-<source>.png`` (the figure), and
        ``diagnostics.json`` (every source's :class:`MapDiagnostics`).
        """
        from tprobe.runs.record import inside, make_run_dir, write_json

        run = make_run_dir(out, "map")
        for m in self.maps:
            m.coords.to_parquet(inside(run, f"map-{m.stem}.parquet"), index=False)
            m.plot(inside(run, f"map-{m.stem}.png"))
        write_json(run / "diagnostics.json", [d.to_dict() for d in self.diagnostics])
        return run


def embedding_map(
    sources: FeatureSet | Sequence[FeatureSet],
    manifest: pd.DataFrame | None = None,
    *,
    umap: bool = True,
    seed: int = 0,
) -> EmbeddingMap:
    """Diagnose and embed each source's original views (:func:`map_data`, :func:`diagnose`, :func:`embed`).

    ``manifest`` gives tables and pixels their imaging batch (a store reads its own manifest).
    """
    from tprobe.models.random_weights import is_random

    sources = [sources] if isinstance(sources, FeatureSet) else list(sources)
    if not sources:
        raise TprobeError("no feature sources: give a store, a model, a feature table or the pixels")
    maps = []
    for fs in sources:
        kind = fs.source.get("kind")
        md = map_data(fs, manifest if kind != "store" else None)
        diag = MapDiagnostics.from_dict({**diagnose(md, seed=seed), "random_init": is_random(fs.source)})
        maps.append(SourceMap(fs.name, kind, embed(md, umap=umap, seed=seed), diag))
    return EmbeddingMap(maps, umap=umap, seed=seed)


def embed(data: MapData, *, umap: bool = True, seed: int = 0) -> pd.DataFrame:
    """2-D PCA (and UMAP) coordinates of the standardised features, beside the cell's metadata."""
    t0 = time.perf_counter()
    log.info("map %s: PCA of %d cells x %d features", data.name, *data.X.shape)
    Z = StandardScaler().fit_transform(data.X)
    cols = ["image_id", "donor", "group", "label", "batch"]
    out = data.meta[[c for c in cols if c in data.meta.columns]].copy()
    pca = PCA(n_components=2, random_state=seed).fit(Z)
    out[["pca1", "pca2"]] = pca.transform(Z)
    out.attrs["pca_explained"] = [float(v) for v in pca.explained_variance_ratio_]
    if umap:
        try:
            import umap as umap_lib
        except ImportError:
            raise TprobeError("UMAP needs umap-learn: pip install umap-learn (or pass --no-umap)") from None
        log.info(
            "map %s: UMAP of %d cells x %d features (minutes for wide inputs such as pixels; --no-umap "
            "skips it)...",
            data.name,
            *Z.shape,
        )
        reducer = umap_lib.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed, n_jobs=1)
        out[["umap1", "umap2"]] = reducer.fit_transform(Z)
        log.info("map %s: UMAP done in %.0f s", data.name, time.perf_counter() - t0)
    return out


def category_colours(n: int) -> list:
    """``n`` colours that stay apart: tab10 up to 10; beyond, hues a golden-ratio step apart at three
    alternating lightnesses, bright ones darkened (no colour repeats, none pale)."""
    import colorsys

    import matplotlib.pyplot as plt

    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    out = []
    for i in range(n):
        rgb = np.array(colorsys.hls_to_rgb((i * 0.618034) % 1.0, (0.32, 0.45, 0.58)[i % 3], 0.8))
        lum = float(rgb @ [0.299, 0.587, 0.114])
        out.append((*(rgb * min(1.0, 0.62 / lum)), 1.0))  # yellows and cyans darkened: never pale on white
    return out


def _sort_key(v: str):
    """Natural order: ``donor_1·b2`` before ``donor_1·b10``."""
    import re

    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", v) if t]


def _scatter(ax, xy: np.ndarray, values, title: str, *, what: str, axis_names: tuple[str, str]):
    vals = pd.Series(values).astype(str).to_numpy()
    cats = sorted(set(vals), key=_sort_key)
    colours = category_colours(len(cats))
    lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    inside = ((xy >= lo) & (xy <= hi)).all(axis=1)  # outliers are left out (and counted), never half-drawn
    for i, c in enumerate(cats):
        sel = (vals == c) & inside
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.8, color=colours[i], label=c, lw=0, clip_on=False)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    outside = int((~inside).sum())
    if outside:  # a few outliers would otherwise squeeze the map into a corner
        title += f"\n(axes: 0.5-99.5th percentiles; {outside} outlying cells not shown)"
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(axis_names[0], fontsize=8)
    ax.set_ylabel(axis_names[1], fontsize=8)
    many = len(cats) > 12
    ax.legend(
        fontsize=5.5 if many else 6,
        markerscale=2,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        ncol=2 if many else 1,
        title=f"{len(cats)} {what}",
        title_fontsize=6.5,
        handletextpad=0.1,
        columnspacing=0.6,
        labelspacing=0.25 if many else 0.5,
    )


def axis_names(method: str, explained=None) -> tuple[str, str]:
    """Axis labels of a map panel: ``PC1 (32% of variance)``, ``PC2 (15% of variance)``; ``UMAP 1``, ``UMAP 2``."""
    if method == "pca":
        if explained:
            return tuple(f"PC{i + 1} ({v:.0%} of variance)" for i, v in enumerate(explained[:2]))
        return ("PC1", "PC2")
    return ("UMAP 1", "UMAP 2")


@matplotlib.rc_context({"text.parse_math": False})  # a $ in a name is text, not mathtext
def plot_map(
    coords: pd.DataFrame, diag: dict | MapDiagnostics, out: str | Path, *, title: str | None = None
) -> Path:
    """PCA (top) and UMAP (bottom) coloured by label, donor and batch, with the diagnostics below."""
    import matplotlib

    if isinstance(diag, MapDiagnostics):
        diag = diag.to_dict()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("pca", "umap") if f"{m}1" in coords]
    has_batch = coords["batch"].notna().all()
    by = [("label", "activation"), ("donor", "donor")] + ([("batch", "imaging batch")] if has_batch else [])
    # constrained layout packs the panels, legends and title; the diagnostics go below the panels and
    # the saved image grows to hold them (a fixed band reserved for them was left blank, or overflowed)
    fig, axes = plt.subplots(
        len(methods),
        len(by),
        figsize=(5.2 * len(by), 3.9 * len(methods) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    label = coords["label"].map(CLASS_NAMES).fillna(coords["label"].astype(str))
    ev = coords.attrs.get("pca_explained")
    plural = {"activation": "classes", "donor": "donors", "imaging batch": "imaging batches"}
    for r, m in enumerate(methods):
        xy = coords[[f"{m}1", f"{m}2"]].to_numpy()
        for c, (col, what) in enumerate(by):
            values = label if col == "label" else coords[col]
            _scatter(
                axes[r, c],
                xy,
                values,
                f"{m.upper()}, colour = {what}",
                what=plural[what],
                axis_names=axis_names(m, ev),
            )
    p = diag["predictability"]
    s = diag["silhouette"]

    def fmt(t):
        v = p.get(t)
        if not v or v["accuracy"] is None:
            return f"{t}: –"
        given = f", {v['chance_given_class']:.2f} from the class alone" if "chance_given_class" in v else ""
        return f"{t}: accuracy {v['accuracy']:.2f} (chance {v['chance']:.2f}{given}, skill {v['skill']:.2f})"

    def fmt_within(t, w):
        sk = "–" if w["skill"] is None else f"{w['skill']:.2f}"
        return f"{t} {w['accuracy']:.2f} (chance within class {w['chance']:.2f}, skill {sk})"

    within = diag.get("within_class") or {}
    sil = ", ".join(f"{k} {v:.3f}" for k, v in s.items() if v is not None)
    text = (
        "Predictable from the features (5-fold CV grouped by cell; skill 0 = chance, 1 = perfect): "
        + "; ".join(fmt(t) for t in p)
        + "."
        + (
            "\nWithin each class (every batch holds one class; chance = each class's majority rate): "
            + "; ".join(fmt_within(t, w) for t, w in within.items())
            + "."
            if within
            else ""
        )
        + f"\nSilhouette (cosine; higher = tighter clusters): {sil}."
        + (f"\n{diag['warning']}" if diag.get("warning") else "")
    )
    fig.suptitle(title or f"{diag['source']}: {diag['n_cells']} cells (original views)", fontsize=10)
    fig.canvas.draw()  # lay the panels out, then put the text under the lowest one's axis label
    bottom = min(ax.get_tightbbox().transformed(fig.transFigure.inverted()).y0 for ax in fig.axes)
    fig.text(
        0.01,
        bottom - 8 / 72 / fig.get_figheight(),
        text,
        fontsize=7.5,
        va="top",
        ha="left",
        wrap=True,
        color="firebrick" if diag.get("warning") else "black",
    )
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
