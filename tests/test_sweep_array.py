"""`tprobe probe --executor slurm`: the sweep as one array task per (pool, head), without a cluster.

A stand-in `sbatch` on PATH runs the real sbatch script with bash once per array index (with
SLURM_ARRAY_TASK_ID set, output to the script's own log path) and an empty `squeue`; so every task runs
the command the scheduler would run. The real-scheduler test is in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import copy_subset

from tprobe.cli import main
from tprobe.cluster.slurm import SlurmOptions, render_commands, sweep_array, sweep_commands, sweep_job_name
from tprobe.errors import TprobeError
from tprobe.probing.sweep import SweepPlan, collect_sweep, missing_tasks, plan_sweep, run_sweep, store_sources

ROOT = Path(__file__).resolve().parents[1]
EVIL = "gpu\ntouch /tmp/pwned"
FAKE_SBATCH = r"""#!{python}
import os, re, shlex, subprocess, sys
args = sys.argv[1:]
array = next(a for a in args if a.startswith("--array="))[len("--array="):]
script = args[-1]
text = open(script).read()
def directive(key):
    return shlex.split(re.search(rf"^#SBATCH --{{key}}=(.*)$", text, re.M).group(1))[0]
counter = os.environ["FAKE_SBATCH_LOG"] + ".job"
job = str(int(open(counter).read()) + 1) if os.path.exists(counter) else "100"
open(counter, "w").write(job)
with open(os.environ["FAKE_SBATCH_LOG"], "a") as f:
    f.write(array + "\n")
skip = {{s for s in os.environ.get("FAKE_SBATCH_SKIP", "").split(",") if s}}
for i in array.split("%")[0].split(","):
    if i in skip:  # as if the task were cancelled before it wrote anything
        continue
    log = directive("output").replace("%x", directive("job-name")).replace("%A", job).replace("%a", i)
    with open(log, "w") as fh:
        subprocess.run(["bash", script], cwd=directive("chdir"), stdout=fh, stderr=subprocess.STDOUT,
                       env={{**os.environ, "SLURM_ARRAY_TASK_ID": i, "SLURM_ARRAY_JOB_ID": job}})
print(job)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_reg) -> Path:
    """A tiny store: 3 donors x 4 cells per class x 6 views through a tiny random DINOv2-with-registers."""
    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model

    tmp = tmp_path_factory.mktemp("sweep-store")
    data = copy_subset(tmp / "data", donors=("donor_1", "donor_2", "donor_3"), per_class=4)
    return extract(
        preprocess(discover(data)), resolve_model(str(tiny_reg)), cache=tmp / "cache", progress=False
    ).path


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A stand-in sbatch/squeue first on PATH; returns the file where sbatch logs each --array it got."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")  # nothing queued: every task has ended
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(tmp_path / "sbatch.log"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "sbatch.log"


COMMON = ["--bootstrap", "20", "--no-final-head"]
KEY = ["features", "pool", "head"]


def _comparable(summary: pd.DataFrame) -> pd.DataFrame:
    """Everything but each run's folder name (time-stamped) and its wall time."""
    return summary.drop(columns=["run", "seconds"]).reset_index(drop=True)


def _last_dir(output: str) -> Path:
    return Path(output.strip().splitlines()[-1])


def test_the_sweep_script_has_one_task_per_pool_and_head(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = plan_sweep(
        store,
        ["cls", "mean", "registers"],
        ["logreg", "knn"],
        out=tmp_path / "runs",
        probe_kwargs={"n_boot": 20},
    )
    plan = SweepPlan.load(sweep)
    assert plan.tasks == [(p, h) for p in ("cls", "mean", "registers") for h in ("logreg", "knn")]
    opts = SlurmOptions(partition="cpu", time="0:30:00", mem="4G", slurm_dir=tmp_path / "slurm logs")
    text = render_commands(sweep_commands(sweep, len(plan.tasks)), name=sweep_job_name(sweep), options=opts)
    cases = [ln.strip() for ln in text.splitlines() if ln.strip()[:2].rstrip(")").isdigit()]
    assert len(cases) == 6  # heads x pools
    for i, line in enumerate(cases):
        assert line.startswith(f"{i}) ") and line.endswith(f"--resume {sweep} --sweep-task {i} ;;"), line
    assert (
        "#SBATCH --partition=cpu" in text and "#SBATCH --time=0:30:00" in text and "#SBATCH --mem=4G" in text
    )
    assert f"#SBATCH --output='{tmp_path}/slurm logs/" in text  # a path with a space is quoted
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    with pytest.raises(TprobeError, match="--partition"):
        SlurmOptions(partition=EVIL)


def test_a_pool_the_store_cannot_give_is_planned_as_skipped(tmp_path, tiny_plain):
    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model

    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2"), per_class=1)
    path = extract(
        preprocess(discover(data)), resolve_model(str(tiny_plain)), cache=tmp_path / "c", progress=False
    ).path
    plan = SweepPlan.load(plan_sweep(path, ["cls", "registers"], ["logreg"], out=tmp_path / "runs"))
    assert plan.tasks == [("cls", "logreg")] and "registers" in plan.skipped["registers"]
    with pytest.raises(TprobeError, match="gives none of the pools"):
        plan_sweep(path, ["registers"], ["logreg"], out=tmp_path / "runs")


@pytest.mark.refuses("a probe --executor slurm value that cannot go into an sbatch script")
@pytest.mark.parametrize("option", ["--out", "--partition"])
def test_cli_refuses_an_injected_sweep_value_before_any_work(tmp_path, store, monkeypatch, option):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scheduler: the refusal comes first
    value = str(tmp_path / EVIL) if option == "--out" else EVIL
    res = CliRunner().invoke(main, ["probe", "--store", str(store), "--executor", "slurm", option, value])
    assert res.exit_code == 2, res.output
    assert option in res.output and "control character" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / EVIL).exists()


@pytest.mark.refuses("probe --executor slurm with a --features table")
def test_cli_refuses_a_feature_table_sweep_on_slurm(tmp_path):
    (tmp_path / "t.csv").write_text("FileName,a\nx.png,1\n")
    res = CliRunner().invoke(main, ["probe", "--features", str(tmp_path / "t.csv"), "--executor", "slurm"])
    assert res.exit_code == 2 and "without --executor slurm" in res.output


def test_array_sweep_equals_the_one_process_sweep_and_reruns_only_missing_runs(tmp_path, store, fake_slurm):
    args = ["probe", "--store", str(store), "--head", "logreg", "--pool", "all", *COMMON]
    local = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    ref = pd.read_parquet(_last_dir(local.output) / "summary.parquet")
    assert len(ref) == 5  # the store has registers: every pool

    # 1) the array; task 2 is lost (cancelled before it ran): the watcher names it and fails
    slurm = ["--executor", "slurm", "--poll", "0.1", "--slurm-dir", str(tmp_path / "slurm")]
    os.environ["FAKE_SBATCH_SKIP"] = "2"
    try:
        first = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "array"), *slurm])
    finally:
        del os.environ["FAKE_SBATCH_SKIP"]
    assert first.exit_code == 2, first.output
    assert "sweep task(s) 2 (registers · logreg)" in first.output and "resubmits only those" in first.output
    (sweep,) = (tmp_path / "array").iterdir()
    assert missing_tasks(sweep) == [2]
    with pytest.raises(TprobeError, match=r"task\(s\) 2 \(registers · logreg\) not done"):
        collect_sweep(sweep)

    # 2) --resume resubmits only task 2, then collects: the summary equals the one-process sweep's
    again = CliRunner().invoke(main, ["probe", "--resume", str(sweep), *slurm])
    assert again.exit_code == 0, again.output
    assert fake_slurm.read_text().split() == ["0,1,2,3,4", "2"]
    assert _last_dir(again.output) == sweep and "RANDOM WEIGHTS" in again.output  # a random tiny model
    got = pd.read_parquet(sweep / "summary.parquet")
    pd.testing.assert_frame_equal(_comparable(got), _comparable(ref))
    assert [r["roc_auc_mean"] for r in json.loads((sweep / "summary.json").read_text())] == list(
        got["roc_auc_mean"]
    )
    assert (sweep / "sweep_auc.png").exists()
    assert sorted(
        p.name for p in sweep.iterdir() if p.is_dir() and (p / "per_donor.parquet").exists()
    ) == sorted(got["run"])

    # 3) a finished sweep: --resume submits nothing and collects the same summary
    done = CliRunner().invoke(main, ["probe", "--resume", str(sweep), *slurm])
    assert done.exit_code == 0 and "submitted" not in done.output, done.output
    assert fake_slurm.read_text().split() == ["0,1,2,3,4", "2"]
    pd.testing.assert_frame_equal(pd.read_parquet(sweep / "summary.parquet"), got)


def test_resume_without_slurm_runs_the_missing_tasks_here(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = {"n_boot": 20, "final_head": False}
    sweep = plan_sweep(store, ["cls", "mean"], ["logreg", "knn"], out=tmp_path / "runs", probe_kwargs=kw)
    res = CliRunner().invoke(main, ["probe", "--resume", str(sweep), "--sweep-task", "3"])  # one array task
    assert res.exit_code == 0, res.output
    assert missing_tasks(sweep) == [0, 1, 2]
    res = CliRunner().invoke(main, ["probe", "--resume", str(sweep)])
    assert res.exit_code == 0, res.output
    assert missing_tasks(sweep) == [] and _last_dir(res.output) == sweep
    got = collect_sweep(sweep).summary
    ref = run_sweep(
        store_sources(store, ["cls", "mean"]), ["logreg", "knn"], out=tmp_path / "one", probe_kwargs=kw
    ).summary
    pd.testing.assert_frame_equal(_comparable(got), _comparable(ref))
    assert list(got[KEY[1:]].itertuples(index=False, name=None)) == SweepPlan.load(sweep).tasks


@pytest.mark.refuses("--resume with the sweep's own settings given again")
def test_resume_refuses_settings_the_plan_fixes(tmp_path, store):
    sweep = plan_sweep(store, ["cls"], ["logreg"], out=tmp_path / "runs")
    res = CliRunner().invoke(main, ["probe", "--resume", str(sweep), "--head", "knn"])
    assert res.exit_code == 2 and "leave out --head" in res.output, res.output
    res = CliRunner().invoke(main, ["probe", "--resume", str(tmp_path), "--sweep-task", "0"])
    assert res.exit_code == 2 and "no sweep plan here" in res.output, res.output
    res = CliRunner().invoke(main, ["probe", "--resume", str(sweep), "--sweep-task", "5"])
    assert res.exit_code == 2 and "has tasks 0..0" in res.output, res.output


def test_a_failing_task_is_named_with_its_log_line_and_leaves_no_record(tmp_path, store, fake_slurm):
    sweep = plan_sweep(store, ["cls", "mean"], ["knn"], out=tmp_path / "runs", probe_kwargs={"n_boot": 20})
    plan = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**plan, "store": str(tmp_path / "gone.zarr")}))
    lines: list[str] = []
    with pytest.raises(
        TprobeError, match=r"sweep task\(s\) 0 \(cls · knn\), 1 \(mean · knn\) ended without a run"
    ) as e:
        sweep_array(sweep, options=SlurmOptions(slurm_dir=tmp_path / "slurm"), poll=0.1, echo=lines.append)
    assert "ends: " in str(e.value) and "gone.zarr" in str(e.value).split("ends: ")[1]  # the task's own error
    assert lines[-1] == "running - | queued - | done - | failed 0,1", lines
    assert missing_tasks(sweep) == [0, 1] and not (sweep / "tasks").exists()


def test_a_task_run_twice_at_once_is_reported_once(tmp_path, store, caplog):
    """A SLURM requeue and a local --resume both ran task 0 (neither saw the other's record): two complete
    run folders of one pool x head, and `report` listed both. It takes the one the task's record names
    and says it left the other out; the collected summary has one row per task."""
    from tprobe.probing.sweep import resume_sweep
    from tprobe.runs.report import collect_runs

    kw = {"n_boot": 20, "final_head": False}
    sweep = plan_sweep(store, ["cls"], ["logreg", "knn"], out=tmp_path / "runs", probe_kwargs=kw)
    pool, head = SweepPlan.load(sweep).tasks[0]
    twin = run_sweep(store_sources(store, [pool]), [head], out=sweep, probe_kwargs=kw).runs[0]  # no record
    res = resume_sweep(sweep)
    assert len(res.summary) == 2 and twin not in res.runs
    with caplog.at_level("WARNING", logger="tprobe.runs.report"):
        runs = collect_runs(tmp_path / "runs")
    assert sorted(runs["run"]) == sorted(map(str, res.runs))
    assert f"{twin}: a second run of sweep task {pool} · {head}" in caplog.text
