"""The extract pipeline (reader -> mapper -> writer) and the typed stage artifacts around it."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tprobe.cache.extract import extract
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import Preprocessed, load_view, preprocess
from tprobe.errors import TprobeError
from tprobe.features.sources import from_store
from tprobe.models.backbones import Backbone, resolve_model
from tprobe.models.tokens import POOLS, TokenLayout, pool_tokens


def _reference_tokens(pre, model_dir, batch_size, chunk_rows):
    """Today's path before the pipeline: every view read and decoded on its own, same batches."""
    bb = Backbone.from_pretrained(str(model_dir), device="cpu")
    layout = bb.layout(pre.config.canvas)
    kept = pre.kept
    out = {"cls": [], "registers": [], "patches": []}
    for start in range(0, len(kept), chunk_rows):
        stop = min(len(kept), start + chunk_rows)
        for s in range(start, stop, batch_size):
            rows = range(s, min(stop, s + batch_size))
            x = torch.from_numpy(np.stack([load_view(kept.path[i], kept.view[i], pre.config) for i in rows]))
            with torch.inference_mode():
                hidden = bb(bb.pixel_values(x)).last_hidden_state
            for name, t in zip(("cls", "registers", "patches"), layout.split(hidden), strict=True):
                out[name].append(t.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("workers, dtype", [(0, "float32"), (2, "float32"), (0, "float16")])
def test_pipelined_store_equals_the_per_view_path_bit_for_bit(tmp_path, small_data, tiny_reg, workers, dtype):
    pre = preprocess(discover(small_data))
    res = extract(
        pre,
        resolve_model(str(tiny_reg)),
        cache=tmp_path,
        dtype=dtype,
        chunk_rows=16,
        batch_size=5,
        workers=workers,
        progress=False,
    )
    store = FeatureStore.open(res.path)
    ref = _reference_tokens(pre, tiny_reg, batch_size=5, chunk_rows=16)
    for name, arr in ref.items():  # float16: the old path's numpy astype of float32 tokens, bit for bit
        assert store.read(name).tobytes() == arr.astype(dtype).tobytes()
    # each source image decoded once per batch, not once per view
    assert res.times.decodes < len(pre.kept) / 2
    assert res.times.forward > 0 and res.times.write > 0


def test_token_selection_and_compression_are_keyed_and_recorded(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    full = extract(pre, ref, cache=tmp_path, progress=False)
    slim = extract(pre, ref, cache=tmp_path, tokens=("cls", "registers"), compression="none", progress=False)
    assert slim.path != full.path and slim.status == "written"
    store = FeatureStore.open(slim.path)
    assert set(store.shapes) == {"cls", "registers"} and store.attrs["compression"] == "none"
    np.testing.assert_array_equal(store.read("cls"), FeatureStore.open(full.path).read("cls"))
    assert from_store(slim.path, "registers").X.shape[1] == 32
    with pytest.raises(TprobeError, match="need patches tokens"):
        from_store(slim.path, "mean")


def test_the_disk_estimate_refuses_a_store_that_cannot_fit(tmp_path, small_data, tiny_reg, monkeypatch):
    pre = preprocess(discover(small_data))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(TprobeError, match="needs about .* GB"):
        extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.zarr"))  # nothing half-made


def test_a_writer_failure_surfaces_and_keeps_finished_units(tmp_path, small_data, tiny_reg, monkeypatch):
    pre = preprocess(discover(small_data))
    real, calls = FeatureStore.write_unit, []

    def failing(self, unit, tokens):
        if len(calls) == 2:
            raise OSError("disk full")
        calls.append(unit)
        real(self, unit, tokens)

    monkeypatch.setattr(FeatureStore, "write_unit", failing)
    with pytest.raises(OSError, match="disk full"):
        extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, chunk_rows=8, progress=False)
    monkeypatch.setattr(FeatureStore, "write_unit", real)
    res = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, chunk_rows=8, progress=False)
    assert res.status == "written" and res.images == len(pre.kept) - 2 * 8


@pytest.mark.parametrize("pool", POOLS)
def test_one_pooling_function_for_numpy_and_torch(pool):
    layout = TokenLayout(hidden=8, registers=4, grid=3)
    hidden = torch.randn(5, 1 + 4 + 9, 8)
    cls, regs, patches = layout.split(hidden)
    t = pool_tokens(cls, regs, patches, pool)
    n = pool_tokens(*(a.numpy() for a in (cls, regs, patches)), pool)
    np.testing.assert_allclose(t.numpy(), n, rtol=1e-5, atol=1e-6)
    assert n.shape == (5, layout.width(pool))


def test_preprocessed_artifact_round_trips_and_detects_changed_files(tmp_path, small_data):
    pre = preprocess(discover(small_data))
    pre.save(tmp_path / "prep")
    back = Preprocessed.load(tmp_path / "prep")
    assert back.fingerprint == pre.fingerprint and back.config == pre.config
    assert back.kept["image_id"].tolist() == pre.kept["image_id"].tolist()
    victim = pre.kept["path"].iloc[0]
    shutil.copy(pre.kept["path"].iloc[-1], victim)  # an image edited after preprocessing
    with pytest.raises(TprobeError, match="changed or missing"):
        Preprocessed.load(tmp_path / "prep")
    m = back.manifest.copy()
    m.loc[0, "label"] = 1 - m.loc[0, "label"]  # a manifest edited by hand
    m.to_parquet(tmp_path / "prep" / "manifest.parquet")
    with pytest.raises(TprobeError, match="does not match preprocess.json"):
        Preprocessed.load(tmp_path / "prep", verify_files=False)


@pytest.mark.parametrize(
    "edit", ["labels as text", "no label", "no view", "no source_id", "no kept", "no path", "no image_id"]
)
@pytest.mark.refuses("a saved preprocess folder whose manifest holds text labels or lacks a column")
def test_a_saved_manifest_with_text_labels_or_without_a_column_is_one_line(tmp_path, small_data, edit):
    """Labels saved as text hash as the integers do (its fingerprint takes ``f"{label}"``), so such a
    manifest loaded and reached the store's manifest; one without a column was a KeyError (exit 1)."""
    preprocess(discover(small_data)).save(tmp_path / "prep")
    path = tmp_path / "prep" / "manifest.parquet"
    m = pd.read_parquet(path)
    edited = m.assign(label=m["label"].astype(str)) if edit == "labels as text" else m.drop(columns=edit[3:])
    edited.to_parquet(path, index=False)
    with pytest.raises(TprobeError, match="manifest.parquet.* run `tprobe preprocess` again"):
        Preprocessed.load(tmp_path / "prep", verify_files=False)


def test_commands_open_a_saved_preprocessed_folder(tmp_path, small_data, tiny_reg):
    r = CliRunner().invoke(main, ["preprocess", "--data", str(small_data), "--out", str(tmp_path / "prep")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_reg),
            "--data",
            str(tmp_path / "prep"),
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 0, r.output
    pre = preprocess(discover(small_data))
    assert (
        FeatureStore.open(r.output.strip().splitlines()[-1]).attrs["dataset_fingerprint"] == pre.fingerprint
    )
    r = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_reg),
            "--data",
            str(tmp_path / "prep"),
            "--canvas",
            "154",
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 2 and "own options" in r.output


def test_store_attrs_mark_random_weights_and_precision(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    res = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, progress=False)
    a = FeatureStore.open(res.path).attrs
    assert a["model_random_init"] is True and a["precision"] == "fp32" and a["rows_hash"]
    assert FeatureStore.open(res.path).row_ids().tolist() == pre.kept["image_id"].tolist()


def test_progress_is_logged_as_plain_lines_when_not_on_a_terminal(
    tmp_path, small_data, tiny_reg, monkeypatch, caplog
):
    import logging

    import tprobe.cache.extract as ex

    monkeypatch.setattr(ex, "PROGRESS_EVERY_S", 0.0)  # a line per batch instead of every 10 s
    pre = preprocess(discover(small_data))
    with caplog.at_level(logging.INFO, logger="tprobe.cache.extract"):
        extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, batch_size=8, progress=None)
    lines = [r.getMessage() for r in caplog.records if "views/s" in r.getMessage()]
    assert lines and lines[-1].startswith(f"extract {tiny_reg}: {len(pre.kept)}/{len(pre.kept)} views (100%)")


def test_predict_accepts_a_sweep_folder_and_names_the_run_it_uses(tmp_path, small_data, tiny_reg, caplog):
    pre = preprocess(discover(small_data))
    extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path / "c", progress=False)
    r = CliRunner().invoke(
        main,
        [
            "probe",
            "--model",
            str(tiny_reg),
            "--data",
            str(small_data),
            "--cache",
            str(tmp_path / "c"),
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
    sweep = r.output.strip().splitlines()[-1]
    new = tmp_path / "new"
    shutil.copytree(small_data / "donor_1", new)
    r = CliRunner().invoke(main, ["predict", "--run", sweep, str(new), "--cache", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert any("is a sweep: using its best run" in rec.getMessage() for rec in caplog.records)
    assert (Path(sweep) / f"predictions-{new.name}.csv").exists()


def test_a_damaged_chunk_is_one_line_not_a_crash(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    res = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, chunk_rows=8, progress=False)
    chunk = res.path / "cls" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # truncated on disk
    r = CliRunner().invoke(main, ["probe", "--store", str(res.path), "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "damaged" in r.output and "unexpected" not in r.output, r.output


@pytest.mark.parametrize("shape", [(3, 14, 14), (3, 3, 14, 14)])
@pytest.mark.parametrize("kind", ["uint8", "float32"])
@pytest.mark.parametrize("host", [False, True])
def test_device_views_and_pixel_values_equal_the_host_path_bit_for_bit(tiny_reg, shape, kind, host):
    from tprobe.cache.extract import VIEW_CODES, _device_views, _pixel_values
    from tprobe.data.preprocess import apply_view

    rng = np.random.default_rng(0)
    canvases = (
        rng.integers(0, 256, shape).astype(np.uint8)
        if kind == "uint8"
        else rng.random(shape, np.float32) * 255
    )
    canvases.flat[:256] = np.arange(256)  # every level
    src = np.array([0, 0, 1, 2, 1, 0, 2, 2])
    views = np.arange(len(VIEW_CODES))
    got = _device_views(
        torch.from_numpy(canvases), torch.from_numpy(src), torch.from_numpy(views), torch.device("cpu")
    )
    host = np.stack(
        [apply_view(canvases[s].astype(np.float32), VIEW_CODES[v]) for s, v in zip(src, views, strict=True)]
    )
    assert got.dtype == torch.from_numpy(canvases).dtype and np.array_equal(got.numpy(), host)
    bb = Backbone.from_pretrained(str(tiny_reg), device="cpu")
    want = bb.pixel_values(host / 255.0)  # today's host path: float32 views / 255, then normalised
    assert _pixel_values(bb, got).numpy().tobytes() == want.numpy().tobytes()
    torch_path = bb.pixel_values(got.to(torch.float32).div_(255.0))  # the path a GPU takes, run on the CPU
    assert torch_path.numpy().tobytes() == want.numpy().tobytes()


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_each_canvas_normalised_once_then_permuted_equals_normalising_each_view(tiny_reg, kind):
    """The CPU path normalises a cell's canvas once and permutes it into its views: the same bytes."""
    from tprobe.cache.extract import VIEW_CODES, _host_inputs, _pixel_values
    from tprobe.data.preprocess import apply_view

    rng = np.random.default_rng(1)
    canvases = rng.integers(0, 256, (3, 14, 14)).astype(np.uint8)
    if kind == "float32":
        canvases = rng.random((3, 14, 14), np.float32) * 255
    src = np.array([0, 0, 1, 2, 1, 0, 2, 2, 1, 0])
    views = np.array([0, 1, 2, 3, 4, 5, 6, 7, 7, 3])
    bb = Backbone.from_pretrained(str(tiny_reg), device="cpu")
    got = _host_inputs(bb, torch.from_numpy(canvases), torch.from_numpy(src), torch.from_numpy(views))
    per_view = np.stack([apply_view(canvases[s], VIEW_CODES[v]) for s, v in zip(src, views, strict=True)])
    want = _pixel_values(bb, torch.from_numpy(per_view))
    assert got.shape == (len(src), 3, 14, 14) and got.numpy().tobytes() == want.numpy().tobytes()
    assert got.is_contiguous()


def test_resized_canvases_go_as_float32_and_all_eight_views_match_the_per_view_path(
    tmp_path, small_data, tiny_reg
):
    from tprobe.cache.extract import _Batches
    from tprobe.data.preprocess import PreprocessConfig

    pre = preprocess(discover(small_data), PreprocessConfig(fit="fill", views="dihedral8"))
    assert _Batches(pre.kept, [[0, 1]], pre.config)[0][0].dtype == torch.float32  # resized: not whole numbers
    plain = preprocess(discover(small_data))
    assert _Batches(plain.kept, [[0, 1]], plain.config)[0][0].dtype == torch.uint8  # 8-bit, padded: uint8
    res = extract(
        pre,
        resolve_model(str(tiny_reg)),
        cache=tmp_path,
        dtype="float32",
        chunk_rows=16,
        batch_size=5,
        progress=False,
    )
    store = FeatureStore.open(res.path)
    ref = _reference_tokens(pre, tiny_reg, batch_size=5, chunk_rows=16)
    for name, arr in ref.items():
        assert store.read(name).tobytes() == arr.tobytes()


def test_parallel_writer_threads_write_the_same_bytes_as_one(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    trees = []
    for threads in (1, 3):
        cache = tmp_path / f"w{threads}"
        extract(
            pre,
            resolve_model(str(tiny_reg)),
            cache=cache,
            chunk_rows=8,
            batch_size=4,
            write_threads=threads,
            progress=False,
        )
        trees.append(
            {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}
        )
    assert trees[0] == trees[1] and len(trees[0]) > 10
