"""The fast nested-CV engine against the reference one, and sweeps through the library call."""

from functools import partial

import numpy as np
import pandas as pd
import pytest

from tprobe.cache.store import POOLS
from tprobe.errors import TprobeError
from tprobe.features.sources import FeatureSet, from_store
from tprobe.probing.evaluate import nested_cv, split_plan
from tprobe.probing.fastcv import FoldProgress, nested_cv_fast
from tprobe.probing.heads import make_head
from tprobe.probing.run import ProbeRun
from tprobe.probing.sweep import pool_store, run_sweep


def synthetic(n_donors=4, cells=30, views=("orig", "flip"), n_features=12, seed=0, pool="syn") -> FeatureSet:
    """Cells with a weak label signal in a few features, a per-donor shift, and augmented views."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(1, n_donors + 1):
        shift = rng.normal(0, 0.5, n_features)
        for c in range(cells):
            label = int(rng.random() < 0.3 + 0.1 * d)
            base = rng.normal(0, 1, n_features) + shift
            base[:3] += 0.9 * label
            for v in views:
                X.append(base + rng.normal(0, 0.3, n_features))
                rows.append(
                    {
                        "image_id": f"d{d}c{c}-{v}",
                        "path": f"donor_{d}/c{c}.png",
                        "label": label,
                        "donor": f"donor_{d}",
                        "group": f"d{d}c{c}",
                        "view": v,
                    }
                )
    meta = pd.DataFrame(rows)
    return FeatureSet(np.asarray(X, np.float32), meta, {"name": f"synthetic-{pool}", "pool": pool})


def _both(head, grid, fs, **kw):
    make = partial(make_head, head, seed=0)
    plan = split_plan(fs.meta)
    ref = nested_cv(make, grid, fs.X, fs.meta, plan, n_jobs=1, **kw)
    events = []
    fast, final = nested_cv_fast(make, grid, fs.X, fs.meta, plan, n_jobs=2, progress=events.append, **kw)
    return ref, fast, final, events, plan


def assert_engines_agree(ref_chosen, ref_preds, fast_chosen, fast_preds, tol):
    """The engines agree fold by fold, robust to near-ties in the inner search.

    Both engines' inner scores agree within ``tol`` (logreg's warm-started C path is equal only up to the
    solver's tolerance). Where the reference's best grid point leads the next by more than ``2 * tol`` the
    choice is unambiguous: both engines must pick it and score the held-out donor alike. In a near-tie
    either pick is right (a BLAS or solver change flips it), so only that the fast pick is tied is checked.
    Returns how many folds were compared on their predictions.
    """
    compared = 0
    for a, b in zip(ref_chosen, fast_chosen, strict=True):
        assert a["fold"] == b["fold"] and a["inner_ap"].keys() == b["inner_ap"].keys()
        np.testing.assert_allclose(list(a["inner_ap"].values()), list(b["inner_ap"].values()), atol=tol)
        ranked = sorted(a["inner_ap"].values(), reverse=True)
        if len(ranked) < 2 or ranked[0] - ranked[1] > 2 * tol:
            assert b["params"] == a["params"], (a, b)
            pa, pb = (p[p["fold"] == a["fold"]].reset_index(drop=True) for p in (ref_preds, fast_preds))
            pd.testing.assert_frame_equal(pa.drop(columns="p_activated"), pb.drop(columns="p_activated"))
            np.testing.assert_allclose(pb["p_activated"], pa["p_activated"], atol=tol)
            compared += 1
        else:  # a near-tie: the fast pick scores within the tie margin of the reference's best
            assert a["inner_ap"][str(b["params"])] >= ranked[0] - 2 * tol, (a, b)
    return compared


@pytest.mark.parametrize(
    "head, grid",
    [
        # C is a warm path: one job fits C ascending, each warm-started (equal up to the solver's tolerance)
        ("logreg", [{"clf__C": 0.01}, {"clf__C": 0.1}, {"clf__C": 1.0}]),
        ("mlp", [{"clf__alpha": 1e-3}, {"clf__alpha": 1e-1}]),
        # n_estimators is a path parameter: fitted once at 40 trees, scored at 10/20/40 via iteration_range
        ("xgboost", [{"clf__max_depth": d, "clf__n_estimators": n} for d in (2, 3) for n in (10, 20, 40)]),
        # k is a path parameter: one neighbour search at k=10, scored at 3/5/10 (KNNHead.predict_proba_path)
        ("knn", [{"clf__k": k} for k in (3, 5, 10)]),
    ],
)
@pytest.mark.parametrize("tta", [False, True])
def test_fast_engine_matches_the_reference(head, grid, tta):
    fs = synthetic()
    ref, fast, final, events, plan = _both(head, grid, fs, tta=tta)
    tol = 2e-3 if head == "logreg" else 1e-6  # exact fits but for the warm-started C path
    assert_engines_agree(ref.chosen, ref.predictions, fast.chosen, fast.predictions, tol)
    assert list(fast.predictions["image_id"]) == list(ref.predictions["image_id"])
    # scored rows are original views only, whatever tta does to their probabilities
    assert set(fast.predictions["image_id"].str.endswith("-orig")) == {True}
    # one progress report per outer fold, then the final head's search
    assert [e.step for e in events] == list(range(1, len(plan) + 2))
    assert all(isinstance(e, FoldProgress) and e.seconds >= 0 for e in events)
    assert "fold 1/4 (donor_1)" in str(events[0])


def test_fast_engine_shares_fits_and_its_final_search_matches_the_reference():
    fs = synthetic()
    grid = [{"clf__alpha": 1e-3}, {"clf__alpha": 1e-1}]
    _, _, final, events, plan = _both("mlp", grid, fs)
    from tprobe.probing.evaluate import inner_search

    make = partial(make_head, "mlp", seed=0)
    is_orig = (fs.meta["view"] == "orig").to_numpy()
    best, scores = inner_search(
        make, grid, fs.X, fs.meta["label"].to_numpy(), fs.meta, np.flatnonzero(is_orig), is_orig, n_jobs=1
    )
    assert final[0] == best
    np.testing.assert_allclose(list(final[1].values()), list(scores.values()), atol=1e-9)
    # 4 donors x 2 grid points: 6 donor pairs + 4 single-donor fits per grid point = 20 distinct fits,
    # where the reference makes 4 folds x (3 inner x 2 + 1 refit) + 4 x 2 final-search fits = 36
    assert sum(e.fits for e in events) == 20
    assert events[-1].fits == 0  # the final search reuses the outer folds' fits


def test_probe_run_engines_agree_and_keep_the_public_results():
    fs = synthetic(n_donors=3)
    runs = {e: ProbeRun(head="xgboost", engine=e, n_boot=50).fit(fs) for e in ("reference", "fast")}
    ref, fast = runs["reference"], runs["fast"]
    np.testing.assert_allclose(fast.per_donor_["roc_auc"], ref.per_donor_["roc_auc"], atol=1e-9)
    assert fast.final_["params"] == ref.final_["params"]
    np.testing.assert_allclose(
        fast.final_["model"].predict_proba(fs.X), ref.final_["model"].predict_proba(fs.X), atol=1e-6
    )
    assert fast.summary_ == ref.summary_ and fast.reference_ == ref.reference_


def test_wide_inputs_are_projected_once_per_feature_set_and_match_the_reference():
    fs = synthetic(n_donors=3, n_features=40)
    ref = ProbeRun(head="logreg", engine="reference", max_dims=16, n_boot=20, final_head=False).fit(fs)
    fast = ProbeRun(head="logreg", max_dims=16, n_boot=20).fit(fs)
    assert fast.projection_ is fs._projections[(16, 0)][0]
    # (logreg's C path is warm-started: equal up to the solver's tolerance, so near-ties may pick either C)
    assert_engines_agree(ref.chosen_, ref.predictions_, fast.chosen_, fast.predictions_, tol=2e-3)
    # a predict-time pipeline of projection + head, as before
    assert fast.final_["model"].predict_proba(fs.X).shape == (len(fs.X), 2)


def test_wide_inputs_match_the_reference_at_equal_c(monkeypatch):
    import tprobe.probing.heads as heads

    monkeypatch.setitem(heads.GRIDS, "logreg", {"clf__C": [0.01]})  # no choice: compare the fits themselves
    fs = synthetic(n_donors=3, n_features=40)
    ref = ProbeRun(head="logreg", engine="reference", max_dims=16, n_boot=20, final_head=False).fit(fs)
    fast = ProbeRun(head="logreg", max_dims=16, n_boot=20, final_head=False).fit(fs)
    np.testing.assert_allclose(fast.predictions_["p_activated"], ref.predictions_["p_activated"], atol=2e-3)


def test_a_near_tie_in_the_inner_search_does_not_decide_engine_equality():
    # the fresh-venv failure (scikit-learn 1.9.1): fold 0's inner APs 0.7175 (C=0.001) vs 0.7182 (C=0.01),
    # within the warm path's tolerance, and the engines picked different C; predictions differed by 0.107
    scores = {"{'clf__C': 0.001}": 0.7175, "{'clf__C': 0.01}": 0.7182, "{'clf__C': 0.1}": 0.702}
    ref_c = [{"fold": 0, "params": {"clf__C": 0.001}, "inner_ap": {**scores, "{'clf__C': 0.001}": 0.7186}}]
    fast_c = [{"fold": 0, "params": {"clf__C": 0.01}, "inner_ap": scores}]
    preds = pd.DataFrame({"image_id": ["a", "b"], "fold": [0, 0], "p_activated": [0.5, 0.6]})
    other = preds.assign(p_activated=[0.607, 0.6])
    assert assert_engines_agree(ref_c, preds, fast_c, other, tol=2e-3) == 0  # a tie: either C is right
    clear = {**scores, "{'clf__C': 0.001}": 0.65}  # C=0.01 leads clearly: the engines must agree
    with pytest.raises(AssertionError):
        assert_engines_agree(
            [{**ref_c[0], "inner_ap": clear}], preds, [{**fast_c[0], "inner_ap": clear}], other, tol=2e-3
        )


def test_auto_width_projects_only_wide_inputs_and_xgboost_to_fewer_columns(monkeypatch):
    import tprobe.probing.heads as heads

    assert heads.projection_width("xgboost", 40320) == 512 and heads.projection_width("logreg", 40320) == 2048
    assert heads.projection_width("xgboost", 768) is None  # narrow inputs keep their own columns
    assert heads.projection_width("xgboost", 768, 256) == 256
    assert heads.projection_width("mlp", 9, None) is None
    with pytest.raises(TprobeError, match="max_dims"):
        ProbeRun(max_dims="wide").fit(synthetic(n_donors=2))
    # the same rule at test scale: wider than 16 -> 16 columns, 8 for xgboost; both engines agree
    monkeypatch.setattr(heads, "MAX_DIMS", 16)
    monkeypatch.setattr(heads, "HEAD_DIMS", {"xgboost": 8})
    fs = synthetic(n_donors=3, n_features=40)
    kw = {"n_boot": 20, "final_head": False}
    ref = ProbeRun(head="xgboost", engine="reference", **kw).fit(fs)
    fast = ProbeRun(head="xgboost", **kw).fit(fs)
    assert ref.projection_.n_components_ == fast.projection_.n_components_ == 8
    assert fast.record("x").projection["n_components"] == 8 and fast.record("x").options["max_dims"] == "auto"
    np.testing.assert_allclose(fast.predictions_["p_activated"], ref.predictions_["p_activated"], atol=1e-6)
    assert ProbeRun(head="logreg", **kw).fit(fs).projection_.n_components_ == 16
    assert ProbeRun(head="xgboost", **kw).fit(synthetic(n_donors=3, n_features=12)).projection_ is None


def test_run_sweep_writes_run_dirs_and_a_summary(tmp_path):
    sources = [(p, lambda p: synthetic(n_donors=3, seed=len(p), pool=p)) for p in ("a", "bb")]
    events = []
    res = run_sweep(
        sources, ["logreg", "xgboost"], out=tmp_path, progress=events.append, probe_kwargs={"n_boot": 20}
    )
    assert res.is_sweep and res.out.parent == tmp_path and res.out.name.endswith("-sweep")
    summary = pd.read_parquet(res.out / "summary.parquet")
    assert len(summary) == 4 and list(summary["head"]) == ["logreg", "xgboost"] * 2
    assert (res.out / "sweep_auc.png").exists() and (res.out / "summary.json").exists()
    for path in res.runs:
        for f in ("config.json", "metrics.json", "predictions.parquet", "per_donor.parquet", "head.skops"):
            assert (path / f).exists(), (path, f)
    # each run's summary row is that run's own metrics, equal to a run fitted on its own
    alone = ProbeRun(head="xgboost", n_boot=20).fit(synthetic(n_donors=3, seed=2, pool="bb"))
    assert summary["roc_auc_mean"].iloc[3] == pytest.approx(alone.summary_["roc_auc"]["mean"])
    kinds = [e.kind for e in events]
    assert kinds.count("start") == kinds.count("run") == 4
    assert kinds.count("fold") == 4 * (3 + 1)  # 3 outer folds + the final head's search, per run


def test_a_sweep_of_sources_sharing_a_pool_draws_a_bar_each(tmp_path):
    """Two feature sets of one pool (tprobe.probe([fs1, fs2]), two tables): the bar chart pivots by pool,
    and a repeated (pool, head) made it raise; now each source gets its own bar, the summary unchanged."""
    sources = [(n, lambda _, s=s: synthetic(n_donors=3, seed=s, pool="cls")) for n, s in (("a", 1), ("b", 2))]
    res = run_sweep(
        sources, ["logreg", "knn"], out=tmp_path, probe_kwargs={"n_boot": 20, "final_head": False}
    )
    assert (res.out / "sweep_auc.png").exists() and len(res.runs) == 4
    assert list(pd.read_parquet(res.out / "summary.parquet")["pool"]) == ["cls"] * 4


def test_run_sweep_skips_a_source_that_cannot_load(tmp_path):
    from tprobe.errors import TprobeError

    def broken(_):
        raise TprobeError("no such pooling")

    res = run_sweep(
        [("bad", broken), ("ok", lambda _: synthetic(n_donors=3))],
        ["logreg"],
        out=tmp_path,
        probe_kwargs={"n_boot": 20, "final_head": False},
    )
    assert res.skipped == {"bad": "no such pooling"} and len(res.runs) == 1
    with pytest.raises(TprobeError, match="no such pooling"):
        run_sweep([("bad", broken)], ["logreg"], out=tmp_path)


def test_pool_store_reads_once_and_equals_from_store(tmp_path, small_data, tiny_reg):
    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model

    path = extract(
        preprocess(discover(small_data)), resolve_model(str(tiny_reg)), cache=tmp_path, progress=False
    ).path
    pooled = pool_store(path, POOLS)
    for p in POOLS:
        ref = from_store(path, p)
        np.testing.assert_array_equal(pooled[p].X, ref.X)
        pd.testing.assert_frame_equal(pooled[p].meta, ref.meta)
        assert pooled[p].source == ref.source


def test_the_engines_average_precision_is_sklearns():
    from sklearn.metrics import average_precision_score

    from tprobe.probing.fastcv import average_precision

    rng = np.random.default_rng(0)
    for i in range(400):
        n = int(rng.integers(4, 300))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.random(n) if i % 2 else np.round(rng.random(n), 1)  # every other one with many ties
        s = s.astype(np.float32) if i % 5 == 0 else s
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_a_narrower_projection_taken_from_a_wider_one_is_the_one_drawn():
    from tprobe.probing import heads

    wide = heads.projection(700, 256, seed=3)
    derived = heads.projection(700, 64, seed=3)  # 256 = 4^1 x 64: the first 64 rows, times 2
    odd = heads.projection(700, 100, seed=3)  # 256 / 100 is no power of 4: drawn afresh
    heads._PROJECTIONS.clear()
    for proj, n in ((derived, 64), (odd, 100)):
        fresh = heads.projection(700, n, seed=3)
        assert proj.components_.dtype == fresh.components_.dtype
        assert proj.components_.tobytes() == fresh.components_.tobytes() and proj.n_components_ == n
        X = np.random.default_rng(0).standard_normal((5, 700)).astype(np.float32)
        assert proj.transform(X).tobytes() == fresh.transform(X).tobytes()
    assert wide.n_components_ == 256
