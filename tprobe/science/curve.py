"""Label-efficiency curves: how a head's held-out-donor AUC grows with the number of labelled cells.

For each outer fold (a held-out donor), ``k`` labelled *cells* per class are drawn from the training
donors only. A cell is a manifest ``group``: a drawn cell brings every one of its rows (with
``train_views="orig"``, the default, its original view; with ``"all"``, its augmented views too), and
no cell is ever split or taken from the held-out donor. The head is fitted on the drawn cells and
scores the held-out donor's original views. Each ``k`` is repeated ``repeats`` times with different
draws.

Choices, and why:

- **Fixed hyperparameters** (each head's defaults in :func:`tprobe.probing.heads.make_head`: logreg C=0.1 on
  standardised features with balanced class weights, knn k=20 capped at the training size, ...).
  With 1-8 cells per class an inner donor CV has nothing to validate on, and one setting for every
  ``k`` keeps the points of a curve comparable. ``params`` overrides them.
- **Nested draws**: per (fold, repeat) each class's training cells are shuffled once and ``k`` takes
  the first ``k``; the 4-cell draw holds the 2-cell draw. The shuffle depends only on the seed, the
  fold, the repeat and the sorted candidate cells, so sources with the same cells get the same draws
  (the curves of two feature sources are paired).
- ``k = "all"`` uses every training cell; it is fitted once (every repeat would draw the same cells).
- Original views only by default, so stores, one-row-per-image tables and pixels train on the same
  rows.

The figure's band is the 95% t-interval of the mean AUC over donors (each donor's AUC first averaged
over its draws, so the donor-to-donor spread carries the draw-to-draw one); see :func:`curve_band`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from tprobe.errors import TprobeError
from tprobe.features.sources import CLASS_NAMES, NORMALIZE, FeatureSet, donor_center
from tprobe.models.random_weights import is_random
from tprobe.probing.evaluate import checked_plan
from tprobe.probing.heads import HEADS, make_head
from tprobe.science import TRAIN_VIEWS

__all__ = [
    "LabelCurve",
    "DEFAULT_SHOTS",
    "TRAIN_VIEWS",
    "curve_band",
    "plot_curves",
    "parse_shots",
    "parse_heads",
]

DEFAULT_SHOTS = (1, 2, 4, 8, 16, 32, 64, "all")
log = logging.getLogger(__name__)


def parse_shots(text: str) -> tuple:
    """``"1,2,4,all"`` -> ``(1, 2, 4, "all")``; anything else is a one-line error naming --shots."""
    try:
        return tuple("all" if k.strip() == "all" else int(k) for k in str(text).split(","))
    except ValueError:
        raise TprobeError(f"--shots {text!r}: use comma-separated positive integers and all") from None


def parse_heads(text: str | Sequence[str]) -> list[str]:
    """``"logreg,knn"`` (or a list of names) -> the head names; ``all`` is every head in :data:`HEADS`."""
    if isinstance(text, str):
        if text.strip() == "all":
            return list(HEADS)
        text = text.split(",")
    heads = [str(h).strip() for h in text]
    for h in heads:
        if h not in HEADS:
            raise TprobeError(f"--head {h!r} is not one of {', '.join(HEADS)}")
    return heads


@dataclass
class LabelCurve:
    """Label-efficiency curves of one or more feature sources and heads.

    ``fit`` takes a :class:`~tprobe.features.sources.FeatureSet` or a list of them and fits every
    (source, head) pair (``head``: a name, a list of names, comma-separated names or ``all``); it fills
    ``results_`` (one row per held-out donor, draw and k), ``draws_`` (the cells each draw used),
    ``fits_`` (per source and head: the source, rows, features and seconds), ``random_sources_`` (names
    of sources from randomly initialised models) and ``seconds_``. ``save(out)`` writes the run folder.
    """

    head: str | Sequence[str] = "logreg"
    shots: tuple = DEFAULT_SHOTS
    repeats: int = 10
    seed: int = 0
    split: str = "leave-one-donor-out"
    test_donor: str | None = None
    train_views: str = "orig"
    params: dict = field(default_factory=dict)
    max_dims: int | None = 2048
    n_jobs: int = 1
    normalize: str = "standard"  # as ProbeRun.normalize: none, standard or donor-center

    @property
    def heads(self) -> list[str]:
        """The head names ``head`` stands for (``all``: every head)."""
        return parse_heads(self.head)

    def _validate(self):
        self.heads  # noqa: B018 - an unknown head is a one-line error
        if self.split not in ("leave-one-donor-out", "test-donor"):
            raise TprobeError(
                f"--split {self.split!r}: curves hold out whole donors; use leave-one-donor-out or test-donor"
            )
        if self.train_views not in TRAIN_VIEWS:
            raise TprobeError(f"--train-views {self.train_views!r} is not orig or all")
        if self.normalize not in NORMALIZE:
            raise TprobeError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMALIZE)}")
        if self.repeats < 1:
            raise TprobeError(f"--repeats {self.repeats}: need at least 1")
        for k in self.shots:
            if k != "all" and (not isinstance(k, int | np.integer) or k < 1):
                raise TprobeError(f"--shots {k!r}: use positive integers or all")

    def fit(self, features: FeatureSet | Sequence[FeatureSet]) -> LabelCurve:
        """Fit every (source, head) curve; ``features``: one FeatureSet or several (paired draws)."""
        self._validate()
        sets = [features] if isinstance(features, FeatureSet) else list(features)
        if not sets:
            raise TprobeError("no feature sources: give a store, a model, a feature table or the pixels")
        t0 = time.perf_counter()
        results, draws, fits = [], [], []
        for fs in sets:
            for h in self.heads:
                res, drawn, seconds = self._fit_one(fs, h)
                results.append(res)
                draws.append(drawn.assign(head=h))
                fits.append(
                    {
                        "source": fs.source,
                        "name": fs.name,
                        "head": h,
                        "n_rows": int(len(fs.meta)),
                        "n_features": int(fs.X.shape[1]),
                        "seconds": seconds,
                    }
                )
        self.results_ = pd.concat(results, ignore_index=True)
        self.draws_ = pd.concat(draws, ignore_index=True)
        self.fits_ = fits
        self.random_sources_ = [fs.name for fs in sets if is_random(fs.source)]
        self.source_ = sets[0].source if len(sets) == 1 else None
        self.seconds_ = time.perf_counter() - t0
        return self

    def _fit_one(self, fs: FeatureSet, head: str) -> tuple[pd.DataFrame, pd.DataFrame, float]:
        """One source and one head: (results, draws, seconds)."""
        t0 = time.perf_counter()
        meta = fs.meta.reset_index(drop=True)
        # a fold whose training donors hold one class is refused: its draws never held both (it was left out)
        plan = checked_plan(meta, self.split, test_donor=self.test_donor, what="curve")
        self._check_shots(meta, plan)
        X = fs.X
        if self.max_dims is not None and X.shape[1] > self.max_dims:
            from sklearn.random_projection import GaussianRandomProjection

            # data-independent, as in ProbeRun: cannot leak, keeps wide inputs (pixels, concat) cheap
            X = GaussianRandomProjection(self.max_dims, random_state=self.seed).fit(X[:1]).transform(X)
            X = X.astype(np.float32)
        if self.normalize == "donor-center":  # fold-independent, label-free: see features.donor_center
            X = donor_center(X, meta["donor"], (meta["view"] == "orig").to_numpy())
        jobs = [(fold, r) for fold in plan for r in range(self.repeats)]
        log.info(
            "curve %s · %s: %d held-out donor(s) x %d draws x %d k on %d rows x %d features",
            fs.name,
            head,
            len(plan),
            self.repeats,
            len(self.shots),
            len(meta),
            X.shape[1],
        )
        out = []
        results = Parallel(n_jobs=self.n_jobs, return_as="generator")(
            delayed(self._one)(X, meta, fold, r, head) for fold, r in jobs
        )
        for i, res in enumerate(results, 1):  # in order: a fold is done when its last draw is
            out.append(res)
            if i % self.repeats == 0:
                fold = jobs[i - 1][0]
                log.info(
                    "curve %s · %s: held out %s done (%d/%d), %.1f s",
                    fs.name,
                    head,
                    ",".join(fold.test_donors),
                    i // self.repeats,
                    len(plan),
                    time.perf_counter() - t0,
                )
        results = pd.DataFrame([row for rows, _ in out for row in rows])
        draws = pd.concat([d for _, d in out], ignore_index=True)
        results.insert(0, "source", fs.name)
        results.insert(1, "head", head)
        draws.insert(0, "source", fs.name)
        results["k"] = results["k"].astype("Int64")
        return results, draws, time.perf_counter() - t0

    def _check_shots(self, meta: pd.DataFrame, plan) -> None:
        """Every numeric ``k`` must be drawable per class in every fold: with fewer cells of a class the draw
        took them all, and the point was plotted and tabled at ``k`` cells per class all the same."""
        ks = [int(k) for k in self.shots if k != "all"]
        if not ks:
            return
        for fold in plan:
            train = meta.iloc[fold.train]
            for c in (1, 0):
                n = int(train.loc[train["label"] == c, "group"].nunique())
                if n < max(ks):
                    k = min(k for k in ks if k > n)
                    raise TprobeError(
                        f"--shots {k}: the training donors of held-out {','.join(fold.test_donors)} hold "
                        f"{n} {CLASS_NAMES[c]} cells, fewer than {k} per class; use "
                        f"--shots up to {n} (all draws every cell)"
                    )

    def _draw_order(self, meta: pd.DataFrame, fold, r: int) -> dict[int, np.ndarray]:
        """Per class, the training donors' cells in this (fold, repeat)'s shuffled order."""
        train = meta.iloc[fold.train]
        rng = np.random.default_rng([self.seed, fold.index, r])
        order = {}
        for c in (0, 1):
            cells = np.array(sorted(train.loc[train["label"] == c, "group"].astype(str).unique()))
            order[c] = cells[rng.permutation(len(cells))]
        return order

    def _one(self, X, meta, fold, r, head):
        y = meta["label"].to_numpy()
        groups = meta["group"].astype(str).to_numpy()
        is_orig = (meta["view"] == "orig").to_numpy()
        test = fold.test[is_orig[fold.test]]
        train_rows = fold.train if self.train_views == "all" else fold.train[is_orig[fold.train]]
        order = self._draw_order(meta, fold, r)
        # the MLP without early stopping: its 15% validation split cannot be drawn from 1-2 cells per class,
        # and one setting for every k keeps the curve's points comparable
        params = {"clf__early_stopping": False, **self.params} if head == "mlp" else self.params
        rows, draws = [], []
        for k in self.shots:
            if k == "all" and r > 0:
                continue  # the same cells every repeat: fitted once
            drawn = {c: (cells if k == "all" else cells[:k]) for c, cells in order.items()}
            if min(len(v) for v in drawn.values()) == 0:
                continue
            cells = np.concatenate(list(drawn.values()))
            tr = train_rows[np.isin(groups[train_rows], cells)]
            model = make_head(head, seed=self.seed + r, scale=self.normalize != "none", **params)
            model = model.fit(X[tr], y[tr])
            p = model.predict_proba(X[test])[:, 1]
            kk = None if k == "all" else int(k)
            for donor in fold.test_donors:
                sel = meta["donor"].to_numpy()[test] == donor
                yt, pt = y[test][sel], p[sel]
                two = len(np.unique(yt)) == 2
                rows.append(
                    {
                        "k": kk,
                        "shots": str(k),
                        "repeat": r,
                        "donor": donor,
                        "fold": fold.index,
                        "n_train_cells": int(len(cells)),
                        "n_train_rows": int(len(tr)),
                        "n_train_activated": int(len(drawn[1])),
                        "n_train_quiescent": int(len(drawn[0])),
                        "n_test_cells": int(sel.sum()),
                        "prevalence": float(yt.mean()),
                        "roc_auc": roc_auc_score(yt, pt) if two else np.nan,
                        "average_precision": average_precision_score(yt, pt) if two else np.nan,
                        "balanced_accuracy": balanced_accuracy_score(yt, pt >= 0.5) if two else np.nan,
                        "accuracy": float(np.mean(yt == (pt >= 0.5))),
                    }
                )
            for c, cs in drawn.items():
                draws.append(
                    pd.DataFrame(
                        {
                            "fold": fold.index,
                            "test_donor": ",".join(fold.test_donors),
                            "shots": str(k),
                            "repeat": r,
                            "label": c,
                            "group": cs,
                        }
                    )
                )
        return rows, pd.concat(draws, ignore_index=True) if draws else pd.DataFrame()

    def band(self) -> pd.DataFrame:
        """The figure's numbers: per (source, head, shots) the mean AUC and its 95% band (:func:`curve_band`)."""
        return curve_band(self.results_)

    def auc_table(self) -> pd.DataFrame:
        """Sources and heads (rows) by labelled cells per class (columns): ``mean [low, high]`` ROC AUC."""
        band = self.band()
        band = band.assign(
            auc=[
                f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
                for m, lo, hi in zip(band["mean"], band["low"], band["high"], strict=True)
            ]
        )
        wide = band.pivot(index=["source", "head"], columns="shots", values="auc")
        return wide[[str(k) for k in self.shots if str(k) in wide.columns]]

    def config(self) -> dict:
        """What ``config.json`` records: the options, each source's provenance and its fitting time."""
        return {
            "command": "curve",
            "heads": self.heads,
            "shots": list(self.shots),
            "repeats": self.repeats,
            "seed": self.seed,
            "split": self.split,
            "test_donor": self.test_donor,
            "train_views": self.train_views,
            "normalize": self.normalize,
            "sources": [
                {"source": f["source"], "head": f["head"], "seconds": round(f["seconds"], 2)}
                for f in self.fits_
            ],
            "random_init_sources": self.random_sources_,
        }

    def save(self, out: str | Path) -> Path:
        """Write a new run folder ``out/<timestamp>-curve`` and return its path.

        It holds ``curve.parquet`` (one row per held-out donor, draw and k), ``draws.parquet`` (the cells
        of every draw), ``curve_band.csv`` (:meth:`band`), ``curve.png`` (:func:`plot_curves`) and
        ``config.json`` (:meth:`config`), as ``tprobe curve`` writes them.
        """
        from tprobe.runs.record import make_run_dir, write_json

        if not hasattr(self, "results_"):
            raise TprobeError("this LabelCurve is not fitted: call .fit(features) (or tprobe.curve) first")
        run = make_run_dir(out, "curve")
        self.results_.to_parquet(run / "curve.parquet", index=False)
        self.draws_.to_parquet(run / "draws.parquet", index=False)
        self.band().to_csv(run / "curve_band.csv", index=False)
        plot_curves(self.results_, run / "curve.png", random_sources=self.random_sources_)
        write_json(run / "config.json", self.config())
        return run


def curve_band(
    results: pd.DataFrame, metric: str = "roc_auc", *, n_boot: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """Per (source, head, shots): mean over donors and repeats, and the t-interval 95% band.

    The mean averages repeats within each donor, then donors. The band is the t-interval over the
    per-donor means (mean ± t_{0.975,D-1}·sd/√D, :func:`tprobe.stats.t_interval`): a donor's mean over
    draws already carries the draw-to-draw noise, so the spread across donors holds both. With one
    held-out donor it is the t-interval over that donor's draws (draw-to-draw spread only);
    ``band_method`` says which. Donors whose metric is undefined (one class) are left out. ``x`` is
    ``k``, or for ``all`` the mean number of training cells per class. ``n_boot`` and ``seed`` are
    ignored (deprecated: the two-level percentile bootstrap they drove was too narrow at 6 donors).
    """
    from tprobe.stats import t_interval

    rows = []
    for (src, head, shots), d in results.groupby(["source", "head", "shots"], sort=False):
        wide = d.pivot_table(index="donor", columns="repeat", values=metric, aggfunc="mean")
        wide = wide.dropna(how="all")
        v = wide.to_numpy(dtype=float)
        if not v.size:
            continue
        per_donor = np.nanmean(v, axis=1)
        D, R = v.shape
        if D > 1:
            (lo, hi), how = t_interval(per_donor), "t over donors"
        else:
            (lo, hi), how = t_interval(v[0]), "t over draws (one donor)"
        x = float(d["k"].iloc[0]) if shots != "all" else float(d["n_train_cells"].mean() / 2)
        rows.append(
            {
                "source": src,
                "head": head,
                "shots": shots,
                "x": x,
                "mean": float(per_donor.mean()),
                "low": lo,
                "high": hi,
                "n_donors": D,
                "n_repeats": R,
                "band_method": how,
            }
        )
    return pd.DataFrame(rows).sort_values(["source", "head", "x"]).reset_index(drop=True)


def all_label(results: pd.DataFrame, source: str, head: str) -> str:
    """The ``all`` tick: the training cells per class it used (mean over folds), e.g. ``all\n(~120 act / ~60 qui)``.

    The x position of ``all`` is the mean per class; with unequal classes the tick names both counts.
    """
    r = results[(results["source"] == source) & (results["head"] == head) & (results["shots"] == "all")]
    if {"n_train_activated", "n_train_quiescent"} <= set(r.columns) and r["n_train_activated"].notna().all():
        return f"all\n(~{r['n_train_activated'].mean():.0f} act /\n~{r['n_train_quiescent'].mean():.0f} qui)"
    return f"all\n(~{r['n_train_cells'].mean():.0f} cells)"  # curves written before the per-class counts


@matplotlib.rc_context({"text.parse_math": False})  # a $ in a name is text, not mathtext
def plot_curves(
    results: pd.DataFrame,
    out: str | Path,
    *,
    metric: str = "roc_auc",
    random_sources=(),
    title: str | None = None,
) -> Path:
    """AUC against labelled cells per class (log x), one line + 95% band per source (and head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tprobe.plot.figures import source_label

    band = curve_band(results, metric)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    keys = list(dict.fromkeys(zip(band["source"], band["head"], strict=True)))
    several_heads = band["head"].nunique() > 1
    for i, (src, head) in enumerate(keys):
        b = band[(band["source"] == src) & (band["head"] == head)]
        colour = plt.cm.tab10(i % 10)
        label = f"{source_label(src)} · {head}" if several_heads else source_label(src)
        if src in random_sources:
            label += " (random weights: plumbing check)"
        ax.plot(b["x"], b["mean"], "-o", ms=3.5, lw=1.6, color=colour, label=label)
        ax.fill_between(b["x"], b["low"], b["high"], color=colour, alpha=0.18, lw=0)
    ax.axhline(0.5, ls="--", c="grey", lw=0.9, label="chance (AUC 0.5)")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(band["x"]))
    names = {float(x): s for x, s in zip(band["x"], band["shots"], strict=True) if s != "all"}
    names.update(
        {
            float(x): all_label(results, src, h)
            for x, s, src, h in zip(band["x"], band["shots"], band["source"], band["head"], strict=True)
            if s == "all"
        }
    )
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[float(t)] for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("labelled cells per class (drawn from the training donors; log scale)")
    nice = {
        "roc_auc": "ROC AUC",
        "average_precision": "average precision",
        "balanced_accuracy": "balanced accuracy",
    }
    ax.set_ylabel(f"{nice.get(metric, metric)} on the held-out donor")
    lo = min(0.45, float(np.nanmin(band["low"])) - 0.02) if len(band) else 0.45
    ax.set_ylim(lo, 1.0)
    n_d = int(band["n_donors"].max()) if len(band) else 0
    reps = int(results["repeat"].max()) + 1 if len(results) else 0
    heads = sorted(set(band["head"]))
    split = "leave-one-donor-out" if n_d > 1 else "one held-out donor"
    ax.set_title(
        title
        or (
            f"Label efficiency: {', '.join(heads)} head{'s' if len(heads) > 1 else ''}, {split} "
            f"({n_d} donor{'s' if n_d > 1 else ''}), {reps} draws per k\nline: mean; band: 95% "
            + ("t-interval over donors" if n_d > 1 else "t-interval over draws")
        ),
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.25)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
