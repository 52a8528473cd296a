import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import save_png

from tprobe._version import __version__
from tprobe.cli import main

COMMANDS = [
    "preprocess",
    "models",
    "extract",
    "probe",
    "predict",
    "finetune",
    "saliency",
    "baseline",
    "report",
    "export",
    "status",
    "curve",
    "map",
]


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert all(c in r.output for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0
    assert command == "models" or "tprobe " + command in r.output


def test_preprocess_on_the_bundled_sample(tmp_path):
    r = CliRunner().invoke(main, ["preprocess", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(tmp_path / "manifest.parquet")
    assert "total                852" in r.output
    for name in ("manifest.parquet", "contact_sheet.png", "counts.csv", "preprocess.json"):
        assert (tmp_path / name).exists()


def test_bad_input_is_reported_and_exit_status_says_so(small_data, tmp_path):
    (small_data / "donor_1" / "activated" / "CD3_1_act_9_9_9.png").write_bytes(b"garbage")
    save_png(
        small_data / "donor_1" / "quiescent" / "rgb.png",
        np.dstack([np.eye(9, dtype=np.uint8) * 200, np.zeros((9, 9), np.uint8), np.zeros((9, 9), np.uint8)]),
    )
    r = CliRunner().invoke(main, ["preprocess", "--data", str(small_data), "--out", str(tmp_path / "o")])
    assert r.exit_code == 3
    assert "skipped: " in r.output and "CD3_1_act_9_9_9.png: cannot be read" in r.output
    assert "rgb.png: RGB colour image" in r.output and "Traceback" not in r.output
    assert (tmp_path / "o" / "manifest.parquet").exists()


def test_errors_are_one_line_with_status_2(tmp_path):
    r = CliRunner().invoke(main, ["preprocess", "--data", str(tmp_path / "missing")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: ")
    r = CliRunner().invoke(main, ["extract", "--model", "dinov2-huge"])
    assert r.exit_code == 2 and "aliases: dinov2-small" in r.output
    r = CliRunner().invoke(main, ["probe", "--head", "svm"])
    assert r.exit_code == 2 and "logreg, mlp, xgboost" in r.output


def test_extract_cli_prints_the_store_path_last_and_is_idempotent(small_data, tmp_path, tiny_plain):
    args = ["extract", "--model", str(tiny_plain), "--data", str(small_data), "--cache", str(tmp_path)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    path = first.output.strip().splitlines()[-1]
    assert re.search(r"/float16-fp32-[0-9a-f]{8}\.zarr$", path) and path.startswith(str(tmp_path))
    again = CliRunner().invoke(main, args)
    assert "up to date" in again.output and again.output.strip().splitlines()[-1] == path


def test_store_from_other_data_is_refused(small_data, tmp_path, tiny_plain):
    r = CliRunner().invoke(
        main, ["extract", "--model", str(tiny_plain), "--data", str(small_data), "--cache", str(tmp_path)]
    )
    store = r.output.strip().splitlines()[-1]
    r = CliRunner().invoke(main, ["probe", "--store", store, "--views", "orig", "--data", str(small_data)])
    assert r.exit_code == 2 and "another dataset or preprocessing" in r.output


LIGHT = """
import sys
from tprobe.cli import main
try:
    main(sys.argv[1:], prog_name="tprobe")
except SystemExit as exc:
    code = exc.code
print("HEAVY", sorted(m for m in ("torch", "transformers", "skimage") if m in sys.modules), code)
"""


def test_help_status_report_and_export_never_import_torch_or_transformers(tmp_path, small_data, tiny_reg):
    import subprocess
    import sys

    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model

    store = extract(
        preprocess(discover(small_data)), resolve_model(str(tiny_reg)), cache=tmp_path, progress=False
    ).path
    for args in (
        ["--help"],
        ["status", str(store)],
        ["report", "--help"],
        ["export", str(store), "--to", "parquet", str(tmp_path / "out.parquet")],
    ):
        out = subprocess.run(
            [sys.executable, "-c", LIGHT, *args], capture_output=True, text=True, timeout=120
        ).stdout
        assert out.strip().splitlines()[-1] == "HEAVY [] 0", (args, out[-500:])


def test_help_builds_without_pandas_zarr_or_scikit_learn():
    """`tprobe --help` and each command's --help start in a fraction of a second: they import neither
    pandas (~0.2 s, it came with the data and export modules' top-level imports) nor zarr or scikit-learn."""
    import subprocess
    import sys

    code = LIGHT.replace(
        '("torch", "transformers", "skimage")', '("pandas", "zarr", "sklearn", "torch", "transformers")'
    )
    for args in (
        ["--help"],
        ["extract", "--help"],
        ["probe", "--help"],
        ["report", "--help"],
        ["export", "--help"],
    ):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == "HEAVY [] 0", (
            args,
            out.stdout[-500:],
            out.stderr[-500:],
        )


def test_status_imports_neither_pandas_nor_zarr(tmp_path, small_data, tiny_reg):
    """`tprobe status STORE` of a Zarr store reads its attributes, row ids and manifest without pandas
    (~0.3 s to import) or zarr (~0.2 s), and without torch or transformers (issue 20)."""
    import subprocess
    import sys

    from tprobe.cache.extract import extract
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import preprocess
    from tprobe.models.backbones import resolve_model

    store = extract(
        preprocess(discover(small_data)), resolve_model(str(tiny_reg)), cache=tmp_path, progress=False
    ).path
    code = LIGHT.replace(
        '("torch", "transformers", "skimage")', '("pandas", "zarr", "sklearn", "torch", "transformers")'
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "status", str(store)], capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "HEAVY [] 0", (out.stdout[-800:], out.stderr[-500:])
    checks = [line.split(None, 2)[2] for line in lines if line.startswith(("rows check", "chunks check"))]
    assert len(checks) == 2 and all(c.startswith("ok: ") for c in checks), out.stdout  # the checks still ran
