"""Paired comparisons of runs scored on the same held-out donors.

Two runs evaluated on the same outer folds give one metric value per held-out donor each; their
per-donor differences are the paired sample. The test is the exact paired permutation (sign-flip)
test: under the null hypothesis that the two runs are exchangeable on every donor, each donor's
difference is as likely positive as negative, so the 2^n sign patterns are equally likely. The
two-sided p-value is the fraction of patterns whose mean difference is at least as far from 0 as
the observed one. Why this test: with 6 donors every pattern can be enumerated, so the p-value is
exact, with no normal approximation (a paired t-test would need one, and six differences cannot
check normality). The smallest p-value it can give is 2/2^n (1/32 with 6 donors); Wilcoxon's exact
signed-rank test has the same floor and discards the sizes of the differences, which this test uses.

Holm's step-down correction controls the family-wise error over the comparisons shown.

Intervals: the 95% interval of a mean over donors is the t-interval over the per-donor values,
mean ± t_{0.975, n-1} · sd / √n (:func:`t_interval`). The percentile bootstrap over donors used before
is too narrow with few donors: simulated at n = 6 it covers 86% at nominal 95%, the t-interval 95%
(``tests/test_reviewer_stats.py::test_t_interval_covers_at_six_donors_and_the_bootstrap_did_not``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "sign_flip_test",
    "sign_flip_test_mc",
    "holm",
    "paired_comparisons",
    "t_interval",
    "sign_flip_floor",
    "TEST_NOTE",
    "CI_METHOD",
    "brier_score",
    "expected_calibration_error",
    "reliability_table",
    "ECE_BINS",
    "ECE_NOTE",
]

ECE_BINS = 10
ECE_NOTE = (
    f"ECE: expected calibration error over {ECE_BINS} equal-width bins of p_activated on [0, 1], "
    "sum over bins of (cells in bin / cells) x |activated fraction - mean p|; Brier: mean (p - label)^2"
)

CI_METHOD = "t over donors: mean ± t(0.975, n-1)·sd/√n, clipped to the metric's range [0, 1]"

TEST_NOTE = (
    "Paired test: exact sign-flip permutation test on the per-donor differences (two-sided; all 2^n "
    "sign patterns enumerated, no normal approximation). With n donors the smallest possible p is "
    "2/2^n (1/32 for 6 donors), the same floor as Wilcoxon's exact signed-rank test, which would also "
    "discard the sizes of the differences. p_holm: Holm's correction across the comparisons shown for "
    "that metric; with m comparisons its smallest value is m times the floor (m/32 for 6 donors), so "
    "with 6 donors only a few planned comparisons can reach 0.05."
)


def t_interval(
    values, level: float = 0.95, *, bounds: tuple[float, float] = (0.0, 1.0)
) -> tuple[float, float]:
    """The t-interval of the mean of ``values`` (NaN ignored): mean ± t_{(1+level)/2, n-1}·sd/√n,
    clipped to ``bounds`` (every tprobe metric lies in [0, 1], so its mean does; ``None``: no clipping).

    Honest at small n when the values are roughly normal (coverage 94.6% at n = 6 in simulation);
    NaN bounds with fewer than two values (no spread to estimate).
    """
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    lo, hi = float(v.mean() - half), float(v.mean() + half)
    return (lo, hi) if bounds is None else (max(lo, bounds[0]), min(hi, bounds[1]))


def reliability_table(y, p, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width bin of ``p`` on [0, 1] (the last bin holds p = 1): n, mean p, activated fraction."""
    y, p = np.asarray(y, dtype=float), np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = []
    for i in range(n_bins):
        sel = b == i
        rows.append(
            {
                "bin": i,
                "low": i / n_bins,
                "high": (i + 1) / n_bins,
                "n": int(sel.sum()),
                "mean_p": float(p[sel].mean()) if sel.any() else np.nan,
                "frac_activated": float(y[sel].mean()) if sel.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(y, p, n_bins: int = ECE_BINS) -> float:
    """ECE over ``n_bins`` equal-width bins: sum_b (n_b / n) |activated fraction_b - mean p_b|."""
    t = reliability_table(y, p, n_bins)
    t = t[t["n"] > 0]
    if not len(t):
        return float("nan")
    return float((t["n"] * (t["frac_activated"] - t["mean_p"]).abs()).sum() / t["n"].sum())


def brier_score(y, p) -> float:
    """Mean squared difference between the predicted probability and the 0/1 label."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def sign_flip_floor(n: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with ``n`` pairs: 2/2^n."""
    return 2.0 / 2**n if n > 0 else float("nan")


def _pattern_sums(d: np.ndarray) -> np.ndarray:
    """The 2^len(d) sums of ``d`` under every sign pattern."""
    out = np.zeros(1)
    for v in d:
        out = np.concatenate([out + v, out - v])
    return out


# the sign-flip test counts every pattern up to this many pairs; above it, SIGN_FLIP_DRAWS seeded random ones
SIGN_FLIP_EXACT_MAX = 40
SIGN_FLIP_DRAWS = 100_000
SIGN_FLIP_NOTE = (
    f"p from {SIGN_FLIP_DRAWS:,} random sign patterns (seed 0): (1 + k) / (1 + draws), k of them at least "
    f"as extreme; exact (every pattern) up to {SIGN_FLIP_EXACT_MAX} donors"
)


def sign_flip_test(diffs) -> float:
    """Two-sided p-value of the paired sign-flip test for the mean of ``diffs``; exact up to
    :data:`SIGN_FLIP_EXACT_MAX` pairs, above it from random patterns (:func:`sign_flip_test_mc`).

    Every one of the 2^n sign patterns is counted, without listing them: the sums of each half's
    patterns (2^(n/2) each) are paired by sorting and binary search, so 40 donors cost ~2 x 2^20 sums,
    not 2^40 (listing them all stopped at 20 donors)."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    n = len(d)
    if not n:
        return float("nan")
    if n > SIGN_FLIP_EXACT_MAX:
        return sign_flip_test_mc(d)
    t = abs(d.sum()) - 1e-12 * n  # |mean| at least the observed one's, to 1e-12 (ties between patterns)
    if t <= 0:
        return 1.0
    a, b = _pattern_sums(d[: n // 2]), np.sort(_pattern_sums(d[n // 2 :]))
    above = len(b) - np.searchsorted(b, t - a, side="left")  # a + b >= t
    below = np.searchsorted(b, -t - a, side="right")  # a + b <= -t
    return float((above.sum() + below.sum()) / 2.0**n)


def sign_flip_test_mc(diffs, draws: int = SIGN_FLIP_DRAWS, seed: int = 0) -> float:
    """The sign-flip test's two-sided p-value from ``draws`` seeded random sign patterns: (1 + k) / (1 + draws),
    k the patterns whose |sum| is at least the observed one's (a valid p-value, never 0; Phipson & Smyth
    2010). Deterministic for a given ``seed``."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    if not len(d):
        return float("nan")
    t = abs(d.sum()) - 1e-12 * len(d)
    if t <= 0:
        return 1.0
    rng = np.random.default_rng(seed)
    k, block = 0, 8192
    for start in range(0, draws, block):
        signs = rng.integers(0, 2, size=(min(block, draws - start), len(d)), dtype=np.int8) * 2 - 1
        k += int((np.abs(signs @ d) >= t).sum())
    return float((1 + k) / (1 + draws))


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _per_donor(run: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run) / "per_donor.parquet").set_index("donor")


def paired_comparisons(
    summary: pd.DataFrame, *, against: str, metrics=("roc_auc", "average_precision")
) -> pd.DataFrame:
    """Each run vs ``against`` on their shared donors. ``against`` is declared, never the run that happened
    to win: ``tprobe report`` passes :func:`tprobe.runs.report.choose_reference`'s run (``--reference``, or a
    rule that reads no result).

    ``summary`` is :func:`tprobe.runs.report.collect_runs`'s table (``run``, ``label``, ``roc_auc_mean``).
    Only runs whose held-out donors are exactly the reference's are compared (same folds); the
    others are listed with a note. Returns one row per (run, metric): the mean and per-donor
    differences (run minus reference), the sign-flip p-value (exact up to
    40 donors; above, from seeded random patterns, said in ``note``) and its Holm adjustment within the metric.
    """
    ref = _per_donor(against)
    ref_label = summary.set_index("run").loc[against, "label"]
    ref_cells = summary.set_index("run").loc[against].get("n_cells")
    rows = []
    for rec in summary.itertuples():
        if rec.run == against:
            continue
        per = _per_donor(rec.run)
        # paired only on the same folds: the same held-out donors and the same cells scored
        same = set(per.index) == set(ref.index) and getattr(rec, "n_cells", ref_cells) == ref_cells
        for m in metrics:
            row = {
                "run": rec.run,
                "label": rec.label,
                "reference": against,
                "reference_label": ref_label,
                "metric": m,
                "n_donors": len(per),
                "mean_diff": np.nan,
                "p": np.nan,
                "diffs": "",
                "note": "",
            }
            if not same:
                row["note"] = "different held-out donors: not paired"
            else:
                d = (per[m] - ref.loc[per.index, m]).dropna()
                row.update(
                    n_donors=len(d),
                    mean_diff=float(d.mean()) if len(d) else np.nan,
                    p=sign_flip_test(d.to_numpy()),
                    diffs=" ".join(f"{k.replace('donor_', 'd')}:{v:+.3f}" for k, v in d.items()),
                    note=SIGN_FLIP_NOTE if len(d) > SIGN_FLIP_EXACT_MAX else "",
                )
            rows.append(row)
    cols = [
        "label",
        "reference_label",
        "metric",
        "n_donors",
        "mean_diff",
        "p",
        "p_holm",
        "diffs",
        "note",
        "run",
        "reference",
    ]
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)
    out["p_holm"] = np.nan
    for m in metrics:
        sel = out["metric"] == m
        out.loc[sel, "p_holm"] = holm(out.loc[sel, "p"].to_numpy())
    return out[cols]
