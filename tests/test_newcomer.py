"""The newcomer's walk (issue 19): progress lines, refused options, predict's views, a quiet sweep,
random-weights marks, readable figures and messages that say what to do."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.cli import main
from tprobe.models.random_weights import NOTE as RANDOM_NOTE


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function closes, kept for its axes, labels and legends."""
    got, real = [], plt.close

    def close(fig=None):
        got.append(fig)
        real(fig)

    monkeypatch.setattr(plt, "close", close)
    return got


def _texts(fig) -> str:
    """Every title, axis label, tick label, legend entry and free text of a figure, joined."""
    out = [t.get_text() for t in fig.texts]
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.texts + ax.get_xticklabels() + ax.get_yticklabels()]
        if ax.get_legend() is not None:
            leg = ax.get_legend()
            out += [t.get_text() for t in leg.get_texts()] + [leg.get_title().get_text()]
    return "\n".join(out)


def _flat(fig) -> str:
    """The figure's texts with line breaks as spaces (titles are wrapped)."""
    return " ".join(_texts(fig).split())


# ---- random weights --------------------------------------------------------------------------
def test_finetune_on_a_random_model_says_random_weights_and_its_figures_carry_the_mark(
    tmp_path, tiny_reg, figures
):
    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_3", "donor_6"), per_class=3)
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(tiny_reg),
            "--data",
            str(data),
            "--pool",
            "cls",
            "--freeze",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--saliency-n",
            "0",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert RANDOM_NOTE in r.output
    confusion = next(f for f in figures if "predicted" in f.axes[0].get_xlabel())
    assert "random weights" in _flat(confusion)
    curves = next(f for f in figures if "epoch" in f.axes[0].get_xlabel())
    text = _texts(curves)
    assert "random weights" in _flat(curves)
    # lines say what they are, folds are named by the donor they hold out, one epoch is one tick
    assert "training loss" in text and "validation loss" in text
    assert {"held out donor_1", "held out donor_3", "held out donor_6"} <= set(text.splitlines())
    ticks = [
        t
        for t in curves.axes[0].get_xticks()
        if curves.axes[0].get_xlim()[0] <= t <= curves.axes[0].get_xlim()[1]
    ]
    assert ticks == [1.0]


# ---- messages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["table", "pixels"])
def test_predict_on_a_run_not_trained_on_a_store_names_the_command_that_makes_one(tmp_path, kind):
    from tprobe.features.sources import FeatureSource
    from tprobe.runs.record import RunRecord

    run = tmp_path / "run"
    run.mkdir()
    RunRecord(command="probe", name="run", features=FeatureSource(kind=kind, name="cp", table="cp.csv")).save(
        run
    )
    r = CliRunner().invoke(main, ["predict", "--run", str(run), str(tmp_path)])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "needs a run trained on a store" in line and "tprobe probe --model" in line
    assert "load_head" not in line


@pytest.mark.parametrize("what", ["folder", "file"])
def test_export_of_a_path_that_is_no_store_says_so_and_how_to_find_stores(tmp_path, what):
    path = tmp_path / "runs"
    path.mkdir()
    if what == "file":
        path = path / "config.json"
        path.write_text("{}")
    r = CliRunner().invoke(main, ["export", str(path), "--to", "anndata", str(tmp_path / "x.h5ad")])
    assert r.exit_code == 2, r.output
    assert "not a feature store" in r.output and "find cache" in r.output
    assert "re-extract" not in r.output and not (tmp_path / "x.h5ad").exists()


# ---- options that do not apply ------------------------------------------------------------------
NOT_APPLYING = [
    (
        ["probe", "--model", "m", "--pool", "concat", "--features", "{t}"],
        "--model does not apply with --features",
    ),
    (["probe", "--pool", "concat", "--features", "{t}"], "--pool does not apply with --features"),
    (["probe", "--store", "{s}", "--features", "{t}"], "--store does not apply with --features"),
    (["probe", "--features", "{t}", "--tta"], "--tta does not apply with --features"),
    (["probe", "--features", "{t}", "--train-views", "all"], "--train-views does not apply with --features"),
    (["probe", "--store", "{s}", "--model", "m"], "--model does not apply with --store"),
    (["probe", "--store", "{s}", "--views", "orig"], "--views does not apply with --store and no --data"),
    (["probe", "--id-column", "FileName"], "--id-column does not apply without --features"),
    (["probe", "--test-donor", "4"], "--test-donor does not apply with --split leave-one-donor-out"),
    (["probe", "--folds", "3"], "--folds does not apply with --split leave-one-donor-out"),
    (["probe", "--head", "mlp", "--penalty", "l1"], "--penalty does not apply to --head mlp"),
    (["curve", "--pixels", "--pool", "mean"], "--pool does not apply without --store/--model"),
    (["curve", "--pixels", "--train-views", "all"], "--train-views does not apply without --store/--model"),
    (["curve", "--pixels", "--revision", "main"], "--revision does not apply without --model"),
    (["curve", "--pixels", "--test-donor", "3"], "--test-donor does not apply with --split"),
    (["map", "--pixels", "--keep-columns", "x"], "--keep-columns does not apply without --features"),
    (
        ["map", "--store", "{s}", "--canvas", "64"],
        "--canvas does not apply with --store sources and no --data",
    ),
    (["baseline", "--name", "frequency", "--epochs", "3"], "--epochs does not apply to --name frequency"),
    (
        ["baseline", "--name", "lenet", "--inception-size", "75"],
        "--inception-size does not apply to --name lenet",
    ),
    (
        ["baseline", "--name", "pixel-logreg", "--inception-weights", "random"],
        "--inception-weights does not apply",
    ),
    (["baseline", "--test-donor", "3"], "--test-donor does not apply with --split leave-one-donor-out"),
]


@pytest.mark.refuses("an option that does not apply to the rest of the command (e.g. --pool with --features)")
@pytest.mark.parametrize("args, says", NOT_APPLYING, ids=[" ".join(a[:3]) for a, _ in NOT_APPLYING])
def test_an_option_that_does_not_apply_is_refused_in_one_line(tmp_path, args, says):
    (tmp_path / "t.csv").write_text("FileName,x\na.png,1\n")
    (tmp_path / "s.zarr").mkdir()
    args = [a.format(t=tmp_path / "t.csv", s=tmp_path / "s.zarr") for a in args]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "runs").exists()


# ---- predict extracts only the views the run scores ---------------------------------------------
@pytest.mark.parametrize("tta", [False, True])
def test_predict_extracts_only_the_views_the_run_scores(tmp_path, tiny_reg, tta):
    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.features.sources import from_store
    from tprobe.models.backbones import resolve_model
    from tprobe.probing.predict import predict
    from tprobe.probing.run import ProbeRun

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2", "donor_3"), per_class=3)
    pre = preprocess(discover(data))
    store = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path / "c1", progress=False).path
    run = ProbeRun(head="logreg", n_boot=20, tta=tta).fit(from_store(store, "cls"))
    run_dir = run.save(tmp_path / "runs")
    new = copy_subset(tmp_path / "new", donors=("donor_4",), per_class=3)
    table = predict(run_dir, new, cache=tmp_path / "c2")
    (written,) = [p for p in (tmp_path / "c2").rglob("*.zarr") if p.is_dir()]
    views = set(from_store(written, "cls").meta["view"])
    assert views == (set(pre.config.view_names) if tta else {"orig"})
    assert table["p_activated"].notna().sum() == table["kept"].sum() > 0


# ---- a sweep prints one summary table; per-run detail lands in each run folder -------------------
def test_a_sweep_prints_one_summary_table_and_keeps_each_runs_detail_in_its_folder(
    tmp_path, tiny_reg, caplog
):
    import logging

    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2", "donor_3"), per_class=3)
    store = extract(
        preprocess(discover(data)), resolve_model(str(tiny_reg)), cache=tmp_path / "c", progress=False
    )
    caplog.set_level(logging.INFO, logger="tprobe")
    r = CliRunner().invoke(
        main,
        [
            "probe",
            "--store",
            str(store.path),
            "--head",
            "logreg",
            "--pool",
            "all",
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    runs = sorted(p for p in (tmp_path / "runs").glob("*/*") if p.is_dir())
    assert len(runs) == 5  # cls, mean, registers, cls+mean, concat
    lines = r.output.strip().splitlines()
    # the summary table (header + one row per run), its title, the wall time, the folder: nothing per donor
    assert len(lines) <= len(runs) + 5, r.output
    assert not any(line.lstrip().startswith("donor_") for line in lines)
    progress = [
        rec.getMessage()
        for rec in caplog.records
        if rec.name == "tprobe.probing.sweep" and rec.levelno >= logging.INFO
    ]
    assert (
        len(progress) == len(runs) and progress[0].startswith("[1/5] ") and progress[-1].startswith("[5/5] ")
    )
    for run in runs:
        detail = (run / "details.txt").read_text()
        assert "donor_1" in detail and "grid" in detail and RANDOM_NOTE in detail


# ---- progress lines for the long commands (INFO lines of tprobe.*: the CLI shows them on stderr) -----
def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 20]


@pytest.fixture
def three_donors(tmp_path):
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess

    return preprocess(
        discover(copy_subset(tmp_path / "d", donors=("donor_1", "donor_2", "donor_3"), per_class=4))
    )


def test_curve_reports_each_held_out_donor_as_it_finishes(three_donors, caplog):
    import logging

    from tprobe.features.pixels import pixel_features
    from tprobe.science.curve import LabelCurve

    caplog.set_level(logging.INFO, logger="tprobe")
    LabelCurve(shots=(1, "all"), repeats=2).fit(pixel_features(three_donors))
    done = [m for m in _messages(caplog, "tprobe.science.curve") if " done (" in m]
    assert [m.split("held out ")[1].split(" done")[0] for m in done] == ["donor_1", "donor_2", "donor_3"]
    assert done[-1].split(" done ")[1].startswith("(3/3)")


def test_map_reports_each_diagnostic_and_embedding_step(three_donors, caplog):
    import logging

    from tprobe.features.pixels import pixel_features
    from tprobe.science.embedmap import diagnose, embed, map_data

    caplog.set_level(logging.INFO, logger="tprobe")
    md = map_data(pixel_features(three_donors), three_donors.manifest)
    diagnose(md)
    embed(md, umap=False)
    said = " | ".join(_messages(caplog, "tprobe.science.embedmap"))
    for step in ("predicting activation", "predicting donor", "within each class", "PCA of"):
        assert step in said, said


@pytest.mark.parametrize("name, says", [("lenet", "epoch 1"), ("pixel-logreg", "fold 3/3")])
def test_baseline_cli_reports_progress(tmp_path, caplog, name, says):
    import logging

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2", "donor_3"), per_class=4)
    caplog.set_level(logging.INFO, logger="tprobe")
    args = ["baseline", "--name", name, "--data", str(data), "--out", str(tmp_path / "runs")]
    r = CliRunner().invoke(main, args + (["--epochs", "1"] if name == "lenet" else []))
    assert r.exit_code == 0, r.output
    said = _messages(caplog, "tprobe.train.baselines")
    assert any(says in m for m in said), said
    assert all(m.startswith(f"baseline {name}: ") or m.startswith("pixels: ") for m in said)


# ---- figures a biologist reads without help ---------------------------------------------------------
def test_map_panels_name_their_axes_and_give_every_batch_its_own_colour(tmp_path, figures):
    from tprobe.science.embedmap import category_colours, plot_map

    rng = np.random.default_rng(0)
    n = 300
    batches = [f"donor_{(i % 28) // 10 + 1}·b{i % 28}" for i in range(n)]
    coords = pd.DataFrame(
        {
            "image_id": range(n),
            "donor": [b.split("·")[0] for b in batches],
            "group": range(n),
            "label": rng.integers(0, 2, n),
            "batch": batches,
            "pca1": rng.normal(size=n),
            "pca2": rng.normal(size=n),
        }
    )
    coords.loc[0, "pca1"] = 40.0  # an outlier: left out and counted, never half-drawn on the frame
    coords.attrs["pca_explained"] = [0.32, 0.12]
    diag = {"source": "s", "n_cells": n, "predictability": {}, "silhouette": {}, "within_class": {}}
    plot_map(coords, diag, tmp_path / "map.png")
    (fig,) = figures
    for ax in fig.axes:
        assert ax.get_xlabel() == "PC1 (32% of variance)" and ax.get_ylabel() == "PC2 (12% of variance)"
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for col in ax.collections:
            xy = col.get_offsets()
            assert ((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)).all()
    batch = fig.axes[2].get_legend()
    assert batch.get_title().get_text() == "28 imaging batches" and len(batch.get_texts()) == 28
    colours = {tuple(np.round(c, 3)) for c in category_colours(28)}
    assert len(colours) == 28 and min(0.299 * r + 0.587 * g + 0.114 * b for r, g, b, _ in colours) < 0.7
    assert all(0.299 * r + 0.587 * g + 0.114 * b < 0.75 for r, g, b, _ in colours)  # none pale on white


def test_source_names_read_as_words():
    from tprobe.plot.figures import source_label

    assert source_label("table:cellprofiler_sample") == "feature table cellprofiler_sample"
    assert source_label("table:cp+all-rows") == "feature table cp (every table row)"
    assert source_label("pixels") == "raw pixels (64 px canvas)"
    assert source_label("dinov2-small-reg-cls+mean") == "dinov2-small-reg · cls+mean tokens"
    assert source_label("tiny-reg-cls#2") == "tiny-reg · cls tokens (#2)"


def test_curve_legend_names_sources_in_words(tmp_path, figures):
    from tprobe.science.curve import plot_curves

    rows = [
        {
            "source": src,
            "head": "logreg",
            "k": k,
            "shots": str(k),
            "repeat": 0,
            "donor": d,
            "fold": i,
            "n_train_cells": 2 * k,
            "roc_auc": 0.6 + 0.01 * k,
        }
        for src in ("table:cellprofiler_sample", "pixels")
        for k in (1, 2)
        for i, d in enumerate(("a", "b"))
    ]
    plot_curves(pd.DataFrame(rows), tmp_path / "c.png")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert "feature table cellprofiler_sample" in legend and "raw pixels (64 px canvas)" in legend
    assert not any("table:" in t for t in legend)


def test_donor_auc_plot_labels_runs_by_what_they_are_and_zooms_on_close_values(tmp_path, figures):
    from tprobe.runs.report import _donor_auc_plot

    runs = []
    for i, auc in enumerate((0.86, 0.91)):
        run = tmp_path / f"20261201-11000{i}-tiny-reg-cls-logreg"
        run.mkdir()
        pd.DataFrame({"donor": ["donor_1", "donor_2"], "roc_auc": [auc, auc + 0.03]}).to_parquet(
            run / "per_donor.parquet"
        )
        runs.append(run)
    summary = pd.DataFrame(
        {
            "run": [str(r) for r in runs],
            "run_name": [r.name for r in runs],
            "model": ["tiny-reg · cls · logreg", "tiny-reg · mean · logreg"],
            "random_init": [False, True],
            "split": ["leave-one-donor-out"] * 2,
        }
    )
    _donor_auc_plot(summary, tmp_path / "donor_auc.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["tiny-reg · cls · logreg", "tiny-reg · mean · logreg · RANDOM WEIGHTS"]
    lo, hi = ax.get_xlim()
    assert 0.5 < lo < 0.86 and 0.94 < hi <= 1.02 and "chance (0.5) is off it" in ax.get_xlabel()


def test_saliency_grid_marks_wrong_calls_names_p_and_has_a_colour_bar(tmp_path, tiny_reg, figures):
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import PreprocessConfig, load_view, preprocess
    from tprobe.models.backbones import Backbone
    from tprobe.train.finetune import DinoClassifier
    from tprobe.train.saliency import saliency_grid, saliency_maps

    pre = preprocess(
        discover(copy_subset(tmp_path / "d", per_class=3)), PreprocessConfig(canvas=28, fit="resize")
    )
    rows = pre.kept[pre.kept["view"] == "orig"].head(6).reset_index(drop=True)
    model = DinoClassifier(Backbone.from_pretrained(str(tiny_reg), device="cpu"), canvas=28, pool="cls")
    saliency_grid(model, rows, pre.config, tmp_path / "s.png")
    images = np.stack([load_view(p, v, pre.config) for p, v in zip(rows["path"], rows["view"], strict=True)])
    p = saliency_maps(model, images)["p_activated"]
    wrong = int(((p >= 0.5) != (rows["label"] == 1).to_numpy()).sum())
    assert 0 < wrong < 6  # both kinds of call on the grid
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6 and all("p(activated)=" in t for t in titles)
    assert sum("WRONG call" in t for t in titles) == wrong
    framed = [ax for ax in fig.axes[:24] if ax.spines["left"].get_visible()]
    assert len(framed) == 4 * wrong  # the wrong call's whole column is framed
    assert any("saliency" in ax.get_ylabel() for ax in fig.axes[24:])  # the colour bar


def test_contact_sheet_says_which_channel_and_row_labels_keep_clear_of_the_panels(tmp_path, figures):
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.plot.figures import contact_sheet

    pre = preprocess(discover(copy_subset(tmp_path / "d", per_class=4)))
    contact_sheet(pre.manifest, pre.config, tmp_path / "sheet.png")
    (fig,) = figures
    assert "channel shown: the grey image" in fig._suptitle.get_text()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    rows = [ax for ax in fig.axes if ax.texts and ax.get_subplotspec().colspan.start == 0]
    labels = [t for ax in rows for t in ax.texts if "images)" in t.get_text()]
    assert labels and labels[0].get_text().startswith("kept\n(")
    for t in labels:
        box = t.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), t.get_text()
        for ax in fig.axes:  # panel titles hold no row name: they never run into the panel above
            assert "kept" not in ax.get_title() and "dim" not in ax.get_title()
