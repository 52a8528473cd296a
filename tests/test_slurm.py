"""`tprobe extract --executor slurm` on a REAL scheduler (scripts/slurm_cluster.sh start), plus `tprobe status`.

The SLURM tests skip, with the reason shown, when the SLURM client is missing or no node answers;
`.ci/run` starts the local one-node cluster first, so CI runs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.cache.extract import manifest_path
from tprobe.cache.status import StoreStatus, store_status
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.cluster.slurm import job_name, queue_states

ROOT = Path(__file__).resolve().parents[1]


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client (sinfo/sbatch) not installed; run scripts/slurm_cluster.sh start"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    if proc.returncode or not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable SLURM node ({(proc.stderr.strip() or ' '.join(states))[:120]}); run scripts/slurm_cluster.sh start"
    return None


_PROBLEM = _cluster_problem()
needs_slurm = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def _tprobe(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tprobe.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _snapshot(path: Path) -> dict:
    """Every file under a store with its size, mtime and bytes: 'writes nothing' means this is unchanged."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in path.rglob("*")
        if p.is_file()
    }


def _task_pid(*words: str) -> int | None:
    """The pid of the array task's python process on this machine (the local one-node cluster)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "tprobe.cli" in argv and all(w in argv for w in words):
            return int(proc.name)
    return None


def _wait_queue_empty(name: str, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while queue_states(name).get(name):
        assert time.monotonic() < end, f"tasks of {name} still queued after {seconds} s"
        time.sleep(0.5)


@needs_slurm
def test_array_with_cancelled_task_resubmits_and_matches_single_process(tmp_path, tiny_reg):
    data = copy_subset(tmp_path / "data", per_class=3)
    opts = ["--model", tiny_reg, "--data", data, "--chunk-rows", 2, "--batch-size", 2]
    slurm = ["--executor", "slurm", "--shards", 3, "--poll", 0.3, "--slurm-dir", tmp_path / "slurm"]
    local = CliRunner().invoke(main, ["extract", *map(str, opts), "--cache", str(tmp_path / "ref")])
    assert local.exit_code == 0, local.output
    ref = Path(local.output.splitlines()[-1])

    # 1) three tasks; shard 2 is stopped once it has written a unit, then cancelled mid-run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "tprobe.cli",
        "extract",
        *map(str, opts),
        "--cache",
        str(tmp_path / "c"),
        *map(str, slurm),
    ]
    watcher = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    store = tmp_path / "c" / ref.relative_to(tmp_path / "ref")
    name = job_name(store, 3)
    progress = store.with_name(store.name + ".progress")
    end, pid = time.monotonic() + 180, None
    while True:  # a tiny model writes a unit every ~15 ms: stop the task process itself, not via slurmctld
        assert watcher.poll() is None, watcher.communicate()
        assert time.monotonic() < end, "shard 2 never wrote a unit"
        pid = pid or _task_pid(str(tmp_path / "c"), "2/3")
        if any(int(p.name[5:11]) % 3 == 2 for p in progress.glob("unit_*.done")):
            break
        time.sleep(0.002)
    job = queue_states(name)[name][2][0]
    if pid:
        os.kill(pid, signal.SIGSTOP)
    else:  # the node is another machine
        subprocess.run(["scancel", "--signal=STOP", "--full", f"{job}_2"], check=True)
    mid = store_status(store, shards=3)
    assert mid.state == "incomplete" and 0 < mid.shards[2].done < mid.shards[2].units, f"not mid-run: {mid}"
    subprocess.run(["scancel", f"{job}_2"], check=True)
    out, err = watcher.communicate(timeout=180)
    assert watcher.returncode == 2, err
    assert "shard(s) 2 ended with units still pending" in err and "rerun the same command" in err

    # status along the way: shards 0 and 1 finished, shard 2 has pending units, not sealed
    st = StoreStatus.from_dict(
        json.loads(_tprobe("status", store, "--shards", 3, "--json", cwd=tmp_path).stdout)
    )
    assert st.state == "incomplete" and st.units_pending > 0
    assert [s.pending for s in st.shards[:2]] == [0, 0] and st.shards[2].pending > 0

    # 2) the same command again resubmits only shard 2 and returns once the store is sealed
    again = _tprobe("extract", *opts, "--cache", tmp_path / "c", *slurm, cwd=tmp_path)
    assert "shards 2 of 3 (1 task)" in again.stderr, again.stderr
    assert again.stdout.splitlines()[-1] == str(store)
    st = store_status(store, shards=3)
    assert st.state == "complete" and st.units_done == st.units and not any(s.pending for s in st.shards)

    # bit-identical to the single-process extract: every array, its dtype, the attributes, the manifest
    a, b = FeatureStore.open(store), FeatureStore.open(ref)
    assert a.shapes == b.shapes and a.attrs == b.attrs
    for arr in b.shapes:
        x, y = a.read(arr), b.read(arr)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), arr
    assert manifest_path(store).read_bytes() == manifest_path(ref).read_bytes()
    assert st.row_check.startswith("ok")

    # 3) a rerun of the finished array submits nothing and writes nothing ...
    before = _snapshot(store)
    up = CliRunner().invoke(main, ["extract", *map(str, [*opts, "--cache", tmp_path / "c", *slurm])])
    assert up.exit_code == 0 and "nothing submitted" in up.output and "submitted array job" not in up.output
    earlier = {job, re.search(r"submitted array job (\d+)", again.stderr).group(1)}
    assert {j for j, _ in queue_states(name).get(name, {}).values()} <= earlier  # at most those still exiting
    # ... and neither does the finished array resubmitted by hand with sbatch (its tasks say up to date)
    script = tmp_path / "slurm" / f"{name}.sbatch"
    sub = subprocess.run(["sbatch", "--parsable", "--array=0-2", str(script)], capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    _wait_queue_empty(name)
    logs = sorted((tmp_path / "slurm").glob(f"{name}-{sub.stdout.strip()}_*.out"))
    assert len(logs) == 3 and all("up to date" in p.read_text() for p in logs), [p.read_text() for p in logs]
    assert _snapshot(store) == before


# ---- tprobe status on partial stores (no SLURM needed) -----------------------------------------
def _partial_store(tmp_path, units_written) -> FeatureStore:
    store = FeatureStore.create(
        tmp_path / "s.zarr",
        row_ids=[f"r{i}" for i in range(10)],
        hidden=4,
        registers=0,
        patches=3,
        chunk_rows=2,
        attrs={"model": "m", "dtype": "float16"},
    )
    for u in units_written:
        rows = store.unit_slice(u).stop - store.unit_slice(u).start
        store.write_unit(u, {"cls": np.ones((rows, 4)), "patches": np.ones((rows, 3, 4))})
    return store


def test_status_of_partial_store_per_shard(tmp_path):
    store = _partial_store(tmp_path, [0, 1, 3])  # 5 units; shards of 2: units 0,2,4 and 1,3
    st = store_status(store.path, shards=2)
    assert (st.state, st.units, st.units_done, st.units_pending) == ("incomplete", 5, 3, 2)
    assert [(s.units, s.done, s.pending) for s in st.shards] == [(3, 1, 2), (2, 2, 0)]
    assert {"model": "m", "dtype": "float16"}.items() <= st.attrs.items() and st.attrs["rows_hash"]
    assert "manifest" in st.row_check
    assert StoreStatus.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    text = "\n".join(st.lines())
    assert "3 done, 2 pending" in text
    assert any(ln.startswith("shard 1/2 ") and ln.endswith(" 2/2 units done (finished)") for ln in st.lines())


def test_status_seal_states_and_cli(tmp_path):
    store = _partial_store(tmp_path, range(5))
    assert store_status(store.path).state == "written, not sealed"  # any worker's next run seals it
    assert store.finalize()
    res = CliRunner().invoke(main, ["status", str(store.path), "--shards", "3", "--json"])
    assert res.exit_code == 2, res.output  # made without `tprobe extract`: no manifest, the rows unverified
    assert "NOT VERIFIED" in json.loads(res.output)["row_check"]
    import pandas as pd

    pd.DataFrame({"image_id": [f"r{i}" for i in range(10)]}).to_parquet(
        manifest_path(store.path), index=False
    )
    res = CliRunner().invoke(main, ["status", str(store.path), "--shards", "3", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert (
        d["state"] == "complete" and d["units_done"] == 5 and [s["pending"] for s in d["shards"]] == [0, 0, 0]
    )
    res = CliRunner().invoke(main, ["status", str(tmp_path / "nope.zarr")])
    assert res.exit_code == 2 and "no such store" in res.output


def test_slurm_executor_needs_shards_and_rejects_shard(tmp_path, small_data, tiny_reg):
    base = [
        "extract",
        "--model",
        str(tiny_reg),
        "--data",
        str(small_data),
        "--cache",
        str(tmp_path / "c"),
        "--executor",
        "slurm",
    ]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 2 and "needs --shards N" in res.output
    res = CliRunner().invoke(main, [*base, "--shards", "2", "--shard", "0/2"])
    assert res.exit_code == 2 and "give --shards N instead" in res.output


def test_slurm_executor_on_a_complete_store_submits_nothing(tmp_path, small_data, tiny_reg, monkeypatch):
    """Works without SLURM: a sealed store is "up to date" before any scheduler command is run."""
    base = ["extract", "--model", str(tiny_reg), "--data", str(small_data), "--cache", str(tmp_path / "c")]
    local = CliRunner().invoke(main, base)
    assert local.exit_code == 0, local.output
    store = Path(local.output.splitlines()[-1])
    before = _snapshot(store)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch/squeue reachable
    res = CliRunner().invoke(main, [*base, "--executor", "slurm", "--shards", "3"])
    assert res.exit_code == 0, res.output
    assert "nothing submitted" in res.output and res.output.splitlines()[-1] == str(store)
    assert _snapshot(store) == before


@needs_slurm
def test_command_array_resubmits_only_failed_tasks(tmp_path, monkeypatch):
    """The generic array (a probe sweep's runs): task i runs command i; a rerun submits only tasks not done."""
    from tprobe.cluster.slurm import SlurmOptions, command_array

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fail1").touch()  # task 1 fails while this flag exists
    code = "import pathlib,sys; i=sys.argv[1]; sys.exit(3) if i=='1' and pathlib.Path('fail1').exists() else pathlib.Path('out'+i).write_text(i)"  # noqa: E501
    commands = [[sys.executable, "-c", code, str(i)] for i in range(3)]
    opts = SlurmOptions(slurm_dir=tmp_path / "slurm")
    lines: list[str] = []
    states = command_array(commands, name="tprobe-test-cmds", options=opts, poll=0.3, echo=lines.append)
    assert states == {0: "done", 1: "failed", 2: "done"}, lines
    assert "tasks 0,1,2 of 3" in lines[0]
    (tmp_path / "fail1").unlink()
    lines.clear()
    done = lambda i: (tmp_path / f"out{i}").exists()  # noqa: E731
    states = command_array(
        commands, name="tprobe-test-cmds", options=opts, done=done, poll=0.3, echo=lines.append
    )
    assert states == {0: "done", 1: "done", 2: "done"} and "tasks 1 of 3" in lines[0], lines
    assert [(tmp_path / f"out{i}").read_text() for i in range(3)] == ["0", "1", "2"]
    lines.clear()
    assert (
        command_array(commands, name="tprobe-test-cmds", options=opts, done=done, echo=lines.append) == states
    )
    assert not any("submitted" in ln for ln in lines)


@needs_slurm
def test_probe_sweep_array_on_slurm_equals_the_local_sweep(tmp_path, tiny_reg):
    """A real array: one task per pool (x one head); a cancelled task is resubmitted alone by --resume."""
    import pandas as pd

    from tprobe.cluster.slurm import sweep_job_name

    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=3)
    ext = CliRunner().invoke(
        main, ["extract", "--model", str(tiny_reg), "--data", str(data), "--cache", str(tmp_path / "cache")]
    )
    assert ext.exit_code == 0, ext.output
    store = ext.output.splitlines()[-1]
    args = [
        "probe",
        "--store",
        store,
        "--head",
        "logreg",
        "--pool",
        "all",
        "--bootstrap",
        20,
        "--no-final-head",
    ]
    local = _tprobe(*args, "--out", tmp_path / "local", cwd=tmp_path)
    ref = pd.read_parquet(Path(local.stdout.splitlines()[-1]) / "summary.parquet")

    # 1) the array, one task at a time (--max-running 1); task 4 is cancelled while it waits
    slurm = ["--executor", "slurm", "--poll", 0.3, "--slurm-dir", tmp_path / "slurm", "--max-running", 1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "tprobe.cli",
        *map(str, args),
        "--out",
        str(tmp_path / "array"),
        *map(str, slurm),
    ]
    watcher = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    end = time.monotonic() + 120
    while not (sweeps := list((tmp_path / "array").glob("*-sweep"))) or not queue_states(
        sweep_job_name(sweeps[0])
    ).get(sweep_job_name(sweeps[0])):
        assert watcher.poll() is None, watcher.communicate()
        assert time.monotonic() < end, "the sweep array never appeared in the queue"
        time.sleep(0.1)
    sweep, name = sweeps[0], sweep_job_name(sweeps[0])
    job = queue_states(name)[name][4][0]
    subprocess.run(["scancel", f"{job}_4"], check=True)
    out, err = watcher.communicate(timeout=240)
    assert watcher.returncode == 2, err
    assert "sweep task(s) 4 (concat · logreg)" in err and "resubmits only those" in err, err

    # 2) --resume resubmits only task 4, watches it, collects: the summary equals the local one
    again = _tprobe("probe", "--resume", sweep, *slurm, cwd=tmp_path)
    assert "tasks 4 of 5" in again.stderr, again.stderr
    assert again.stdout.splitlines()[-1] == str(sweep)
    got = pd.read_parquet(sweep / "summary.parquet")
    pd.testing.assert_frame_equal(got.drop(columns=["run", "seconds"]), ref.drop(columns=["run", "seconds"]))
    assert (sweep / "sweep_auc.png").exists()
    # the report reads the array's run folders like any others
    rep = _tprobe("report", sweep, "--out", tmp_path / "report", cwd=tmp_path)
    assert "incomplete run" not in rep.stderr
