"""Store integrity (issue 18): missing and altered chunks, edited manifests, stale locks, kill leftovers,
fsync coverage, and a fuzz test over kill points in extract and sealing."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.cache.extract import extract, manifest_path
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import preprocess
from tprobe.errors import TprobeError
from tprobe.features.sources import from_store
from tprobe.models.backbones import resolve_model

KW = dict(chunk_rows=8, batch_size=8, progress=False, check_disk=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return copy_subset(tmp_path_factory.mktemp("integrity") / "data", per_class=3)  # 12 images, 2 units


@pytest.fixture(scope="module")
def pre(data):
    return preprocess(discover(data))


@pytest.fixture(scope="module")
def ref(tiny_reg):
    return resolve_model(str(tiny_reg))


@pytest.fixture(scope="module")
def built(tmp_path_factory, pre, ref) -> dict[str, Path]:
    """One uninterrupted store per format, copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("built")
    return {fmt: extract(pre, ref, cache=root / fmt, fmt=fmt, **KW).path for fmt in ("zarr", "hdf5")}


def _copy(store: Path, dst: Path) -> Path:
    """A copy of a store with its manifest, under ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if store.is_dir() else shutil.copy)(store, dst / store.name)
    shutil.copy(manifest_path(store), manifest_path(dst / store.name))
    return dst / store.name


def _one_line_exit_2(r):
    assert r.exit_code == 2, r.output
    assert "unexpected" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under (or beside, for the store's own names) ``root``'s folder, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# 1: a deleted Zarr chunk reads as zeros ----------------------------------------------------------
@pytest.mark.refuses("a sealed store with a deleted chunk (status and every reader)")
def test_a_deleted_zarr_chunk_is_refused_by_status_and_readers(tmp_path, built):
    store = _copy(built["zarr"], tmp_path)
    assert CliRunner().invoke(main, ["status", str(store)]).exit_code == 0
    (store / "cls" / "c" / "1" / "0").unlink()
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 2 and "DAMAGED: chunk cls/c/1" in r.output, r.output
    with pytest.raises(TprobeError, match="chunk cls/c/1 is missing.*re-extract"):
        from_store(store, "cls")
    _one_line_exit_2(
        CliRunner().invoke(
            main, ["probe", "--store", str(store), "--bootstrap", "5", "--out", str(tmp_path / "runs")]
        )
    )
    _one_line_exit_2(
        CliRunner().invoke(main, ["export", str(store), "--to", "parquet", str(tmp_path / "x.parquet")])
    )
    r = CliRunner().invoke(main, ["status", str(built["zarr"])])
    assert r.exit_code == 0 and "chunks check" in r.output and "present" in r.output, r.output


@pytest.mark.refuses("a truncated chunk (status), an altered one (status --deep)")
def test_a_truncated_chunk_is_found_fast_and_an_altered_one_by_deep(tmp_path, built):
    store = _copy(built["zarr"], tmp_path)
    chunk = store / "patches" / "c" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    chunk.write_bytes(raw[:-7])  # truncated: the fast check sees the size
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 2 and "DAMAGED: chunk patches/c/0" in r.output, r.output
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # same size, altered bytes
    chunk.write_bytes(raw)
    assert CliRunner().invoke(main, ["status", str(store)]).exit_code == 0  # sizes agree
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 2 and "DAMAGED: unit 0 (rows 0-8)" in r.output, r.output
    assert "units re-hashed" in CliRunner().invoke(main, ["status", str(built["zarr"]), "--deep"]).output


@pytest.mark.refuses("an HDF5 store with a zeroed unit (status --deep)")
def test_a_zeroed_hdf5_unit_is_found_by_deep(tmp_path, built, pre, ref):
    import h5py

    store = extract(pre, ref, cache=tmp_path / "c", fmt="hdf5", compression="none", **KW).path
    assert CliRunner().invoke(main, ["status", str(store), "--deep"]).exit_code == 0
    with h5py.File(store, "r") as f:
        info = f["cls"].id.get_chunk_info(1)  # unit 1's chunk of cls
    with open(store, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(bytes(info.size))
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 2 and "DAMAGED: unit 1 " in r.output, r.output


def _write_and_compare_with_zarr(store: FeatureStore, values: dict, twin_root: Path) -> None:
    """Write ``values`` unit by unit through the store, the same values through Zarr's own writer into
    fresh arrays under ``twin_root``; every chunk file must hold the same bytes and read back equal."""
    import zarr

    for u in range(store.n_units):
        store.write_unit(u, {k: v[store.unit_slice(u)] for k, v in values.items()})
    for name, v in values.items():
        ref = zarr.open_array(store.path / name, mode="r")
        twin = zarr.create_array(
            twin_root / name,
            shape=ref.shape,
            dtype=ref.dtype,
            chunks=ref.chunks,
            compressors=ref.compressors,
            fill_value=0,
        )
        twin[:] = v
        for u in range(store.n_units):
            key = ["c", str(u), *["0"] * (v.ndim - 1)]
            got = (store.path / name).joinpath(*key).read_bytes()
            assert got == (twin_root / name).joinpath(*key).read_bytes(), (name, u)
        np.testing.assert_array_equal(ref[:], v)


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_chunks_written_by_the_store_are_the_bytes_zarr_writes(tmp_path, compression):
    """The writer encodes chunks itself (not through Zarr's event loop): the files must be Zarr's own bytes,
    the last, partial unit padded with the fill value as Zarr pads it."""

    rng = np.random.default_rng(0)
    n = 150  # 64 + 64 + 22
    store = FeatureStore.create(
        tmp_path / "s.zarr",
        row_ids=[f"r{i}" for i in range(n)],
        hidden=8,
        registers=2,
        patches=5,
        compression=compression,
    )
    shapes = {"cls": (8,), "registers": (2, 8), "patches": (5, 8)}
    values = {k: rng.standard_normal((n, *v)).astype(np.float16) for k, v in shapes.items()}
    _write_and_compare_with_zarr(store, values, tmp_path / "twin")


def test_the_chunk_writer_does_as_zarr_does_with_numcodecs_before_0_16(tmp_path, monkeypatch):
    """Zarr >= 3.0 allows numcodecs 0.14 and 0.15, whose Blosc takes no ``typesize``: Zarr leaves it out
    there (and Blosc takes the item size of the bytes Zarr hands it). The writer must neither fail nor
    write other bytes than Zarr's."""
    import numcodecs
    import numcodecs.blosc

    real = numcodecs.blosc.Blosc

    class Blosc015(real):  # numcodecs 0.15's signature: no typesize
        def __init__(self, cname="lz4", clevel=5, shuffle=1, blocksize=0):
            super().__init__(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize)

    monkeypatch.setattr(numcodecs, "__version__", "0.15.1")
    monkeypatch.setattr(numcodecs, "Blosc", Blosc015)
    monkeypatch.setattr(numcodecs.blosc, "Blosc", Blosc015)
    n = 70  # 64 + 6
    store = FeatureStore.create(
        tmp_path / "s.zarr", row_ids=[f"r{i}" for i in range(n)], hidden=8, registers=0, patches=3
    )
    values = {
        k: np.random.default_rng(0).standard_normal((n, *s[1:])).astype(np.float16)
        for k, s in store.shapes.items()
    }
    _write_and_compare_with_zarr(store, values, tmp_path / "twin")


def test_units_hashed_with_xxh3_and_blake2b_hashes_of_0_3_still_verify(tmp_path, built, pre, ref):
    """New units record an XXH3-128 hash; a store sealed by tprobe 0.3 (blake2b, no prefix), or resumed
    across versions (both kinds), verifies deep, and an altered unit is found under either hash."""
    import zarr

    from tprobe.cache.store import _unit_digest

    sealed = FeatureStore.open(built["zarr"])
    assert all(h.startswith("xxh3_128:") for h in sealed.units["hash"])
    # uncompressed, so altered bytes stay a readable chunk of the same size: only the hash can tell
    store = extract(pre, ref, cache=tmp_path / "c", compression="none", **KW).path
    group = zarr.open_group(store, mode="r+")
    meta = dict(group.attrs)["tprobe_meta"]
    fs = FeatureStore.open(store)
    # unit 0 as 0.3 wrote it (blake2b), unit 1 as this version: a store resumed across versions
    meta["units"]["hash"][0] = _unit_digest(
        {n: fs._read_raw(n, fs.unit_slice(0)) for n in fs.shapes}, "blake2b"
    )
    assert ":" not in meta["units"]["hash"][0]
    group.attrs["tprobe_meta"] = meta
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 0 and "units re-hashed" in r.output, r.output
    for unit in (0, 1):  # an altered chunk of either unit (same size, readable) is found by its own hash
        chunk = store / "patches" / "c" / str(unit) / "0" / "0"
        good = chunk.read_bytes()
        raw = bytearray(good)
        raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
        chunk.write_bytes(raw)
        r = CliRunner().invoke(main, ["status", str(store), "--deep"])
        assert r.exit_code == 2 and f"DAMAGED: unit {unit} (rows" in r.output, r.output
        assert "does not match its recorded hash" in r.output, r.output
        chunk.write_bytes(good)


def test_a_store_from_before_format_2_is_checked_for_existence_with_a_note(tmp_path, built):
    import zarr

    store = _copy(built["zarr"], tmp_path)
    group = zarr.open_group(store, mode="r+")
    meta = dict(group.attrs)["tprobe_meta"]
    del meta["units"], meta["store_version"]
    group.attrs["tprobe_meta"] = meta
    r = CliRunner().invoke(main, ["status", str(store), "--deep"])
    assert r.exit_code == 0 and "not verifiable: written before store format 2" in r.output, r.output
    assert from_store(store, "cls").X.shape[0] == FeatureStore.open(store).n
    (store / "registers" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(TprobeError, match="chunk registers/c/0 is missing"):
        from_store(store, "registers")


# status one-liners -----------------------------------------------------------------------------
@pytest.mark.refuses("a store with a garbage tprobe_meta or no row_ids (status)")
def test_status_of_a_garbage_tprobe_meta_or_no_row_ids_is_one_line(tmp_path, built):
    import zarr

    store = _copy(built["zarr"], tmp_path / "a")
    zarr.open_group(store, mode="r+").attrs["tprobe_meta"] = "garbage"
    r = CliRunner().invoke(main, ["status", str(store)])
    _one_line_exit_2(r)
    assert "tprobe_meta" in r.output and "re-extract" in r.output
    store = _copy(built["zarr"], tmp_path / "b")
    shutil.rmtree(store / "row_ids")
    r = CliRunner().invoke(main, ["status", str(store)])
    _one_line_exit_2(r)
    assert "row_ids array is missing" in r.output and "re-extract" in r.output
    with pytest.raises(TprobeError, match="row_ids array is missing"):
        from_store(store, "cls")


@pytest.mark.refuses("a store whose row_ids chunk is truncated or garbage (status, export, probe)")
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_row_ids_chunk_is_one_line(tmp_path, built, damage):
    """zstd's RuntimeError on a damaged row_ids chunk was an 'unexpected' error (exit 1)."""
    store = _copy(built["zarr"], tmp_path / "a")
    chunk = store / "row_ids" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10] if damage == "truncated" else b"garbage")
    for cmd in (
        ["status", str(store)],
        ["export", str(store), "--to", "parquet", str(tmp_path / "out.parquet")],
        ["probe", "--store", str(store), "--bootstrap", "5", "--out", str(tmp_path / "runs")],
    ):
        r = CliRunner().invoke(main, cmd)
        _one_line_exit_2(r)
        assert "row_ids array is missing or unreadable" in r.output and "re-extract" in r.output


@pytest.mark.refuses("a store manifest that is not a parquet file, or lacks its donor column")
@pytest.mark.parametrize("damage", ["truncated", "no donor"])
def test_a_damaged_or_cut_store_manifest_is_one_line(tmp_path, built, damage):
    """A truncated manifest (pyarrow's ArrowInvalid) or one without its donor column (KeyError) was an
    'unexpected' error (exit 1) in status, export and probe."""
    store = _copy(built["zarr"], tmp_path / "a")
    mpath = manifest_path(store)
    if damage == "truncated":
        mpath.write_bytes(mpath.read_bytes()[:100])
        said = "cannot be read as the store's manifest"
    else:
        pd.read_parquet(mpath).drop(columns="donor").to_parquet(mpath, index=False)
        said = "has no donor column"
    for cmd in (
        ["export", str(store), "--to", "parquet", str(tmp_path / "out.parquet")],
        ["probe", "--store", str(store), "--bootstrap", "5", "--out", str(tmp_path / "runs")],
    ):
        r = CliRunner().invoke(main, cmd)
        _one_line_exit_2(r)
        assert said in r.output, r.output
    r = CliRunner().invoke(main, ["status", str(store)])  # the report, its rows check failed: exit 2
    assert r.exit_code == 2 and "unexpected" not in r.output, r.output
    assert "NOT VERIFIED: " in r.output and said in r.output, r.output


@pytest.mark.parametrize(
    "where,content",
    [
        ("zarr.json", "[]"),
        ("zarr.json", '{"zarr_format": 3, "node_type": "group", "attributes": []}'),
        ("zarr.json", '{"zarr_format": 3, "node_type": "group", "attributes": {}, "extra": 1}'),
        ("row_ids/zarr.json", "null"),
        ("cls/zarr.json", "[]"),
        ("cls/zarr.json", "shape"),
    ],
)
@pytest.mark.refuses("a store zarr.json that is JSON but not Zarr metadata")
def test_a_zarr_json_of_the_wrong_shape_is_one_line(tmp_path, built, where, content):
    """Valid JSON that is not Zarr's metadata (a list, attributes that are a list, an unknown key, a
    shape that is text) raised Zarr's TypeError or AttributeError: an 'unexpected' error (exit 1)."""
    store = _copy(built["zarr"], tmp_path / "a")
    meta = store / where
    if content == "shape":
        content = json.dumps({**json.loads(meta.read_text()), "shape": "x"})
    meta.write_text(content)
    cmds = [["export", str(store), "--to", "parquet", str(tmp_path / "out.parquet")]]
    cmds += [["status", "--deep", str(store)]] if where.startswith("cls") else [["status", str(store)]]
    for cmd in cmds:
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 2 and "unexpected" not in r.output, r.output
        assert "re-extract" in r.output, r.output
    with pytest.raises(TprobeError, match="re-extract"):
        from_store(store, "cls")


# 4: labels edited in a store's manifest ---------------------------------------------------------
@pytest.mark.refuses("a store manifest whose labels or donors were edited")
def test_an_edited_label_in_the_stores_manifest_is_refused_and_extract_restores_it(tmp_path, pre, ref):
    store = extract(pre, ref, cache=tmp_path / "c", **KW).path
    mpath = manifest_path(store)
    original = mpath.read_bytes()
    m = pd.read_parquet(mpath)
    m.loc[3, "label"] = 1 - m.loc[3, "label"]
    m.to_parquet(mpath, index=False)
    with pytest.raises(TprobeError, match="other labels or donors"):
        from_store(store, "cls")
    _one_line_exit_2(
        CliRunner().invoke(
            main, ["probe", "--store", str(store), "--bootstrap", "5", "--out", str(tmp_path / "runs")]
        )
    )
    r = CliRunner().invoke(main, ["status", str(store)])
    assert r.exit_code == 2, r.output  # a store whose rows cannot be trusted is not reported as fine
    assert "NOT VERIFIED" in r.output and "other labels" in r.output, r.output
    m.loc[3, "label"] = 1 - m.loc[3, "label"]
    m.loc[5, "donor"] = "donor_9"
    m.to_parquet(mpath, index=False)
    with pytest.raises(TprobeError, match="other labels or donors"):
        from_store(store, "cls")
    assert extract(pre, ref, cache=tmp_path / "c", **KW).status == "up to date"  # the same data restores it
    assert mpath.read_bytes() == original
    assert from_store(store, "cls").meta["label"].tolist() == pre.kept["label"].tolist()


@pytest.mark.refuses("a store manifest whose labels became text, or without its path, group or view column")
@pytest.mark.parametrize("damage", ["labels as text", "no view", "no path", "no group"])
def test_a_manifest_with_text_labels_or_without_a_row_column_is_one_line_and_extract_restores_it(
    tmp_path, pre, ref, damage
):
    """Labels saved as text ("0"/"1") hash as the integers do (``f"{v}"``), so the labels check passed
    them: probe failed with an 'unexpected' TypeError (exit 1) and map ran on them (exit 0). A manifest
    without its path, group or view column passed too and was an 'unexpected' KeyError in probe and map.
    Both are one line now, and extracting again restores the manifest (its hash alone called it the same)."""
    store = extract(pre, ref, cache=tmp_path / "c", **KW).path
    mpath = manifest_path(store)
    original = mpath.read_bytes()
    m = pd.read_parquet(mpath)
    if damage == "labels as text":
        m.assign(label=m["label"].astype(str)).to_parquet(mpath, index=False)
        said = "label column holds"
    else:
        m.drop(columns=damage.removeprefix("no ")).to_parquet(mpath, index=False)
        said = f"has no {damage.removeprefix('no ')} column"
    for cmd in (
        ["probe", "--store", str(store), "--bootstrap", "5", "--out", str(tmp_path / "runs")],
        ["map", "--store", str(store), "--out", str(tmp_path / "map")],
    ):
        r = CliRunner().invoke(main, cmd)
        _one_line_exit_2(r)
        assert said in r.output and "re-extract" in r.output, r.output
    with pytest.raises(TprobeError, match=said):
        from_store(store, "cls")
    if damage == "labels as text":  # the rows check of status (light reader and pandas alike) fails
        r = CliRunner().invoke(main, ["status", str(store)])
        assert r.exit_code == 2 and "NOT VERIFIED: " in r.output and said in r.output, r.output
    assert extract(pre, ref, cache=tmp_path / "c", **KW).status == "up to date"  # restores it
    assert mpath.read_bytes() == original
    assert from_store(store, "cls").meta["label"].tolist() == pre.kept["label"].tolist()


# 2: the model's input normalisation keys the store and is checked by predict ------------------------
@pytest.mark.refuses("predict with a model whose input normalisation changed since the run")
def test_a_preprocessor_config_added_to_the_same_snapshot_keys_a_new_store_and_predict_refuses(
    tmp_path, data, monkeypatch
):
    import huggingface_hub.constants as hf_constants

    from tprobe.probing.predict import predict
    from tprobe.probing.run import ProbeRun
    from tprobe.testing import save_random_dinov2

    commit = "d" * 40
    snap = tmp_path / "hub" / "models--facebook--dinov2-with-registers-small" / "snapshots" / commit
    save_random_dinov2(snap)
    (snap / "preprocessor_config.json").unlink()  # a snapshot without it: ImageNet mean/std
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pre = preprocess(discover(data))
    kw = dict(cache=tmp_path / "c", offline=True, **KW)
    first = extract(pre, resolve_model("dinov2-small-reg", offline=True), **kw)
    run = ProbeRun(n_boot=5).fit(from_store(first.path, "cls")).save(tmp_path / "runs")
    new = copy_subset(tmp_path / "new", donors=("donor_3",), per_class=1)
    assert predict(run, new, cache=tmp_path / "c", offline=True)["p_activated"].notna().all()
    # the same snapshot gains a preprocessor_config.json with other values
    (snap / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    ref = resolve_model("dinov2-small-reg", offline=True)
    assert ref.resolved == commit
    second = extract(pre, ref, **kw)
    assert second.status == "written" and second.path != first.path
    assert FeatureStore.open(second.path).attrs["image_mean"] == [0.5] * 3
    with pytest.raises(TprobeError, match="input normalisation .* differs .*retrain the probe"):
        predict(run, new, cache=tmp_path / "c", offline=True)


def test_a_local_model_folder_gaining_a_preprocessor_config_gets_its_own_store(tmp_path, pre):
    from tprobe.testing import save_random_dinov2

    folder = save_random_dinov2(tmp_path / "m")
    (folder / "preprocessor_config.json").unlink()
    first = extract(pre, resolve_model(str(folder)), cache=tmp_path / "c", **KW)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    second = extract(pre, resolve_model(str(folder)), cache=tmp_path / "c", **KW)
    assert second.status == "written" and second.path != first.path
    assert not np.allclose(
        FeatureStore.open(first.path).read("cls"), FeatureStore.open(second.path).read("cls")
    )


# 12: a stale create.lock ------------------------------------------------------------------------
def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _create(path: Path) -> FeatureStore:
    return FeatureStore.create(
        path, row_ids=[f"r{i}" for i in range(6)], hidden=4, registers=0, patches=2, chunk_rows=2
    )


@pytest.mark.parametrize("owner", ["empty", "dead pid", "dead host"])
def test_a_stale_create_lock_is_taken_over_at_once(tmp_path, caplog, owner):
    import socket

    path = tmp_path / "s.zarr"
    progress = path.with_name(path.name + ".progress")
    progress.mkdir()
    lock = progress / "create.lock"
    lock.write_text(
        {
            "empty": "",
            "dead pid": json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}),
            "dead host": json.dumps({"host": "node-that-died", "pid": 1}),
        }[owner]
    )
    os.utime(lock, (time.time() - 60, time.time() - 60))  # killed a minute ago
    t0 = time.monotonic()
    store = _create(path)
    assert time.monotonic() - t0 < 10 and (progress / "meta.json").exists()
    assert "is gone; taking over" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    for u in range(store.n_units):
        store.write_unit(u, {"cls": np.ones((2, 4)), "patches": np.ones((2, 2, 4))})
    assert store.finalize() and FeatureStore.open(path).read("cls").shape == (6, 4)


def test_a_live_creator_is_waited_for_and_taken_over_when_it_dies(tmp_path, caplog):
    import subprocess
    import sys

    path = tmp_path / "s.zarr"
    progress = path.with_name(path.name + ".progress")
    progress.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(progress / 'create.lock')!r}, os.O_CREAT | os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": %d}' % os.getpid())\n"
            "print('held', flush=True); time.sleep(1.5)",
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline().strip() == b"held"
    t0 = time.monotonic()
    _create(path)
    assert 0.5 < time.monotonic() - t0 < 10, "did not wait for the live creator, or waited too long"
    holder.wait()
    assert "taking over" in caplog.text


# 15: kill leftovers -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_leftovers_beside_a_finished_store_are_removed_and_it_is_byte_identical(
    tmp_path, built, pre, ref, fmt
):
    cache = built[fmt].parents[3]  # cache/<dataset>/<preprocess>/<model>/<store>
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    store = work / built[fmt].relative_to(cache)
    dead = _dead_pid()
    sealed = store.with_name(f"{store.name}.sealed-{dead}")
    sealed.mkdir()
    (sealed / "part_000000.npz").write_bytes(b"x" * 1000)  # the HDF5 parts: an uncompressed copy
    store.with_name(f"{store.name}.tmp{dead}").write_bytes(b"half an h5")
    manifest_path(store).with_name(manifest_path(store).name + f".tmp{dead}").write_bytes(b"half a parquet")
    if fmt == "zarr":
        (store / "cls" / "c" / "0" / "0.1234abcd.partial").write_bytes(b"half a chunk")
        (store / "zarr.5678.partial").write_bytes(b"half a zarr.json")
    assert extract(pre, ref, cache=work, fmt=fmt, **KW).status == "up to date"
    assert _tree(work) == _tree(cache)


# finished units whose data went missing before sealing ------------------------------------------------
def _interrupted(cache: Path, pre, ref, fmt: str, monkeypatch, units: int = 3) -> FeatureStore:
    """A store of ``pre`` whose extract was interrupted after ``units`` units were written and marked done."""
    real, written = FeatureStore.write_unit, []

    def write_unit(self, unit, tokens):
        if len(written) == units:
            raise KeyboardInterrupt
        written.append(unit)
        return real(self, unit, tokens)

    with monkeypatch.context() as m:
        m.setattr(FeatureStore, "write_unit", write_unit)
        with pytest.raises(KeyboardInterrupt):
            extract(pre, ref, cache=cache, fmt=fmt, **KW)
    store = FeatureStore.open(_store_path(cache, pre, ref, fmt), allow_incomplete=True)
    assert sorted(store.done_units()) == sorted(written) and not store.complete
    return store


def _store_path(cache, pre, ref, fmt):
    from tprobe.cache.keys import store_path

    return store_path(cache, pre, ref, fmt="hdf5" if fmt == "hdf5" else "zarr")


def _same_values(a: Path, b: Path) -> None:
    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    assert sa.shapes == sb.shapes and not sb.verify(deep=True)
    for name in sa.shapes:
        assert np.array_equal(sa.read(name), sb.read(name)), name


@pytest.mark.parametrize(
    "fmt, damage",
    [("zarr", "delete"), ("zarr", "truncate"), ("hdf5", "delete"), ("hdf5", "truncate")],
)
def test_a_finished_unit_whose_data_went_missing_is_written_again_on_resume(
    tmp_path, built, pre, ref, monkeypatch, caplog, fmt, damage
):
    """A resumed extract never seals a unit marked done whose chunk (Zarr) or part (HDF5) is gone or cut:
    it writes it again, and the store equals an uninterrupted one (before: "written" with a store every
    reader refuses, or a one-line "delete it and re-extract", or an unexpected error on every rerun)."""
    store = _interrupted(tmp_path / "cache", pre, ref, fmt, monkeypatch)
    hit = store.progress_dir / "part_000001.npz" if fmt == "hdf5" else store.path / "patches/c/1/0/0"
    if damage == "delete":
        hit.unlink()
    else:
        hit.write_bytes(hit.read_bytes()[:100])
    res = extract(pre, ref, cache=tmp_path / "cache", fmt=fmt, **KW)
    assert res.status == "written" and res.path == store.path
    _same_values(built[fmt], store.path)
    assert "unit 1 (rows 8-16) was marked done but its data is missing" in caplog.text


@pytest.mark.refuses("a damaged HDF5 part found while sealing (the rerun redoes it)")
def test_a_damaged_hdf5_part_found_while_sealing_is_one_line_and_the_rerun_redoes_it(
    tmp_path, built, pre, ref, monkeypatch
):
    """A part whose values no longer hash to its marker's hash is never assembled into the store: sealing
    stops in one line, the unit is marked to be written again, and the next run seals the right values."""
    store = _interrupted(tmp_path / "cache", pre, ref, "hdf5", monkeypatch)
    part = store.progress_dir / "part_000002.npz"
    with np.load(part) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["cls"] = arrays["cls"] + 1
    np.savez(part, **arrays)
    with pytest.raises(TprobeError, match="rerun the same `tprobe extract` command") as exc:
        extract(pre, ref, cache=tmp_path / "cache", fmt="hdf5", **KW)
    assert "unit 2, rows 16-24" in str(exc.value) and "\n" not in str(exc.value)
    assert 2 not in store.done_units() and not part.exists() and not store.complete
    assert not list(store.path.parent.glob(f"{store.path.name}.tmp*"))
    assert extract(pre, ref, cache=tmp_path / "cache", fmt="hdf5", **KW).status == "written"
    _same_values(built["hdf5"], store.path)


@pytest.mark.parametrize("executor", [["--workers", "2"], ["--executor", "slurm", "--shards", "2"]])
def test_up_to_date_with_workers_or_slurm_checks_the_store_and_restores_its_manifest(
    tmp_path, built, data, tiny_reg, executor
):
    """`extract --workers N` and `--executor slurm` find a sealed store as a one-process extract does: its
    deleted manifest restored (before: "up to date" and the manifest still missing, so every reader asked to
    re-extract, and re-extracting said "up to date" again), a missing chunk refused in one line."""
    cache = built["zarr"].parents[3]
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    store = work / built["zarr"].relative_to(cache)
    manifest_path(store).unlink()
    args = ["extract", "--model", str(tiny_reg), "--data", str(data), "--cache", str(work), *executor]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "up to date" in r.output, r.output
    assert manifest_path(store).read_bytes() == manifest_path(built["zarr"]).read_bytes()
    (store / "cls" / "c" / "1" / "0").unlink()
    r = CliRunner().invoke(main, args)
    _one_line_exit_2(r)
    assert "chunk cls/c/1 is missing" in r.output


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_second_extract_of_the_same_store_never_overwrites_what_the_first_finished_or_sealed(tmp_path, fmt):
    """Two extracts of one store at once (another node, another device: other bits): a unit the first marked
    done, or a store it sealed, is left as it is by the second (before: the second rewrote the sealed
    store's chunks, which then read its values under the first's hashes, then failed with FileNotFoundError)."""
    path = tmp_path / f"s{'.zarr' if fmt == 'zarr' else '.h5'}"
    kw = dict(row_ids=[f"r{i}" for i in range(8)], hidden=4, registers=0, patches=2, chunk_rows=4)
    first = FeatureStore.create(path, compression="none", **kw)
    second = FeatureStore.create(path, compression="none", **kw)

    def tokens(v):
        return {"cls": np.full((4, 4), v, np.float16), "patches": np.full((4, 2, 4), v, np.float16)}

    first.write_unit(0, tokens(1.0))
    second.write_unit(0, tokens(2.0))  # done meanwhile by the first: skipped
    first.write_unit(1, tokens(1.0))
    assert first.finalize()
    second.write_unit(1, tokens(2.0))  # sealed meanwhile: skipped
    assert second.finalize()
    sealed = FeatureStore.open(path)
    assert (sealed.read("cls") == 1).all() and (sealed.read("patches") == 1).all()
    assert sealed.verify(deep=True) == []


def test_a_temp_file_of_a_writer_on_another_node_is_left_alone(tmp_path, built, monkeypatch):
    """Nodes of a cluster share the cache and their pids repeat: a store opened (or created, as every array
    task does) on node B never removes the temp file node A is writing beside it, whose pid is no process on
    B (before: removed, so A's extract failed with FileNotFoundError; two nodes' processes of one pid also
    wrote one temp file). A dead process's temp file on this node is still removed."""
    import socket

    from tprobe.cache.files import atomic_write

    store = _copy(built["zarr"], tmp_path / "cache")
    target = manifest_path(store)
    want = target.read_bytes()
    node_a_pid, real_pid = _dead_pid(), os.getpid()  # a pid with no process on this node (B)

    def write(tmp: Path) -> None:
        tmp.write_bytes(want[:10])
        with monkeypatch.context() as b:  # meanwhile node B opens the store
            b.setattr(socket, "gethostname", lambda: "node-b")
            b.setattr(os, "getpid", lambda: real_pid)
            FeatureStore.open(store)
        assert tmp.exists(), "node B removed node A's temp file"
        tmp.write_bytes(want)

    with monkeypatch.context() as a:  # node A writes the store's manifest
        a.setattr(socket, "gethostname", lambda: "node-a")
        a.setattr(os, "getpid", lambda: node_a_pid)
        atomic_write(target, write)
    assert target.read_bytes() == want
    mine = Path(f"{target}.tmp@{socket.gethostname()}@{node_a_pid}")
    theirs = Path(f"{target}.tmp@node-a@{node_a_pid}")
    for p in (mine, theirs):
        p.write_bytes(b"half a parquet")
    FeatureStore.open(store)
    assert not mine.exists() and theirs.exists()


# 16: fsync coverage -----------------------------------------------------------------------------
def test_zarr_metadata_row_ids_lock_and_new_chunk_folders_are_fsynced(tmp_path, pre, ref, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = extract(pre, ref, cache=tmp_path / "c", **KW).path
    s = str(store)
    for name in ("cls", "registers", "patches", "row_ids"):
        assert f"{s}/{name}/zarr.json" in synced, name
    assert f"{s}/row_ids/c/0" in synced and f"{s}/zarr.json" in synced
    assert any(p.endswith(".progress/create.lock") for p in synced)
    for name in ("cls", "registers", "patches"):
        assert f"{s}/{name}/c" in synced and f"{s}/{name}" in synced, name
    assert str(store.parent) in synced  # the folder holding the seal rename


def test_every_unit_is_fsynced_file_and_folders_before_its_marker(tmp_path, pre, ref, monkeypatch):
    """The writer issues a unit's fsyncs together (threads) and ``<array>`` once per process: still every
    chunk file, every new folder of the unit and ``<array>/c`` reach the disk before the unit's marker."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        events.append(("fsync", path))  # recorded once done

    def replace(src, dst, **kw):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store = extract(pre, ref, cache=tmp_path / "c", **KW).path
    s = FeatureStore.open(store)
    assert s.n_units > 1
    for u in range(s.n_units):
        marker = next(i for i, e in enumerate(events) if e[1].endswith(f"unit_{u:06d}.done"))
        before = {p for kind, p in events[:marker] if kind == "fsync"}
        for name in s.shapes:
            chunk = s._chunk_file(name, u)
            need = [chunk, *[p for p in chunk.parents if store in p.parents and p != store]]
            missing = [str(p.relative_to(store)) for p in need if str(p) not in before]
            assert not missing, (u, name, missing)


# done-when: random kill points over os.replace / os.fsync in extract and sealing ------------------
class _Killed(BaseException):
    """Stands in for SIGKILL at a kill point: no ``except Exception`` cleanup runs (Zarr's neither)."""


def _kill_at(monkeypatch, k: int) -> list:
    """The k-th call of os.replace or os.fsync (counted together) raises :class:`_Killed`."""
    calls = []
    # fsync itself is skipped (what it makes durable is not under test here, and it is slow on shared disks)
    for name, real in (("replace", os.replace), ("fsync", lambda fd: None)):

        def dying(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            if len(calls) == k:
                raise _Killed(f"killed at {_name} #{k}")
            return _real(*a, **kw)

        monkeypatch.setattr(os, name, dying)
    return calls


def _everything(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_fuzz_kill_points_end_byte_identical_with_no_leftovers(tmp_path, data, tiny_reg, monkeypatch, fmt):
    from tprobe.data.preprocess import PreprocessConfig
    from tprobe.models.backbones import Backbone

    bb = Backbone.from_pretrained(str(tiny_reg), device="cpu")
    pre = preprocess(discover(data), PreprocessConfig(views="orig"))  # 12 rows: units of 8 and 4
    kw = dict(fmt=fmt, **KW)
    with monkeypatch.context() as m:
        calls = _kill_at(m, 0)
        extract(pre, bb, cache=tmp_path / "ref", **kw)
    want = _everything(tmp_path / "ref")
    n = len(calls)  # 8 random points, and the last 4 calls: sealing
    points = sorted(
        {
            *np.random.default_rng(18).choice(np.arange(1, n - 3), 8, replace=False).tolist(),
            *range(n - 3, n + 1),
        }
    )
    t0 = time.monotonic()
    for k in points:
        cache = tmp_path / f"k{k}"
        with monkeypatch.context() as m:
            _kill_at(m, k)
            with pytest.raises(_Killed):
                extract(pre, bb, cache=cache, **kw)
        assert extract(pre, bb, cache=cache, **kw).status in ("written", "up to date"), k
        assert _everything(cache) == want, f"kill point {k} of {n} ({fmt})"
    print(f"{fmt}: {len(points)} kill points of {n} in {time.monotonic() - t0:.1f} s")


# one-line messages about model folders ----------------------------------------------------------
@pytest.mark.refuses("a model folder with only pickle weights (never unpickled)")
def test_pickle_only_weights_are_one_line_and_run_no_code(tmp_path, data):
    import pickle

    from tprobe.testing import save_random_dinov2

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    folder = save_random_dinov2(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    r = CliRunner().invoke(
        main, ["extract", "--model", str(folder), "--data", str(data), "--cache", str(tmp_path / "c")]
    )
    _one_line_exit_2(r)
    assert "only pickle weights" in r.output and "safetensors" in r.output and "weights_only" not in r.output
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.refuses("a local model folder that was moved (no hub lookup)")
def test_a_moved_model_folder_is_one_line_without_the_hub(tmp_path, data, pre, ref, tiny_reg, caplog):
    from tprobe.probing.predict import predict
    from tprobe.probing.run import ProbeRun

    folder = tmp_path / "m"
    shutil.copytree(tiny_reg, folder)
    store = extract(pre, resolve_model(str(folder)), cache=tmp_path / "c", **KW).path
    run = ProbeRun(n_boot=5).fit(from_store(store, "cls")).save(tmp_path / "runs")
    folder.rename(tmp_path / "moved")
    with pytest.raises(TprobeError, match=f"model folder {folder} is not there"):
        predict(run, data, cache=tmp_path / "c")
    r = CliRunner().invoke(
        main, ["extract", "--model", str(folder), "--data", str(data), "--cache", str(tmp_path / "c")]
    )
    _one_line_exit_2(r)
    assert "is not there" in r.output and "contacting the Hugging Face hub" not in caplog.text


@pytest.mark.refuses("an unreadable sealed store (a cut .h5, a broken zarr.json): delete it and re-extract")
@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_an_unreadable_sealed_store_names_a_fix_that_works(tmp_path, built, data, tiny_reg, fmt):
    """A sealed store tprobe cannot open (a cut HDF5 file, a Zarr group without its metadata) is one line
    whose fix works: it said "re-extract it", and `tprobe extract` refused with that same line forever."""
    cache = built[fmt].parents[3]
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    store = work / built[fmt].relative_to(cache)
    if fmt == "hdf5":
        store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    else:
        (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    args = ["extract", "--model", str(tiny_reg), "--data", str(data), "--cache", str(work)]
    args += ["--chunk-rows", "8", "--batch-size", "8", "--format", fmt]
    r = CliRunner().invoke(main, args)
    _one_line_exit_2(r)
    assert "delete it and re-extract" in r.output
    shutil.rmtree(store) if store.is_dir() else store.unlink()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    _same_values(built[fmt], store)


@pytest.mark.refuses("a damaged progress meta.json of a store being written")
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("damage", ['{"format": "za', "[]"])
def test_a_damaged_progress_meta_is_one_line_naming_what_to_delete(
    tmp_path, built, pre, ref, data, tiny_reg, monkeypatch, fmt, damage
):
    """A store being written whose progress meta.json is cut or not tprobe's: one line naming the progress
    folder (before: an unexpected JSONDecodeError on every command, or "delete the store", which left the
    progress folder and the same refusal; an HDF5 store being written has no store file to delete)."""
    store = _interrupted(tmp_path / "cache", pre, ref, fmt, monkeypatch)
    (store.progress_dir / "meta.json").write_text(damage)
    args = ["extract", "--model", str(tiny_reg), "--data", str(data), "--cache", str(tmp_path / "cache")]
    args += ["--chunk-rows", "8", "--batch-size", "8", "--format", fmt]
    for cmd in (args, ["status", str(store.path)]):
        r = CliRunner().invoke(main, cmd)
        _one_line_exit_2(r)
        assert f"delete {store.progress_dir.name}" in r.output
        assert (f" and {store.path.name} beside" in r.output) == (fmt == "zarr")
    shutil.rmtree(store.progress_dir)
    shutil.rmtree(store.path, ignore_errors=True)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    _same_values(built[fmt], store.path)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("damage", ["delete", "cut"])
def test_a_store_being_written_that_lost_its_row_ids_is_restored_by_the_rerun(
    tmp_path, built, pre, ref, monkeypatch, fmt, damage
):
    """A store being written whose progress row_ids.npy is gone or cut: status says so in one line, and the
    rerun of extract restores it from its own rows (before: an unexpected FileNotFoundError / ValueError
    from status and, for HDF5, from every extract that sealed it, so the store could never be finished)."""
    store = _interrupted(tmp_path / "cache", pre, ref, fmt, monkeypatch)
    ids = store.progress_dir / "row_ids.npy"
    if damage == "delete":
        ids.unlink()
    else:
        ids.write_bytes(ids.read_bytes()[:100])
    r = CliRunner().invoke(main, ["status", str(store.path)])
    _one_line_exit_2(r)
    assert "row_ids.npy: missing or damaged; rerun the same `tprobe extract`" in r.output
    assert extract(pre, ref, cache=tmp_path / "cache", fmt=fmt, **KW).status == "written"
    _same_values(built[fmt], store.path)


def test_status_of_a_store_whose_creator_died_says_to_rerun_not_to_wait(tmp_path):
    """A creator killed before meta.json leaves a progress folder without it: status said "a worker is
    creating this store right now; ask again in a moment" forever. Now only while a worker holds create.lock
    (or made it a moment ago); otherwise one line saying the rerun takes over, which it does."""
    import fcntl

    path = tmp_path / "s.zarr"
    progress = path.with_name("s.zarr.progress")
    progress.mkdir()
    lock = progress / "create.lock"
    lock.write_text("")
    old = time.time() - 60
    for p in (lock, progress):
        os.utime(p, (old, old))
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live creator
    try:
        r = CliRunner().invoke(main, ["status", str(path)])
        _one_line_exit_2(r)
        assert "creating this store right now" in r.output
    finally:
        os.close(fd)  # ... that dies
    r = CliRunner().invoke(main, ["status", str(path)])
    _one_line_exit_2(r)
    assert "the worker that began creating this store is gone" in r.output and "rerun" in r.output
    _create(path)  # the rerun takes over
    r = CliRunner().invoke(
        main, ["status", str(path)]
    )  # exit 2: a store made without extract has no manifest
    assert "creating this store" not in r.output and "incomplete" in r.output, r.output
