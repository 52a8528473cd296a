import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import tprobe.cache.store
from tprobe.cache.extract import extract, find_store, manifest_path
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, load_view, preprocess
from tprobe.errors import TprobeError
from tprobe.models.backbones import Backbone, resolve_model


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("model", ["tiny_reg", "tiny_plain"])
def test_store_layout_and_equality_with_model_outputs(request, tmp_path, small_data, fmt, model):
    path = request.getfixturevalue(model)
    pre = preprocess(discover(small_data))
    res = extract(
        pre,
        resolve_model(str(path)),
        cache=tmp_path / "c",
        fmt=fmt,
        dtype="float32",
        chunk_rows=16,
        batch_size=5,
        progress=False,
    )
    assert res.status == "written" and res.path.name.startswith("float32-fp32-")
    assert res.path.suffix == (".zarr" if fmt == "zarr" else ".h5")
    store = FeatureStore.open(res.path)
    n, R = len(pre.kept), (4 if model == "tiny_reg" else 0)
    assert store.shapes["cls"] == (n, 32) and store.shapes["patches"] == (n, 100, 32)
    assert ("registers" in store.shapes) == bool(R) and store.num_registers == R
    a = store.attrs
    assert a["num_register_tokens"] == R and a["patch_grid"] == [10, 10] and a["hidden_size"] == 32
    assert a["preprocess_hash"] == pre.config.hash and a["dataset_fingerprint"] == pre.fingerprint
    assert a["resolved_revision"] and a["tprobe_version"]
    manifest = pd.read_parquet(manifest_path(res.path))
    assert manifest["image_id"].tolist() == pre.kept["image_id"].tolist()
    # tokens equal the model's own last_hidden_state for the same inputs
    bb = Backbone.from_pretrained(str(path), device="cpu")
    rows = [0, 7, n - 1]
    imgs = np.stack([load_view(manifest.path[i], manifest.view[i], pre.config) for i in rows])
    with torch.inference_mode():
        hidden = bb(bb.pixel_values(imgs)).last_hidden_state.numpy()
    np.testing.assert_allclose(store.read("cls")[rows], hidden[:, 0], atol=1e-5)
    np.testing.assert_allclose(store.read("patches")[rows], hidden[:, 1 + R :], atol=1e-5)
    if R:
        np.testing.assert_allclose(store.read("registers")[rows], hidden[:, 1 : 1 + R], atol=1e-5)
    # pooling: the patch mean excludes registers
    np.testing.assert_allclose(store.pooled("mean")[rows], hidden[:, 1 + R :].mean(1), atol=1e-5)
    assert store.pooled("concat").shape == (n, (1 + R + 100) * 32)
    if not R:
        with pytest.raises(TprobeError, match="no register tokens"):
            store.pooled("registers")


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_interrupted_extract_resumes_and_matches_uninterrupted(
    tmp_path, small_data, tiny_reg, monkeypatch, fmt
):
    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    kw = dict(fmt=fmt, chunk_rows=8, batch_size=4, progress=False)
    full = FeatureStore.open(extract(pre, ref, cache=tmp_path / "a", **kw).path).read("patches")

    real_write = FeatureStore.write_unit
    calls = []

    def dying_write(self, unit, tokens):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C after three finished chunks
        calls.append(unit)
        real_write(self, unit, tokens)

    monkeypatch.setattr(FeatureStore, "write_unit", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract(pre, ref, cache=tmp_path / "b", **kw)
    monkeypatch.setattr(FeatureStore, "write_unit", real_write)
    path = next(
        (tmp_path / "b").rglob(f"float16-*.{'zarr' if fmt == 'zarr' else 'h5'}.progress")
    ).with_suffix("")
    with pytest.raises(TprobeError, match="incomplete \\(3/.*rerun the same"):
        FeatureStore.open(path)
    res = extract(pre, ref, cache=tmp_path / "b", **kw)
    assert res.status == "written" and res.images == len(pre.kept) - 3 * 8
    np.testing.assert_array_equal(FeatureStore.open(res.path).read("patches"), full)
    assert extract(pre, ref, cache=tmp_path / "b", **kw).status == "up to date"


def test_changed_preprocessing_never_reuses_the_cache(tmp_path, small_data, tiny_reg):
    ref = resolve_model(str(tiny_reg))
    pre = preprocess(discover(small_data))
    first = extract(pre, ref, cache=tmp_path, progress=False)
    other = preprocess(discover(small_data), PreprocessConfig(views="orig"))
    second = extract(other, ref, cache=tmp_path, progress=False)
    assert second.status == "written" and second.path != first.path
    assert find_store(tmp_path, other, ref) == second.path
    with pytest.raises(TprobeError, match="run `tprobe extract --model"):
        find_store(tmp_path, preprocess(discover(small_data), PreprocessConfig(canvas=154)), ref)


def test_corrupt_image_is_skipped_and_the_rest_extracted(tmp_path, small_data, tiny_reg):
    bad = small_data / "donor_1" / "activated" / "CD3_1_act_1_1_1.png"
    bad.write_bytes(b"\x89PNG\r\n garbage")
    pre = preprocess(discover(small_data))
    assert any("CD3_1_act_1_1_1.png" in str(s) for s in pre.skipped)
    res = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path / "c", progress=False)
    assert FeatureStore.open(res.path).n == len(pre.kept) > 0


def test_shards_write_disjoint_units(tmp_path, small_data, tiny_reg):
    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    kw = dict(cache=tmp_path, chunk_rows=8, progress=False)
    r0 = extract(pre, ref, shard=(0, 2), **kw)
    assert r0.status == "partial (shard)"
    r1 = extract(pre, ref, shard=(1, 2), **kw)
    assert r1.status == "written" and FeatureStore.open(r1.path).complete


def test_zarr_chunks_are_aligned_with_units(tmp_path, small_data, tiny_reg):
    import zarr

    pre = preprocess(discover(small_data))
    res = extract(pre, resolve_model(str(tiny_reg)), cache=tmp_path, chunk_rows=8, progress=False)
    arr = zarr.open_array(res.path / "patches", mode="r")
    assert arr.chunks[0] == 8 and arr.dtype == np.float16
    assert tprobe.cache.store.FeatureStore.open(res.path).chunk_rows == 8


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_kill_9_mid_run_then_resume(tmp_path, tiny_reg, fmt):
    """A real SIGKILL of `tprobe extract` keeps finished chunks; the rerun completes the store."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [
        sys.executable,
        "-m",
        "tprobe.cli",
        "extract",
        "--model",
        str(tiny_reg),
        "--cache",
        str(tmp_path / "c"),
        "--chunk-rows",
        "8",
        "--batch-size",
        "1",
        "--format",
        fmt,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    markers = []
    while time.time() < deadline and len(markers) < 5 and proc.poll() is None:
        markers = list((tmp_path / "c").rglob("unit_*.done"))
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(markers) >= 5, "extract finished or stalled before it could be killed"
    args[args.index("--batch-size") + 1] = "32"  # resuming with another batch size is fine: units are chunks
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    store = FeatureStore.open(rerun.stdout.strip().splitlines()[-1])
    pre = preprocess(discover())
    assert store.n == len(pre.kept) and store.complete
    ref = extract(
        pre, resolve_model(str(tiny_reg)), cache=tmp_path / "fresh", fmt=fmt, chunk_rows=8, progress=False
    )
    np.testing.assert_array_equal(store.read("cls"), FeatureStore.open(ref.path).read("cls"))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_concurrent_shard_workers_build_one_store(tmp_path, tiny_reg, fmt):
    """Two `--shard i/2` processes started together create, fill and seal one store."""
    import subprocess
    import sys

    base = [
        sys.executable,
        "-m",
        "tprobe.cli",
        "extract",
        "--model",
        str(tiny_reg),
        "--cache",
        str(tmp_path),
        "--chunk-rows",
        "32",
        "--format",
        fmt,
    ]
    procs = [
        subprocess.Popen([*base, "--shard", f"{i}/2"], stdout=subprocess.PIPE, text=True) for i in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    path = outs[0].strip().splitlines()[-1]
    store = FeatureStore.open(path)
    pre = preprocess(discover())
    ref = extract(
        pre, resolve_model(str(tiny_reg)), cache=tmp_path / "one", fmt=fmt, chunk_rows=32, progress=False
    )
    np.testing.assert_array_equal(store.read("patches"), FeatureStore.open(ref.path).read("patches"))


def _store_tree(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def _workers_cmd(tiny_reg, data, cache, *extra):
    import sys

    return [
        sys.executable,
        "-m",
        "tprobe.cli",
        "extract",
        "--model",
        str(tiny_reg),
        "--data",
        str(data),
        "--cache",
        str(cache),
        *extra,
    ]


def test_workers_build_a_store_byte_identical_to_one_process(tmp_path, small_data, tiny_reg):
    import subprocess

    r = subprocess.run(
        _workers_cmd(tiny_reg, small_data, tmp_path / "two", "--chunk-rows", "8", "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "2 workers on CPU" in r.stdout and FeatureStore.open(r.stdout.strip().splitlines()[-1]).complete
    one = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_reg),
            "--data",
            str(small_data),
            "--cache",
            str(tmp_path / "one"),
            "--chunk-rows",
            "8",
        ],
    )
    assert one.exit_code == 0, one.output
    assert _store_tree(tmp_path / "two") == _store_tree(tmp_path / "one")
    again = subprocess.run(
        _workers_cmd(tiny_reg, small_data, tmp_path / "two", "--chunk-rows", "8", "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_killed_worker_units_are_redone_by_a_rerun(tmp_path, small_data, tiny_reg):
    import signal
    import subprocess

    cmd = _workers_cmd(tiny_reg, small_data, tmp_path / "two", "--chunk-rows", "1", "--workers", "2")
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list((tmp_path / "two").rglob("unit_*.done")):
        time.sleep(0.05)
    children = [int(c) for c in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    assert len(children) == 2
    os.kill(children[1], signal.SIGKILL)  # worker 1 dies mid-run
    out, err = parent.communicate(timeout=300)
    assert parent.returncode == 2 and "worker 1 (--shard 1/2) exit status -9" in err and "rerun" in err, err
    assert list((tmp_path / "two").rglob("*.progress"))  # not sealed
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "written" in r.stdout, r.stderr
    one = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_reg),
            "--data",
            str(small_data),
            "--cache",
            str(tmp_path / "one"),
            "--chunk-rows",
            "1",
        ],
    )
    assert one.exit_code == 0, one.output
    assert _store_tree(tmp_path / "two") == _store_tree(tmp_path / "one")


def test_worker_environment_pins_a_device_or_a_share_of_the_cores(tmp_path, small_data, tiny_reg):
    from tprobe.cache.extract import worker_env

    assert worker_env(1, 2, ["2", "3"])["CUDA_VISIBLE_DEVICES"] == "3"
    assert worker_env(2, 3, ["0", "1"])["CUDA_VISIBLE_DEVICES"] == "0"
    cpu = worker_env(0, 2, [], cores=8)
    assert cpu["OMP_NUM_THREADS"] == cpu["MKL_NUM_THREADS"] == "4"
    assert worker_env(0, 4, [], cores=2)["OMP_NUM_THREADS"] == "1"
    for bad in (
        ["--workers", "2", "--shard", "0/2"],
        ["--workers", "2", "--devices", "a,b"],
        ["--devices", "0"],
    ):
        r = CliRunner().invoke(
            main,
            ["extract", "--model", str(tiny_reg), "--data", str(small_data), "--cache", str(tmp_path), *bad],
        )
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_a_model_loaded_in_the_background_writes_the_same_store_and_is_waited_for_only_when_needed(
    tmp_path, small_data, tiny_reg, monkeypatch
):
    from tprobe.cache.extract import ModelLoading

    pre = preprocess(discover(small_data))
    ref = resolve_model(str(tiny_reg))
    threads = torch.get_num_threads()
    kw = dict(chunk_rows=8, batch_size=5, progress=False, device="cpu")
    a = extract(pre, ref, cache=tmp_path / "a", **kw)
    b = extract(pre, ModelLoading(ref, "cpu"), cache=tmp_path / "b", **kw)
    assert a.status == b.status == "written" and torch.get_num_threads() == threads  # count restored
    assert _store_tree(tmp_path / "a") == _store_tree(tmp_path / "b")

    def broken(cls, *a, **k):
        raise TprobeError("model folder is broken")

    monkeypatch.setattr(Backbone, "from_pretrained", classmethod(broken))
    # up to date: the load is never waited for, its failure never raised
    assert extract(pre, ModelLoading(ref, "cpu"), cache=tmp_path / "b", **kw).status == "up to date"
    with pytest.raises(TprobeError, match="model folder is broken"):  # needed: its error, in this thread
        extract(pre, ModelLoading(ref, "cpu"), cache=tmp_path / "c", **kw)
