"""Regression tests for the ten trust defects of issue #9 (each failed on the code before the redesign)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SAMPLE, copy_subset

from tprobe.cache.extract import extract
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.features.sources import from_store, from_table
from tprobe.models.backbones import resolve_model
from tprobe.probing.run import ProbeRun

HUB_ID = "facebook/dinov2-with-registers-small"


def _hub_cache(root: Path, snapshots: dict[str, Path], main: str) -> Path:
    """An offline HF cache laid out as huggingface_hub writes it: snapshots/<commit>/ and refs/main."""
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    for commit, model_dir in snapshots.items():
        shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)
    return root


# 1 ------------------------------------------------------------------------------------------
def test_hub_model_is_keyed_by_its_resolved_snapshot(tmp_path, small_data, monkeypatch):
    """refs/main moving to another snapshot (other weights) must never reuse the old tokens."""
    import huggingface_hub.constants as hf_constants

    from tprobe.testing import save_random_dinov2

    a, b = "a" * 40, "b" * 40
    models = {a: save_random_dinov2(tmp_path / "wa", seed=1), b: save_random_dinov2(tmp_path / "wb", seed=2)}
    hub = _hub_cache(tmp_path / "hub", models, main=a)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    ref = resolve_model("dinov2-small-reg", offline=True)
    assert ref.resolved == a
    assert resolve_model("dinov2-small-reg", "main", offline=True).resolved == a  # not keyed as "@main"
    pre = preprocess(discover(small_data))
    first = extract(pre, ref, cache=tmp_path / "c", progress=False, offline=True)
    (hub / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").write_text(b)
    moved = resolve_model("dinov2-small-reg", offline=True)
    assert moved.resolved == b
    second = extract(pre, moved, cache=tmp_path / "c", progress=False, offline=True)
    assert second.status == "written" and second.path != first.path
    cls_a, cls_b = (FeatureStore.open(r.path).read("cls") for r in (first, second))
    assert not np.allclose(cls_a, cls_b)
    # predict's "model changed" check can now fire
    run = ProbeRun(n_boot=20).fit(from_store(first.path, "cls")).save(tmp_path / "runs")
    with pytest.raises(TprobeError, match="has changed"):
        from tprobe.probing.predict import predict

        predict(
            run,
            copy_subset(tmp_path / "new", donors=("donor_3",), per_class=1),
            cache=tmp_path / "c",
            offline=True,
        )


def test_unresolvable_hub_identity_is_an_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from tprobe.testing import save_random_dinov2

    hub = _hub_cache(tmp_path / "hub", {"c" * 40: save_random_dinov2(tmp_path / "w")}, main="c" * 40)
    (hub / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").unlink()  # no ref: nothing resolves
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(TprobeError):
        resolve_model("dinov2-small-reg", offline=True)


# 2 ------------------------------------------------------------------------------------------
def test_store_rows_are_never_paired_with_another_orders_manifest(tmp_path, small_data, tiny_reg):
    """The same images under other names (another sort order) in a CSV: rows keep their own tokens."""
    ref = resolve_model(str(tiny_reg))
    pre = preprocess(discover(small_data))
    first = extract(pre, ref, cache=tmp_path / "c", dtype="float16", chunk_rows=8, progress=False)
    renamed, rows = tmp_path / "renamed", []
    files = sorted(small_data.rglob("*.png"))
    for i, f in enumerate(files):  # reversed numbering: the new names sort in the opposite order
        new = renamed / f"img_{len(files) - i:04d}.png"
        new.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, new)
        rows.append({"path": new.name, "label": f.parent.name, "donor": f.parent.parent.name})
    pd.DataFrame(rows).to_csv(renamed / "manifest.csv", index=False)
    other = preprocess(discover(renamed / "manifest.csv"))
    assert other.fingerprint == pre.fingerprint  # same content, labels and donors
    assert other.kept["image_id"].tolist() != pre.kept["image_id"].tolist()  # another order
    second = extract(other, ref, cache=tmp_path / "c", dtype="float32", chunk_rows=8, progress=False)
    fs1, fs2 = from_store(first.path, "cls"), from_store(second.path, "cls")
    by_id = pd.DataFrame(fs1.X, index=fs1.meta["image_id"])
    np.testing.assert_allclose(fs2.X, by_id.loc[fs2.meta["image_id"]].to_numpy(), atol=2e-3)
    assert (
        fs2.meta["label"].to_numpy()
        == other.kept.set_index("image_id").loc[fs2.meta["image_id"], "label"].to_numpy()
    ).all()
    # a reader handed the other order's manifest refuses instead of pairing rows by position
    with pytest.raises(TprobeError, match="row"):
        from_store(second.path, "cls", manifest=pre.kept)


# 3 ------------------------------------------------------------------------------------------
def test_feature_table_join_refuses_ambiguous_file_names(tmp_path):
    data = tmp_path / "data"
    for donor in ("donor_1", "donor_2", "donor_3"):
        for cls in ("activated", "quiescent"):
            src = sorted((SAMPLE / donor / cls).glob("*.png"))[:3]
            (data / donor / cls).mkdir(parents=True)
            for i, f in enumerate(src):
                shutil.copy(f, data / donor / cls / f"{cls}_{i:04d}.png")
    pre = preprocess(discover(data))
    orig = pre.kept[pre.kept["view"] == "orig"]
    rel = orig["path"].map(lambda p: str(Path(p).relative_to(data)))
    table = pd.DataFrame(
        {"FileName": rel.map(lambda p: Path(p).name), "f": np.arange(len(orig), dtype=float)}
    )
    table.to_csv(tmp_path / "bare.csv", index=False)
    with pytest.raises(TprobeError, match="not unique"):
        from_table(tmp_path / "bare.csv", pre.manifest, id_column="FileName")
    table.assign(FileName=rel).to_csv(tmp_path / "rel.csv", index=False)
    fs = from_table(tmp_path / "rel.csv", pre.manifest, id_column="FileName")
    got = dict(zip(fs.meta["path"], fs.X[:, 0], strict=True))
    assert got == dict(zip(orig["path"], table["f"], strict=True))  # every image its own row


# 4 ------------------------------------------------------------------------------------------
def test_compute_precision_is_part_of_the_key(tmp_path, small_data, tiny_reg):
    ref = resolve_model(str(tiny_reg))
    pre = preprocess(discover(small_data))
    bf16 = extract(pre, ref, cache=tmp_path, dtype="float32", precision="bf16", progress=False)
    fp32 = extract(pre, ref, cache=tmp_path, dtype="float32", precision="fp32", progress=False)
    assert fp32.status == "written" and fp32.path != bf16.path
    assert FeatureStore.open(bf16.path).attrs["precision"] == "bf16"
    assert FeatureStore.open(fp32.path).attrs["precision"] == "fp32"


# 5 ------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_received_run_directory_never_executes_code(tmp_path, small_data, tiny_reg):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(_Payload(marker))
    pre = preprocess(discover(small_data))
    store = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path / "c", progress=False).path
    run = ProbeRun(n_boot=20).fit(from_store(store, "cls")).save(tmp_path / "runs")
    new = copy_subset(tmp_path / "new", donors=("donor_1",), per_class=1)
    heads = [p for p in run.iterdir() if p.name.startswith("head")]
    assert heads
    for p in heads:  # a crafted head file only
        p.write_bytes(evil)
    r = CliRunner().invoke(main, ["predict", "--run", str(run), str(new), "--cache", str(tmp_path / "c")])
    assert not marker.exists() and r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    for p in run.rglob("*"):  # now every file of the run
        if p.is_file():
            p.write_bytes(evil)
    for args in (
        ["predict", "--run", str(run), str(new)],
        ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")],
        ["saliency", "--run", str(run)],
    ):
        r = CliRunner().invoke(main, args)
        assert not marker.exists() and r.exit_code == 2, (args, r.output)


def test_a_crafted_checkpoint_never_executes_code(tmp_path, tiny_reg):
    from tprobe.train.finetune import DinoClassifier
    from tprobe.train.loop import TrainConfig, train_fold

    marker = tmp_path / "PWNED"
    ck = tmp_path / "fold0.pt"
    ck.write_bytes(pickle.dumps(_Payload(marker)))
    pre = preprocess(discover(copy_subset(tmp_path / "d", per_class=2)))
    rows = pre.kept[pre.kept["view"] == "orig"]

    def make():
        from tprobe.models.backbones import Backbone

        return DinoClassifier(Backbone.from_pretrained(str(tiny_reg), device="cpu"), pool="cls", freeze=True)

    with pytest.raises(TprobeError, match="fold0.pt"):
        train_fold(
            make,
            rows,
            rows,
            pre.config,
            TrainConfig(epochs=1),
            __import__("torch").device("cpu"),
            checkpoint=ck,
            log=lambda r: None,
        )
    assert not marker.exists()


def test_real_checkpoints_still_resume_with_weights_only(tmp_path, tiny_reg):
    import torch

    from tprobe.train.finetune import DinoClassifier
    from tprobe.train.loop import TrainConfig, train_fold

    pre = preprocess(discover(copy_subset(tmp_path / "d", per_class=2)))
    rows = pre.kept[pre.kept["view"] == "orig"]

    def make():
        from tprobe.models.backbones import Backbone

        return DinoClassifier(Backbone.from_pretrained(str(tiny_reg), device="cpu"), pool="cls", freeze=True)

    ck, kw = tmp_path / "ck.pt", dict(device=torch.device("cpu"), log=lambda r: None)
    train_fold(make, rows, rows, pre.config, TrainConfig(epochs=1, batch_size=8), checkpoint=ck, **kw)
    _, curves = train_fold(
        make, rows, rows, pre.config, TrainConfig(epochs=2, batch_size=8), checkpoint=ck, **kw
    )
    assert curves["epoch"].tolist() == [1, 2]


# 6 ------------------------------------------------------------------------------------------
def test_a_worker_killed_while_sealing_never_stalls_the_store(tmp_path, small_data, tiny_reg, monkeypatch):
    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    kw = dict(cache=tmp_path, chunk_rows=8, progress=False, fmt="hdf5")
    assert extract(pre, ref, shard=(0, 2), **kw).status == "partial (shard)"
    real = os.replace

    def die_sealing(src, dst, *a, **k):  # the sealing step: the assembled HDF5 file moves into place
        if str(dst).endswith(".h5"):
            raise KeyboardInterrupt  # stands in for SIGKILL: no cleanup code runs after it
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", die_sealing)
    with pytest.raises(KeyboardInterrupt):
        extract(pre, ref, shard=(1, 2), **kw)
    monkeypatch.setattr(os, "replace", real)
    for shard in ((0, 2), (1, 2)):  # a rerun of either shard finishes the store
        res = extract(pre, ref, shard=shard, **kw)
        assert res.status in ("written", "up to date")
        assert FeatureStore.open(res.path).complete


def test_a_stale_finalize_lock_from_an_old_run_does_not_stall(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    kw = dict(cache=tmp_path, chunk_rows=8, progress=False)
    first = extract(pre, ref, shard=(0, 2), **kw)
    (first.path.with_name(first.path.name + ".progress") / "finalize.lock").write_text("")
    assert extract(pre, ref, shard=(1, 2), **kw).status == "written"


# 7 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_chunk_data_is_fsynced_before_its_marker(tmp_path, small_data, tiny_reg, monkeypatch, fmt):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    pre = preprocess(discover(small_data))
    extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, chunk_rows=8, progress=False, fmt=fmt)
    markers = [i for i, (kind, p) in enumerate(events) if kind == "replace" and p.endswith(".done")]
    assert markers
    for i in markers:
        unit = int(Path(events[i][1]).name.split("_")[1].split(".")[0])
        before = [p for kind, p in events[:i] if kind == "fsync"]
        if fmt == "zarr":
            for name in ("cls", "registers", "patches"):
                assert any(f"/{name}/c/{unit}/" in p for p in before), (unit, name)
        else:
            assert any(f"part_{unit:06d}" in p for p in before), unit
        assert any(p.endswith(f"unit_{unit:06d}.done") or ".done.tmp" in p for p in before), unit


# 8 ------------------------------------------------------------------------------------------
def test_single_class_donor_has_no_average_precision():
    from tprobe.probing.evaluate import donor_metrics, summarise

    pred = pd.DataFrame(
        {
            "donor": ["a"] * 4 + ["b"] * 4,
            "label": [1, 1, 1, 1, 0, 1, 0, 1],
            "p_activated": [0.9, 0.8, 0.4, 0.7, 0.1, 0.9, 0.6, 0.2],
            "fold": [0] * 4 + [1] * 4,
        }
    )
    m = donor_metrics(pred).set_index("donor")
    assert np.isnan(m.loc["a", "average_precision"]) and "AP" in m.loc["a", "note"]
    s = summarise(m.reset_index(), n_boot=10)
    assert s["average_precision"]["n_donors"] == 1
    assert s["average_precision"]["mean"] == pytest.approx(m.loc["b", "average_precision"])


# 9 ------------------------------------------------------------------------------------------
def _one_line_exit_2(r):
    assert r.exit_code == 2, r.output
    assert "unexpected" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_inf_in_a_feature_table_is_one_line(tmp_path, small_data):
    pre = preprocess(discover(small_data))
    orig = pre.kept[pre.kept["view"] == "orig"].reset_index(drop=True)
    t = pd.DataFrame(
        {"FileName": orig["path"].map(lambda p: Path(p).name), "a": 1.0, "b": np.arange(len(orig))}
    )
    t.loc[3, "a"] = np.inf
    t.to_csv(tmp_path / "t.csv", index=False)
    _one_line_exit_2(
        CliRunner().invoke(
            main,
            [
                "probe",
                "--features",
                str(tmp_path / "t.csv"),
                "--data",
                str(small_data),
                "--out",
                str(tmp_path / "r"),
            ],
        )
    )


def test_empty_csvs_are_one_line(tmp_path, small_data):
    (tmp_path / "empty.csv").write_text("")
    _one_line_exit_2(
        CliRunner().invoke(
            main, ["preprocess", "--data", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "p")]
        )
    )
    _one_line_exit_2(
        CliRunner().invoke(
            main,
            [
                "probe",
                "--features",
                str(tmp_path / "empty.csv"),
                "--data",
                str(small_data),
                "--out",
                str(tmp_path / "r"),
            ],
        )
    )


def test_empty_donor_cell_is_not_a_donor_named_nan(tmp_path):
    files = sorted((SAMPLE / "donor_1" / "activated").glob("*.png"))[:3]
    rows = [
        {"path": str(f), "label": "activated", "donor": "donor_1" if i else ""} for i, f in enumerate(files)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(TprobeError, match="donor"):
        discover(tmp_path / "m.csv")


@pytest.mark.parametrize("donors", [("donor_1", "donor_3"), ("donor_1",)])
def test_finetune_with_too_few_donors_is_one_line(tmp_path, tiny_reg, donors):
    data = copy_subset(tmp_path / "d", donors=donors, per_class=3)
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(tiny_reg),
            "--data",
            str(data),
            "--epochs",
            "1",
            "--freeze",
            "--pool",
            "cls",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    _one_line_exit_2(r)
    assert "group-kfold" not in r.output  # that split cannot train with one donor either


def test_one_training_donor_is_not_called_inner_donor_cv(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))  # two donors: each fold trains on one
    store = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path / "c", progress=False).path
    r = CliRunner().invoke(
        main, ["probe", "--store", str(store), "--bootstrap", "20", "--out", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert "chosen by inner donor CV" not in r.output and "no inner validation" in r.output


# 10 -----------------------------------------------------------------------------------------
def test_a_projected_head_is_saved_small_and_rebuilt_from_the_seed(tmp_path):
    from tprobe.features.sources import FeatureSet
    from tprobe.probing.run import load_head

    rng = np.random.default_rng(0)
    n = 96
    meta = pd.DataFrame(
        {
            "image_id": [f"i{i}_orig" for i in range(n)],
            "path": "x",
            "label": np.arange(n) % 2,
            "donor": [f"donor_{i % 3}" for i in range(n)],
            "group": [f"i{i}" for i in range(n)],
            "view": "orig",
        }
    )
    X = rng.normal(size=(n, 6000)).astype(np.float32) + meta["label"].to_numpy()[:, None] * 0.3
    run = ProbeRun(n_boot=10, max_dims=256, seed=3).fit(
        FeatureSet(X, meta, {"kind": "table", "name": "wide"})
    )
    out = run.save(tmp_path)
    size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("head"))
    assert size < 6000 * 256 * 8 / 20  # far below the projection matrix itself
    head = load_head(out)
    np.testing.assert_allclose(
        head.predict_proba(X)[:, 1], run.final_["model"].predict_proba(X)[:, 1], atol=1e-6
    )


# library language -------------------------------------------------------------------------
def test_library_errors_speak_the_library_language():
    assert issubclass(TprobeError, ValueError)
    with pytest.raises(ValueError, match="head 'svm'") as e:
        ProbeRun(head="svm").fit(None)
    assert "--head" not in str(e.value)


def test_head_files_written_before_the_stage_packages_still_load(tmp_path):
    """A kNN/prototype head saved by tprobe 0.2 names ``tprobe.heads``; it loads as the moved class."""
    import io
    import json
    import zipfile

    from tprobe.probing.heads import KNNHead, PrototypeHead, load_head_file, save_head

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), np.arange(30) % 2
    for head in (KNNHead(k=5).fit(x, y), PrototypeHead().fit(x, y)):
        path = save_head(head, tmp_path / "h.skops")
        with zipfile.ZipFile(path) as src:
            entries = {i.filename: src.read(i) for i in src.infolist()}
        schema = json.loads(entries["schema.json"])
        assert schema["__module__"] == "tprobe.probing.heads"
        schema["__module__"] = "tprobe.heads"  # as tprobe 0.2 wrote it
        entries["schema.json"] = json.dumps(schema).encode()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as dst:
            for name, body in entries.items():
                dst.writestr(name, body)
        path.write_bytes(buf.getvalue())
        loaded = load_head_file(path)
        assert type(loaded) is type(head)
        np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x))
