"""sbatch scripts hold every value on its own line: no injection through options, paths or the working folder.

These build the script text without a scheduler (issue 18, item 7); the real SLURM tests are in test_slurm.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tprobe.cli import main
from tprobe.cluster.slurm import SlurmOptions, command_array, extract_array, render_script
from tprobe.errors import TprobeError

EVIL = "gpu\ntouch /tmp/pwned"
COMMAND = [sys.executable, "-m", "tprobe.cli", "extract", "--model", "m"]


def _script(tmp_path, store=None, **kw) -> str:
    options = SlurmOptions(slurm_dir=kw.pop("slurm_dir", tmp_path / "slurm"), **kw)
    store = store or tmp_path / "c" / "s.zarr"
    return render_script(COMMAND, store, 2, options, Path(options.slurm_dir).absolute() / "x.sbatch")


def _lines_run_by_bash(text: str) -> list[str]:
    """The script's lines that are neither comments nor blank (what bash would execute)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_a_clean_script_runs_only_the_expected_lines(tmp_path):
    text = _script(tmp_path, partition="gpu", time="2:00:00", mem="32G", account="lab-1")
    assert _lines_run_by_bash(text)[0] == "set -euo pipefail" and len(_lines_run_by_bash(text)) == 3
    assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=2:00:00" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.refuses("a SLURM resource value with a line break or extra words")
@pytest.mark.parametrize("option", ["partition", "time", "mem", "account"])
@pytest.mark.parametrize("value", [EVIL, "gpu\rtouch x", "gpu\x00", "gpu --wrap=id", "gpu'; id #"])
def test_a_resource_value_with_a_line_break_or_extra_words_is_refused(tmp_path, option, value):
    with pytest.raises(TprobeError, match=f"--{option}"):
        _script(tmp_path, **{option: value})


@pytest.mark.refuses("an --sbatch-option with a control character")
def test_an_sbatch_option_with_a_line_break_is_refused(tmp_path):
    with pytest.raises(TprobeError, match="--sbatch-option"):
        _script(tmp_path, extra=("--qos=high\rid",))


@pytest.mark.refuses("a --slurm-dir with a line break")
def test_a_slurm_dir_with_a_line_break_is_refused(tmp_path):
    with pytest.raises(TprobeError, match="--slurm-dir.*control character"):
        _script(tmp_path, slurm_dir=tmp_path / "s\ntouch pwned")


@pytest.mark.refuses("a --cache path with a line break (in an sbatch script)")
def test_a_store_path_from_a_cache_with_a_line_break_is_refused(tmp_path):
    with pytest.raises(TprobeError, match="--cache"):
        _script(tmp_path, store=tmp_path / "c\ntouch pwned" / "s.zarr")
    with pytest.raises(TprobeError, match="--cache"):  # before any scheduler command is run
        extract_array(COMMAND[4:], tmp_path / "c\ntouch pwned" / "s.zarr", rows=4, chunk_rows=2, shards=2)


@pytest.mark.refuses("a working directory with a line break (in an sbatch script)")
def test_a_working_directory_with_a_line_break_is_refused(tmp_path, monkeypatch):
    cwd = tmp_path / "w\ntouch pwned"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(TprobeError, match="working directory"):
        _script(tmp_path)
    with pytest.raises(TprobeError, match="working directory"):
        command_array([["true"]], name="tprobe-test", options=SlurmOptions(slurm_dir=tmp_path / "s"))


def test_paths_with_spaces_are_quoted(tmp_path, monkeypatch):
    cwd = tmp_path / "my work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    text = _script(tmp_path, slurm_dir=tmp_path / "slurm logs")
    assert f"#SBATCH --chdir='{cwd}'" in text and f"#SBATCH --output='{tmp_path}/slurm logs/" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize("option", ["--partition", "--time", "--mem", "--account", "--slurm-dir", "--cache"])
def test_cli_refuses_an_injected_value_in_one_line_before_any_work(tmp_path, monkeypatch, option):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scheduler: the refusal comes first
    value = str(tmp_path / EVIL) if option in ("--slurm-dir", "--cache") else EVIL
    args = {"--cache": str(tmp_path / "c"), option: value}
    res = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            "x",
            "--executor",
            "slurm",
            "--shards",
            "2",
            *[a for kv in args.items() for a in kv],
        ],
    )
    assert res.exit_code == 2, res.output
    assert option in res.output and "control character" in res.output
    assert len(res.output.strip().splitlines()) == 1
