"""Several models in one extract pass (issue #20 §5): one read per view, one store per model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import tprobe.cache.extract as ex
from tprobe.cache.extract import extract, extract_many, group_by_patch
from tprobe.cache.store import FeatureStore
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.models.backbones import ALIASES, FAMILIES, Backbone, expand_models, resolve_model
from tprobe.testing import save_random_dinov2, save_random_vit


@pytest.fixture(scope="module")
def deep_plain(tmp_path_factory) -> Path:
    """A second tiny model of another shape: 4 blocks, no registers, other weights."""
    return save_random_dinov2(
        tmp_path_factory.mktemp("models") / "deep-plain", shape="tiny-deep", registers=0, seed=1
    )


def _files(store: Path) -> dict[str, bytes]:
    if store.is_file():
        return {store.name: store.read_bytes()}
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _count_decodes(monkeypatch) -> list:
    calls = []
    real = ex.load_canvas

    def counting(path, config):
        calls.append(path)
        return real(path, config)

    monkeypatch.setattr(ex, "load_canvas", counting)
    return calls


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_one_pass_stores_are_byte_identical_to_separate_extracts(
    tmp_path, small_data, tiny_reg, deep_plain, monkeypatch, fmt
):
    pre = preprocess(discover(small_data))
    refs = [resolve_model(str(tiny_reg)), resolve_model(str(deep_plain))]
    kw = dict(fmt=fmt, chunk_rows=16, batch_size=5, progress=False)
    calls = _count_decodes(monkeypatch)
    single = [extract(pre, r, cache=tmp_path / "one", **kw) for r in refs]
    separate_decodes = len(calls)
    calls.clear()
    many = extract_many(pre, refs, cache=tmp_path / "many", **kw)
    assert len(calls) == separate_decodes // 2 > 0  # each source image decoded once for both models
    assert [r.status for r in many] == ["written", "written"]
    assert [r.images for r in many] == [len(pre.kept)] * 2
    for a, b in zip(single, many, strict=True):
        assert a.path.relative_to(tmp_path / "one") == b.path.relative_to(tmp_path / "many")  # same key
        assert _files(a.path) == _files(b.path)
        assert ex.manifest_path(a.path).read_bytes() == ex.manifest_path(b.path).read_bytes()
    assert FeatureStore.open(many[0].path).num_registers == 4
    assert FeatureStore.open(many[1].path).num_registers == 0


def test_complete_store_is_skipped_and_partial_one_resumes(
    tmp_path, small_data, tiny_reg, deep_plain, monkeypatch
):
    pre = preprocess(discover(small_data))
    a, b = resolve_model(str(tiny_reg)), resolve_model(str(deep_plain))
    kw = dict(cache=tmp_path, chunk_rows=8, batch_size=4, progress=False)
    done = extract(pre, a, **kw)
    half = extract(pre, b, shard=(0, 2), **kw)
    assert half.status == "partial (shard)"
    loaded = []
    real = Backbone.from_pretrained.__func__

    def counting(cls, model, *args, **kw2):
        loaded.append(model.name)
        return real(cls, model, *args, **kw2)

    monkeypatch.setattr(Backbone, "from_pretrained", classmethod(counting))
    calls = _count_decodes(monkeypatch)
    res = extract_many(pre, [a, b], **kw)
    assert [r.status for r in res] == ["up to date", "written"]
    assert res[0].path == done.path and loaded == [b.name]  # the complete store's model is not loaded
    assert res[1].images == len(pre.kept) - half.images > 0  # the other shard's units only
    resumed = len(calls)
    assert resumed == res[1].times.decodes
    calls.clear()
    ref_store = extract(pre, b, cache=tmp_path / "ref", chunk_rows=8, batch_size=4, progress=False)
    assert 0 < resumed < len(calls)  # only the missing units were read
    assert _files(ref_store.path) == _files(res[1].path)


def test_shards_are_per_store(tmp_path, small_data, tiny_reg, deep_plain):
    pre = preprocess(discover(small_data))
    refs = [resolve_model(str(tiny_reg)), resolve_model(str(deep_plain))]
    kw = dict(cache=tmp_path, chunk_rows=8, progress=False)
    first = extract_many(pre, refs, shard=(0, 2), **kw)
    assert [r.status for r in first] == ["partial (shard)"] * 2
    second = extract_many(pre, refs, shard=(1, 2), **kw)
    assert [r.status for r in second] == ["written"] * 2
    assert all(FeatureStore.open(r.path).complete for r in second)


@pytest.mark.refuses("one extract pass mixing models of different patch sizes")
def test_mixed_patch_sizes_are_refused_and_grouped(tmp_path, small_data, tiny_reg):
    v3 = resolve_model(str(save_random_vit(tmp_path / "v3", model_type="dinov3_vit")))
    reg = resolve_model(str(tiny_reg))
    pre = preprocess(discover(small_data))
    with pytest.raises(TprobeError, match=r"one patch size.*patch 14.*patch 16.*own pass"):
        extract_many(pre, [reg, v3], cache=tmp_path, progress=False)
    assert not (tmp_path / pre.fingerprint).exists()  # refused before anything was written
    assert [[r.name for r in g] for g in group_by_patch([reg, v3, reg])] == [[reg.name, reg.name], [v3.name]]


@pytest.mark.refuses("the same model twice in one extract pass")
def test_same_model_twice_is_refused(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    with pytest.raises(TprobeError, match="same model.*give it once"):
        extract_many(pre, [ref, resolve_model(str(tiny_reg))], cache=tmp_path, progress=False)


def test_dinov2_family_alias():
    assert set(FAMILIES["dinov2-all"]) == {
        "dinov2-small",
        "dinov2-small-reg",
        "dinov2-base",
        "dinov2-base-reg",
    }
    assert all(m in ALIASES for m in FAMILIES["dinov2-all"])
    assert expand_models(["dinov2-small", "dinov2-all", "x/y"]) == [
        "dinov2-small",
        "dinov2-small-reg",
        "dinov2-base",
        "dinov2-base-reg",
        "x/y",
    ]


def _probe_runs(tmp_path, small_data, models, pools=("cls", "mean")) -> Path:
    """Stores of ``models`` in one pass, then a logreg probe of each pool of each store, under runs/."""
    from tprobe.probing.sweep import run_sweep, store_sources

    pre = preprocess(discover(small_data))
    res = extract_many(pre, [resolve_model(str(m)) for m in models], cache=tmp_path / "cache", progress=False)
    runs = tmp_path / "runs"
    for r in res:
        run_sweep(store_sources(r.path, list(pools)), ["logreg"], out=runs, probe_kwargs={"n_boot": 50})
    return runs


def test_report_draws_the_variant_comparison(tmp_path, small_data, tiny_reg, deep_plain):
    from tprobe.runs.report import RANDOM_MARK, write_report

    runs = _probe_runs(tmp_path, small_data, [tiny_reg, deep_plain])
    rep = write_report(runs, tmp_path / "rep")
    table = rep["variants"]
    assert (tmp_path / "rep" / "variants.png").stat().st_size > 10_000
    # model x pool x head, with the models' names (their folders), never their paths
    assert sorted(zip(table["model"], table["pool"], table["head"], strict=True)) == [
        ("deep-plain", "cls", "logreg"),
        ("deep-plain", "mean", "logreg"),
        ("tiny-reg", "cls", "logreg"),
        ("tiny-reg", "mean", "logreg"),
    ]
    assert table["random_init"].all() and table["is_reference"].sum() == 1
    assert table.loc[table["is_reference"], "run"].item() == rep["reference"]
    # the paired test against the declared reference, as in the report's own paired table
    others = table[~table["is_reference"]]
    assert others["p_holm"].between(0, 1).all() and others["diff"].notna().all()
    pairs = pd.read_csv(tmp_path / "rep" / "paired.csv")
    auc = pairs[pairs["metric"] == "roc_auc"].set_index("run")
    for r in others.itertuples():
        assert r.p_holm == pytest.approx(auc.loc[r.run, "p_holm"])
        assert r.diff == pytest.approx(auc.loc[r.run, "mean_diff"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![model variants](variants.png)" in md and RANDOM_MARK in md
    assert "model variants" in (tmp_path / "rep" / "report.html").read_text()


def test_report_of_one_model_has_no_variant_figure(tmp_path, small_data, tiny_reg):
    from tprobe.runs.report import write_report

    runs = _probe_runs(tmp_path, small_data, [tiny_reg])
    rep = write_report(runs, tmp_path / "rep")
    assert rep["variants"].empty and not (tmp_path / "rep" / "variants.png").exists()
    assert "Model variants" not in (tmp_path / "rep" / "report.md").read_text()


def test_cli_extract_and_probe_several_models(tmp_path, small_data, tiny_reg, deep_plain):
    from click.testing import CliRunner

    from tprobe.cli import main

    base = ["--data", str(small_data), "--cache", str(tmp_path / "c")]
    res = CliRunner().invoke(main, ["extract", "--model", str(tiny_reg), "--model", str(deep_plain), *base])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    paths = [Path(p) for p in lines[-2:]]  # one store per model, last
    assert all(FeatureStore.open(p).complete for p in paths)
    assert f"{tiny_reg}: written: " in res.output and f"{deep_plain}: written: " in res.output
    assert "RANDOM WEIGHTS" in res.output
    # one model alone finds its store under the same key
    one = CliRunner().invoke(main, ["extract", "--model", str(deep_plain), *base])
    assert (
        one.exit_code == 0
        and "up to date" in one.output
        and one.output.strip().splitlines()[-1] == str(paths[1])
    )
    out = tmp_path / "runs"
    probe = CliRunner().invoke(
        main,
        [
            "probe",
            "--model",
            str(tiny_reg),
            "--model",
            str(deep_plain),
            *base,
            "--pool",
            "cls",
            "--out",
            str(out),
        ],
    )
    assert probe.exit_code == 0, probe.output
    summary = pd.read_parquet(Path(probe.output.strip().splitlines()[-1]) / "summary.parquet")
    assert sorted(summary["features"]) == sorted([str(tiny_reg), str(deep_plain)])
    assert "tiny-reg" in probe.output and "deep-plain" in probe.output  # the table says which model
    rep = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "rep" / "variants.png").exists()


@pytest.mark.refuses("extract --workers with several --model")
def test_cli_several_models_refuse_workers(tmp_path, small_data, tiny_reg, deep_plain):
    from click.testing import CliRunner

    from tprobe.cli import main

    args = ["extract", "--model", str(tiny_reg), "--model", str(deep_plain), "--data", str(small_data)]
    res = CliRunner().invoke(main, [*args, "--cache", str(tmp_path), "--workers", "2"])
    assert res.exit_code == 2 and "--workers does not apply with several --model" in res.output


def test_models_lists_the_family_alias():
    from click.testing import CliRunner

    from tprobe.cli import main

    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "dinov2-all" in r.output
    assert " + ".join(FAMILIES["dinov2-all"]) in r.output


def test_api_extract_of_several_models_returns_one_result_each_in_the_order_given(
    tmp_path, small_data, tiny_reg, deep_plain
):
    from tprobe import api

    kw = dict(cache=tmp_path / "c", views="orig", progress=False)
    both = api.extract(small_data, [str(deep_plain), str(tiny_reg)], **kw)
    assert isinstance(both, list) and [r.model.name for r in both] == [str(deep_plain), str(tiny_reg)]
    assert [r.status for r in both] == ["written", "written"] and all(r.skipped == [] for r in both)
    alone = api.extract(small_data, str(tiny_reg), **kw)  # one model: one result, the same store
    assert alone.status == "up to date" and alone.path == both[1].path
    with pytest.raises(TprobeError, match="same model"):
        api.extract(small_data, [str(tiny_reg), resolve_model(str(tiny_reg))], **kw)


@pytest.mark.refuses("several models given to tprobe.extract with workers, SLURM or a revision")
@pytest.mark.parametrize("opts", [dict(workers=2, task_args=[]), dict(revision="main")])
def test_api_extract_of_several_models_refuses_what_is_for_one_model(tmp_path, tiny_reg, deep_plain, opts):
    from tprobe import api

    with pytest.raises(TprobeError, match="several models run in one local pass"):
        api.extract(None, [str(tiny_reg), str(deep_plain)], cache=tmp_path, **opts)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_api_probe_of_several_models_sweeps_each_store(tmp_path, small_data, tiny_reg, deep_plain):
    from tprobe import api

    models = [str(tiny_reg), str(deep_plain)]
    api.extract(small_data, models, cache=tmp_path / "c", views="orig", progress=False)
    from tprobe.data.preprocess import PreprocessConfig

    kw = dict(data=small_data, cache=tmp_path / "c", config=PreprocessConfig(views="orig"), n_boot=50)
    res = api.probe(model=models, pool="cls", out=tmp_path / "runs", **kw)
    assert sorted(res.summary["features"]) == sorted(models)
    assert list(res.summary["pool"]) == ["cls", "cls"]
    with pytest.raises(TprobeError, match="slurm sweeps one store"):
        api.probe(model=models, pool="cls", executor="slurm", **kw)
