"""The public API of the science stage: tprobe.curve, tprobe.map, tprobe.report, end to end on tiny data."""

import json
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import copy_subset

import tprobe
from tprobe import api
from tprobe.errors import TprobeError
from tprobe.features.sources import FeatureSet
from tprobe.runs.report import Report
from tprobe.science.curve import LabelCurve
from tprobe.science.embedmap import EmbeddingMap, MapDiagnostics, SourceMap


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function closes, kept for its axes, labels and legends."""
    got, real = [], plt.close

    def close(fig=None):
        got.append(fig)
        real(fig)

    monkeypatch.setattr(plt, "close", close)
    return got


@pytest.fixture(scope="module")
def sample_sets(tmp_path_factory, tiny_reg):
    """Three donors through the tiny random model, plus the pixels: (data folder, [store set, pixel set])."""
    data = copy_subset(tmp_path_factory.mktemp("data"), donors=("donor_1", "donor_2", "donor_3"), per_class=5)
    from tprobe.cache.extract import extract

    pre = tprobe.preprocess(data, progress=False)
    ref = tprobe.resolve_model(tiny_reg, offline=True)
    store = extract(pre, ref, cache=tmp_path_factory.mktemp("cache"), progress=False)
    return data, tprobe.feature_sets(stores=[store.path], pixels=True, data=data)


def synthetic(name="table:cellprofiler_sample", n_donors=3, cells=16, seed=0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    rows, X = [], []
    for d in range(n_donors):
        for c in range(cells):
            label = c % 2
            X.append(rng.normal(size=8) + 2.0 * label)
            rows.append(
                {
                    "image_id": f"d{d}c{c}",
                    "path": f"d{d}/c{c}.png",
                    "label": label,
                    "donor": f"donor_{d + 1}",
                    "group": f"d{d}c{c}",
                    "view": "orig",
                    "batch": f"{label}",
                }
            )
    return FeatureSet(np.asarray(X, np.float32), pd.DataFrame(rows), {"kind": "table", "name": name})


def test_the_science_names_are_public():
    for name in ("curve", "map", "report"):
        assert name in tprobe.API and name in api.__all__ and getattr(tprobe, name) is getattr(api, name)
        assert getattr(tprobe, name) is getattr(api, name)
        assert getattr(api, name).__doc__ and "Example" in getattr(api, name).__doc__


# ---- curve ---------------------------------------------------------------------------------------
def test_curve_fits_every_source_and_head_and_saves_what_the_command_writes(sample_sets, tmp_path):
    _, sets = sample_sets
    c = tprobe.curve(sets, head=["logreg", "prototype"], shots=[1, "all"], repeats=2)
    assert isinstance(c, LabelCurve)
    names = [fs.name for fs in sets]
    assert names == ["tiny-reg-cls", "pixels"]
    assert [(f["name"], f["head"]) for f in c.fits_] == [
        (n, h) for n in names for h in ("logreg", "prototype")
    ]
    assert {(s, h) for s, h in zip(c.results_["source"], c.results_["head"], strict=True)} == {
        (n, h) for n in names for h in ("logreg", "prototype")
    }
    assert set(c.results_["donor"]) == {"donor_1", "donor_2", "donor_3"}
    assert c.random_sources_ == ["tiny-reg-cls"]  # the tiny model has random weights
    wide = c.auc_table()
    assert list(wide.columns) == ["1", "all"] and len(wide) == 4
    assert wide.iloc[0, 0].count("[") == 1  # mean [low, high]

    run = c.save(tmp_path / "runs")
    assert run.parent == tmp_path / "runs" and run.name.endswith("-curve")
    for f in ("curve.parquet", "draws.parquet", "curve_band.csv", "curve.png", "config.json"):
        assert (run / f).is_file(), f
    pd.testing.assert_frame_equal(pd.read_parquet(run / "curve.parquet"), c.results_)
    draws = pd.read_parquet(run / "draws.parquet")
    assert set(draws["head"]) == {"logreg", "prototype"}
    a, b = (draws[draws["source"] == s].drop(columns="source").reset_index(drop=True) for s in names)
    pd.testing.assert_frame_equal(a, b)  # the same cells in both sources: paired draws
    cfg = json.loads((run / "config.json").read_text())
    assert (
        cfg["command"] == "curve" and cfg["heads"] == ["logreg", "prototype"] and cfg["shots"] == [1, "all"]
    )
    assert [(s["source"]["name"], s["head"]) for s in cfg["sources"]] == [
        (n, h) for n in names for h in ("logreg", "prototype")
    ]
    assert cfg["sources"][0]["source"]["kind"] == "store" and cfg["random_init_sources"] == ["tiny-reg-cls"]
    band = pd.read_csv(run / "curve_band.csv")
    assert len(band) == 8 and (band["low"] <= band["mean"]).all()


def test_curve_refuses_unknown_heads_and_empty_sources():
    with pytest.raises(TprobeError, match="--head 'nope' is not one of"):
        tprobe.curve([synthetic()], head="logreg,nope")
    with pytest.raises(TprobeError, match="no feature sources"):
        tprobe.curve([])
    with pytest.raises(TprobeError, match="not fitted"):
        LabelCurve().save("unused")


def test_curve_legend_names_sources_as_a_reader_knows_them(tmp_path, figures):
    c = tprobe.curve(
        [synthetic("table:cellprofiler_sample"), synthetic("pixels", seed=1)], shots=[1, 4], repeats=2
    )
    c.save(tmp_path)
    (fig,) = figures
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert set(legend[:2]) == {"feature table cellprofiler_sample", "raw pixels (64 px canvas)"}
    assert not any("table:" in t for t in legend)


# ---- map -----------------------------------------------------------------------------------------
def test_map_returns_typed_maps_and_saves_what_the_command_writes(sample_sets, tmp_path):
    data, sets = sample_sets
    m = tprobe.map(sets, umap=False, data=data)
    assert isinstance(m, EmbeddingMap) and len(m) == 2
    assert [s.name for s in m] == ["tiny-reg-cls", "pixels"]
    px = m["pixels"]
    assert isinstance(px, SourceMap) and isinstance(px.diagnostics, MapDiagnostics)
    assert {"pca1", "pca2", "batch"} <= set(px.coords.columns) and "umap1" not in px.coords
    assert px.coords["batch"].str.startswith("donor_").all()  # the pixels' batch came from the manifest
    d = px.diagnostics
    assert d.n_cells == len(px.coords) == m["tiny-reg-cls"].diagnostics.n_cells and d.n_features == 64 * 64
    assert {"activation", "donor", "batch"} <= set(d.predictability)
    assert set(d.within_class) == {"donor", "batch"} and 0 <= d.within_class["donor"]["chance"] <= 1
    assert m["tiny-reg-cls"].diagnostics.random_init and not d.random_init
    assert "random weights" in m["tiny-reg-cls"].title and px.title.startswith("raw pixels")
    assert any(line.startswith("donor      within each class") for line in d.lines())
    with pytest.raises(KeyError, match="no such source"):
        m["nope"]

    run = m.save(tmp_path)
    assert run.name.endswith("-map")
    for s in m:
        assert (run / f"map-{s.stem}.png").is_file()
        pd.testing.assert_frame_equal(pd.read_parquet(run / f"map-{s.stem}.parquet"), s.coords)
    saved = json.loads((run / "diagnostics.json").read_text())
    assert [x["source"] for x in saved] == ["tiny-reg-cls", "pixels"]
    assert saved[1]["within_class"]["donor"]["accuracy"] == pytest.approx(d.within_class["donor"]["accuracy"])
    assert MapDiagnostics.from_dict(saved[1]).n_cells == d.n_cells and saved[0]["random_init"] is True


def test_map_takes_a_manifest_instead_of_preparing_the_data():
    fs = synthetic("table:t", cells=20)
    manifest = fs.meta.assign(batch=[f"b{i % 3}" for i in range(len(fs.meta))])
    m = tprobe.map(
        fs.__class__(fs.X, fs.meta.drop(columns="batch"), fs.source), umap=False, manifest=manifest
    )
    assert m["table:t"].coords["batch"].iloc[:3].tolist() == ["donor_1·bb0", "donor_1·bb1", "donor_1·bb2"]


def _white_bands(png) -> list[int]:
    """Heights (px) of the runs of blank rows strictly inside an image."""
    from PIL import Image

    rows = (np.asarray(Image.open(png).convert("L")) >= 250).all(axis=1)
    bands, start = [], None
    for i, blank in enumerate(rows):
        if blank and start is None:
            start = i
        if not blank and start is not None:
            bands.append(i - start) if start > 0 else None
            start = None
    return bands


@pytest.mark.parametrize("warning", [None, "WARNING s: donor is more predictable than activation. " * 6])
def test_map_figure_has_no_blank_band_and_its_text_sits_under_the_panels(tmp_path, figures, warning):
    # issue 19: the diagnostics text sat in a fixed band reserved at the bottom (10% of the height):
    # a blank band ~60 px high between the panels and a short text, and a long warning ran into the panels
    from tprobe.science.embedmap import plot_map

    rng = np.random.default_rng(0)
    n = 200
    coords = pd.DataFrame(
        {
            "image_id": range(n),
            "donor": [f"donor_{i % 3 + 1}" for i in range(n)],
            "group": range(n),
            "label": rng.integers(0, 2, n),
            "batch": [f"donor_{i % 3 + 1}·b{i % 7}" for i in range(n)],
            **{c: rng.normal(size=n) for c in ("pca1", "pca2", "umap1", "umap2")},
        }
    )
    p = {"accuracy": 0.8, "chance": 0.5, "skill": 0.6, "n_classes": 2}
    w = {"accuracy": 0.5, "chance": 0.3, "skill": 0.3}
    diag = {
        "source": "s",
        "n_cells": n,
        "n_features": 2,
        "predictability": {"activation": p, "donor": {**p, "chance_given_class": 0.4}},
        "silhouette": {"label": 0.1, "donor": 0.05},
        "within_class": {"donor": w},
        "warning": warning,
    }
    plot_map(coords, MapDiagnostics.from_dict(diag), tmp_path / "map.png")
    assert max(_white_bands(tmp_path / "map.png")) < 25  # was 67 px (and 44 px under the title)
    (fig,) = figures
    inv = fig.transFigure.inverted()
    text = fig.texts[-1].get_window_extent().transformed(inv)
    assert "Predictable from the features" in fig.texts[-1].get_text()
    assert all(text.y1 < ax.get_tightbbox().transformed(inv).y0 for ax in fig.axes)  # below every panel


# ---- report --------------------------------------------------------------------------------------
def _fake_run(root, name, head, aucs):
    run = root / name
    run.mkdir(parents=True)
    donors = [f"donor_{i}" for i in range(1, len(aucs) + 1)]
    pd.DataFrame(
        {"donor": donors, "n": 50, "roc_auc": aucs, "average_precision": aucs, "accuracy": aucs}
    ).to_parquet(run / "per_donor.parquet", index=False)
    summ = {
        m: {"mean": float(np.mean(aucs)), "sd": float(np.std(aucs, ddof=1)), "ci_low": 0.5, "ci_high": 1.0}
        for m in ("roc_auc", "average_precision", "accuracy")
    }
    folds = [{"test_donor": d, "n": 50} for d in donors]
    (run / "metrics.json").write_text(json.dumps({"summary": summ, "folds": folds}))
    cfg = {
        "command": "probe",
        "head": head,
        "split": "leave-one-donor-out",
        "features": {"model": "m", "pool": "cls"},
    }
    (run / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    _fake_run(root, "a-knn", "knn", [0.9, 0.92, 0.95, 0.91])
    _fake_run(root, "b-logreg", "logreg", [0.8, 0.82, 0.85, 0.81])
    (root / "c-interrupted").mkdir()
    (root / "c-interrupted" / "metrics.json").write_text("{}")
    (root / "c-interrupted" / "config.json").write_text("{}")
    return root


def test_report_returns_the_tables_and_writes_only_when_asked(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rep = tprobe.report(runs)
    assert isinstance(rep, Report) and rep.paths == [] and not (tmp_path / "report").exists()
    assert sorted(rep.summary["run_name"]) == ["a-knn", "b-logreg"]
    assert rep.reference == str(runs / "b-logreg")  # the rule: logreg on CLS, not the best run
    assert len(rep.paired) == 1 and "a-knn" in rep.paired.to_string()
    assert rep.incomplete == [str(runs / "c-interrupted")]
    assert "4 held-out donors" in rep.bound_line

    rep = tprobe.report(runs, tmp_path / "rep", reference="a-knn")
    assert rep.reference == str(runs / "a-knn") and "named with --reference" in rep.reference_line
    assert rep.paths == [
        tmp_path / "rep" / f for f in ("report.md", "report.html", "summary.parquet", "paired.csv")
    ]
    assert all(p.is_file() for p in rep.paths) and (tmp_path / "rep" / "donor_auc.png").is_file()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "a-knn" in md and rep.reference_line in md
    assert len(pd.read_parquet(tmp_path / "rep" / "summary.parquet")) == 2


def test_report_refuses_a_bad_reference_before_writing(runs, tmp_path):
    with pytest.raises(TprobeError, match="--reference 'zzz' matches no run"):
        tprobe.report(runs, tmp_path / "rep", reference="zzz")
    assert not (tmp_path / "rep").exists()


def test_report_never_imports_torch_or_transformers(runs, tmp_path):
    code = (
        "import sys, tprobe\n"
        f"rep = tprobe.report({str(runs)!r}, {str(tmp_path / 'rep')!r})\n"
        "print(len(rep.summary), sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "2 []", out.stderr[-800:]
