"""scripts/check_docs.py: the docs' numbers are rerun and compared, and a drifted number fails."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cd():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = mod  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("check_docs", None)


def write_doc(root: Path, text: str) -> Path:
    (root / "docs").mkdir(parents=True, exist_ok=True)
    path = root / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_planted_mismatch_in_a_copy_of_the_readme_fails_naming_the_line(cd, tmp_path, capsys):
    """The README tour's counts are recomputed by `tprobe preprocess`; a drifted count fails, with its line."""
    root = tmp_path / "copy"
    root.mkdir()
    readme = root / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    lines = readme.read_text(encoding="utf-8").splitlines()
    i = next(n for n, line in enumerate(lines) if "images -> 659 cells" in line)
    lines[i] = lines[i].replace("659 cells", "658 cells")
    readme.write_text("\n".join(lines) + "\n", encoding="utf-8")

    rc = cd.main(
        ["--root", str(root), "--only", "tour-preprocess", "--workdir", str(tmp_path / "work"), "-q"]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert f"README.md:{i + 1}: doc says 658, `tour-preprocess` recomputed 659" in out
    # the other numbers of the same block (852 images, 6 views) still matched: only one mismatch line
    assert out.count("MISMATCH") == 1


def test_unmarked_number_block_fails_and_code_blocks_do_not(cd, tmp_path, capsys):
    """A table or output block with a decimal number needs a marker; bash/python blocks and prose do not."""
    write_doc(
        tmp_path,
        "# t\n\nSome prose with 0.93 in it.\n\n```bash\ntprobe curve --lr 0.001\n```\n\n"
        "| a | b |\n|---|---|\n| x | 0.912 |\n",
    )
    assert cd.main(["--root", str(tmp_path), "--list"]) == 1  # the cheap CI gate: nothing is run
    capsys.readouterr()
    rc = cd.main(["--root", str(tmp_path), "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "UNMARKED  README.md:9: a number block without a <!-- check: ... --> marker" in out
    assert "README.md:5" not in out and "README.md:3" not in out


def test_skip_marker_is_listed_with_its_reason_not_ignored(cd, tmp_path, capsys):
    write_doc(
        tmp_path, "# t\n\n<!-- check: skip (timing, machine-dependent) -->\n\n```\nforward 2.6 s\n```\n"
    )
    assert cd.main(["--root", str(tmp_path), "--list"]) == 0
    assert "README.md:6" in capsys.readouterr().out
    assert cd.main(["--root", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "skipped   README.md:6" in out and "timing, machine-dependent" in out


def test_unknown_check_name_and_skip_without_reason_fail(cd, tmp_path, capsys):
    write_doc(tmp_path, "# t\n\n<!-- check: no-such-check -->\n| a |\n|---|\n| 0.5 |\n")
    assert cd.main(["--root", str(tmp_path), "-q"]) == 1
    assert "no check named 'no-such-check'" in capsys.readouterr().out
    write_doc(tmp_path, "# t\n\n<!-- check: skip -->\n| a |\n|---|\n| 0.5 |\n")
    assert cd.main(["--root", str(tmp_path), "--list"]) == 1
    assert "README.md:4" in capsys.readouterr().out


def test_a_registered_check_compares_at_the_printed_precision(cd, tmp_path, monkeypatch, capsys):
    """Exact at the doc's precision (0.934 holds 0.9336, not 0.9346); a stated tolerance widens it."""
    monkeypatch.setitem(
        cd.CHECKS, "const", cd.Check("constants", lambda w: [0.9336, -0.0513, 0.9346], fast=True)
    )
    write_doc(
        tmp_path,
        "# t\n\n<!-- check: const -->\n\n| run | x |\n|---|---|\n| a | 0.934 |\n| b | −0.051 |\n| c | 0.934 |\n",
    )
    assert cd.main(["--root", str(tmp_path), "-q", "--workdir", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    assert "README.md:9: doc says 0.934, `const` recomputed 0.9346" in out
    assert (
        "README.md:7" not in out.split("MISMATCH", 1)[1] and "README.md:8" not in out.split("MISMATCH", 1)[1]
    )

    monkeypatch.setitem(
        cd.CHECKS, "const", cd.Check("constants", lambda w: [0.9336, -0.0513, 0.9346], fast=True, tol=0.001)
    )
    assert cd.main(["--root", str(tmp_path), "-q", "--workdir", str(tmp_path / "w")]) == 0


def test_fast_leaves_the_full_checks_listed_as_not_run(cd, tmp_path, monkeypatch, capsys):
    def boom(w):
        raise AssertionError("a full check ran under --fast")

    monkeypatch.setitem(cd.CHECKS, "slow", cd.Check("slow", boom, fast=False))
    write_doc(tmp_path, "# t\n\n<!-- check: slow -->\n\n| a |\n|---|\n| 0.5 |\n")
    assert cd.main(["--root", str(tmp_path), "-q", "--fast"]) == 0
    assert "not run   README.md:5" in capsys.readouterr().out


def test_every_number_block_of_the_docs_is_marked(cd, capsys):
    """The project's own docs: no table or output block with numbers lacks a check or a skip reason."""
    assert cd.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "unmarked" not in out and "unknown" not in out
    assert "checked" in out and "skipped" in out
