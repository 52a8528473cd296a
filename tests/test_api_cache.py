"""tprobe.api: preprocess (fields of view, the cache-keyed folder), extract, status and export, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import tprobe
from tprobe import api
from tprobe.cache import keys
from tprobe.cache.store import FeatureStore
from tprobe.cluster.slurm import with_options
from tprobe.cluster.workers import check_executor
from tprobe.data.dataset import DEFAULT_DATA
from tprobe.data.preprocess import Preprocessed
from tprobe.errors import TprobeError


def test_the_cache_names_resolve_at_the_top_level():
    for name in ("preprocess", "extract", "status", "export"):
        assert getattr(tprobe, name) is getattr(api, name) and name in api.__all__


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_reg):
    """One store of the tiny model on a few sample cells (orig views only), extracted through the API."""
    root = tmp_path_factory.mktemp("api_cache")
    data = root / "data"
    for donor in ("donor_1", "donor_2"):
        for cls in ("activated", "quiescent"):
            (data / donor / cls).mkdir(parents=True)
            for f in sorted((DEFAULT_DATA / donor / cls).glob("*.png"))[:3]:
                (data / donor / cls / f.name).write_bytes(f.read_bytes())
    res = api.extract(data, str(tiny_reg), cache=root / "cache", views="orig", progress=False)
    return root, data, res


def test_extract_writes_a_store_keyed_in_the_cache_then_is_up_to_date(extracted, tiny_reg):
    root, data, res = extracted
    kept = len(api.preprocess(data, views="orig", progress=False).kept)
    assert res.status == "written" and res.rows == res.images == kept > 0 and res.skipped == []
    assert res.model.source == str(tiny_reg) and res.executor == "local" and res.workers == 1
    store = FeatureStore.open(res.path)
    assert store.n == kept and set(store.shapes) == {"cls", "registers", "patches"}
    assert res.path.parent.parent.parent == root / "cache" / store.attrs["dataset_fingerprint"]
    again = api.extract(data, str(tiny_reg), cache=root / "cache", views="orig", progress=False)
    assert again.status == "up to date" and again.path == res.path and again.images == 0


def test_extract_takes_a_preprocessed_as_it_is_and_refuses_options_beside_it(extracted, tiny_reg):
    root, data, res = extracted
    pre = api.preprocess(data, views="orig", model=str(tiny_reg), progress=False)
    same = api.extract(pre, api.resolve_model(tiny_reg), cache=root / "cache", progress=False)
    assert same.status == "up to date" and same.path == res.path
    with pytest.raises(TprobeError, match="preprocessed already"):
        api.extract(pre, str(tiny_reg), cache=root / "cache", views="six")


def test_extract_of_only_cls_tokens_names_its_own_store(extracted, tiny_reg):
    root, data, res = extracted
    cls = api.extract(data, str(tiny_reg), cache=root / "cache", views="orig", tokens="cls", progress=False)
    assert cls.path != res.path and cls.path.parent == res.path.parent and "-cls" in cls.path.name
    assert set(FeatureStore.open(cls.path).shapes) == {"cls"}


def test_status_and_export_of_the_store(extracted, tmp_path):
    _, _, res = extracted
    st = api.status(res.path, shards=2)
    assert st.state == "complete" and st.ok and st.units_done == st.units and len(st.shards) == 2
    assert st.rows == res.rows and st.row_check.startswith("ok")
    out = api.export(res.path, "parquet", tmp_path / "cells.parquet")
    df = pd.read_parquet(out)
    assert out == tmp_path / "cells.parquet" and len(df) == res.rows and "X_cls" in df.columns
    assert np.allclose(np.stack(df["X_cls"]), FeatureStore.open(res.path).pooled("cls"))
    with pytest.raises(TprobeError, match="overwrite|exists"):
        api.export(res.path, "parquet", out)
    with pytest.raises(TprobeError, match="no such store|not a feature store|does not exist"):
        api.status(tmp_path / "nope.zarr")


def test_a_partial_store_reports_its_pending_units_per_shard(tmp_path, small_data, tiny_reg):
    res = api.extract(small_data, str(tiny_reg), cache=tmp_path, views="orig", chunk_rows=4, shard=(0, 2))
    assert res.status == "partial (shard)" and keys.progress_dir(res.path).exists()
    assert not keys.is_sealed(res.path)
    st = api.status(res.path, shards=2)
    assert st.state == "incomplete" and [s.pending for s in st.shards] == [0, st.shards[1].units]
    rest = api.extract(small_data, str(tiny_reg), cache=tmp_path, views="orig", chunk_rows=4, shard=(1, 2))
    assert rest.status == "written" and rest.path == res.path and keys.is_sealed(res.path)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"executor": "slurm"}, "needs --shards N"),
        ({"executor": "slurm", "shards": 2, "shard": (0, 2)}, "give --shards N instead"),
        ({"shards": 2}, "--shards N is for --executor slurm"),
        ({"workers": 2, "shard": (1, 2)}, "leave out --shard"),
        ({"workers": 2, "devices": "0,x"}, "give GPU indices"),
        ({"devices": "0,1"}, "with --workers N"),
        ({"executor": "ssh"}, "not one of local, slurm"),
    ],
)
def test_executor_options_that_do_not_go_together_are_refused_before_any_work(kw, message):
    with pytest.raises(TprobeError, match=message):
        api.extract(None, "no-such-model-is-resolved", **kw)


def test_workers_and_slurm_from_python_need_the_task_arguments():
    with pytest.raises(TprobeError, match="task_args"):
        api.extract(None, "no-such-model-is-resolved", workers=2)
    assert check_executor(workers=2, devices="0, 1") == ["0", "1"]


@pytest.mark.refuses(
    "an extract argument the worker processes or array tasks would not see (absent from, or other than, task_args)"
)
@pytest.mark.parametrize(
    "kw",
    [{"batch_size": 7}, {"compression": "zstd"}, {"compile": True}, {"dtype": "float32"}, {"chunk_rows": 8}],
)
def test_arguments_the_worker_processes_would_not_see_are_refused(kw):
    # review: extract(workers=2, batch_size=7, ...) ran the workers on task_args alone, silently
    # dropping the argument, and waited for a store the workers never wrote
    with pytest.raises(TprobeError, match="is not what task_args give the worker processes"):
        api.extract(None, "no-such-model-is-resolved", workers=2, task_args=["--model", "m"], **kw)
    with pytest.raises(TprobeError, match="is not what task_args give"):  # given there, with another value
        api.extract(None, "m", workers=2, task_args=["--model", "m", "--dtype", "float32"])


def test_task_arguments_are_set_in_place_appended_or_removed():
    args = ["--model", "m", "--canvas", "140", "--compile", "--workers", "4", "--devices", "0,1"]
    out = with_options(args, {"--canvas": "154", "--workers": "1", "--devices": None, "--precision": "fp32"})
    assert out == ["--model", "m", "--canvas", "154", "--compile", "--workers", "1", "--precision", "fp32"]
    assert args[3] == "140"  # the caller's list is left as it is


def test_preprocess_saves_in_the_cache_keyed_folder(tmp_path, small_data):
    pre = api.preprocess(small_data, views="orig", cache=tmp_path / "cache", progress=False)
    assert pre.folder == keys.prep_dir(tmp_path / "cache", pre)
    assert pre.folder == tmp_path / "cache" / pre.fingerprint / pre.config.hash
    assert Preprocessed.load(pre.folder).fingerprint == pre.fingerprint
    assert not (pre.folder / "contact_sheet.png").exists()
    mem = api.preprocess(small_data, views="orig", progress=False)
    assert mem.folder is None and mem.fingerprint == pre.fingerprint  # no out, no cache: nothing written


def _fields(root: Path) -> tuple[Path, Path]:
    """Two sample cells side by side on one zero field per donor x class, and its label image."""
    fields, masks = root / "fields", root / "masks"
    for donor in ("donor_1", "donor_2"):
        for cls in ("activated", "quiescent"):
            cells = [
                np.asarray(Image.open(f)) for f in sorted((DEFAULT_DATA / donor / cls).glob("*.png"))[:2]
            ]
            h, w = max(c.shape[0] for c in cells) + 8, sum(c.shape[1] for c in cells) + 12
            field, label, x = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint16), 4
            for i, c in enumerate(cells):
                field[4 : 4 + c.shape[0], x : x + c.shape[1]] = c
                label[4 : 4 + c.shape[0], x : x + c.shape[1]] = i + 1
                x += c.shape[1] + 4
            for d in (fields, masks):
                (d / donor / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(field).save(fields / donor / cls / "field0.png")
            tifffile.imwrite(masks / donor / cls / "field0_masks.tif", label)
    return fields, masks


def test_preprocess_of_fields_crops_into_a_folder_keyed_by_the_fields_and_options(tmp_path, monkeypatch):
    fields, masks = _fields(tmp_path)
    empty = masks / "donor_2" / "quiescent" / "field0_masks.tif"
    tifffile.imwrite(empty, np.zeros_like(tifffile.imread(empty)))
    pre = api.preprocess(fov=fields, masks=masks, cache=tmp_path / "c", margin=2, progress=False)
    assert pre.config.fov and pre.config.margin == 2
    assert pre.folder.parent == tmp_path / "c" / "fov" and len(pre.folder.name) == 12
    assert any("label image has no objects" in w for w in pre.warnings)
    kept = Preprocessed.load(pre.folder).kept
    assert len(kept) == len(pre.kept) > 0 and set(kept["donor"]) == {"donor_1", "donor_2"}
    assert all(Path(p).is_relative_to(pre.folder / "crops") for p in kept["path"])
    other = api.preprocess(fov=fields, masks=masks, cache=tmp_path / "c", margin=3, progress=False)
    assert other.folder != pre.folder and other.folder.parent == pre.folder.parent
    monkeypatch.chdir(tmp_path)  # no cache and no out: the default cache folder
    here = api.preprocess(fov=fields, masks=masks, margin=2, progress=False, contact_sheet=True)
    assert (
        here.folder == Path("cache") / "fov" / pre.folder.name
        and (here.folder / "contact_sheet.png").exists()
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"masks": "m"}, "apply to fields of view: add --fov FIELDS"),
        ({"margin": 2}, "apply to fields of view"),
        ({"outside": "keep"}, "apply to fields of view"),
        ({"fov": "f", "data": "d"}, "give one"),
    ],
)
def test_preprocess_refuses_crop_options_without_fields_and_two_inputs(kw, message):
    with pytest.raises(TprobeError, match=message):
        api.preprocess(**kw)


def test_the_cache_keys_and_status_and_export_load_no_torch():
    code = (
        "import sys; import tprobe.cache.keys, tprobe.cache.files, tprobe.cache.status, tprobe.cache.export, "
        "tprobe.cluster.workers, tprobe.cli.cache, tprobe.cli.data; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-500:]


FAKE_SBATCH = """#!/bin/bash
# sbatch --parsable --array=I,J[%K] SCRIPT: runs each array task here, one after the other, then prints the job id
spec=${2#--array=}; spec=${spec%%%*}
for i in ${spec//,/ }; do SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_JOB_ID=42 bash "$3" > "$(dirname "$3")/task_$i.out" 2>&1; done
echo 42
"""


def test_the_slurm_executor_runs_the_same_command_per_shard_and_builds_the_local_store(
    tmp_path, small_data, tiny_reg, monkeypatch
):
    from click.testing import CliRunner

    from tprobe.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "squeue").write_text("#!/bin/bash\n")  # nothing queued: every task has ended
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = ["extract", "--model", str(tiny_reg), "--data", str(small_data), "--views", "orig"]
    args += ["--chunk-rows", "4", "--cache", str(tmp_path / "c")]
    slurm = ["--executor", "slurm", "--shards", "2", "--poll", "0.1", "--slurm-dir", str(tmp_path / "s")]
    r = CliRunner().invoke(main, [*args, *slurm])
    assert r.exit_code == 0, r.output
    path = Path(r.output.strip().splitlines()[-1])
    assert "written by SLURM array tasks (42)" in r.output and keys.is_sealed(path)
    script = next((tmp_path / "s").glob("*.sbatch")).read_text()
    assert "--precision fp32" in script and "--canvas 140" in script and "--executor" not in script
    assert "--shards" not in script and script.count("--shard ") == 1
    local = api.extract(small_data, str(tiny_reg), cache=tmp_path / "c", views="orig", chunk_rows=4)
    assert local.status == "up to date" and local.path == path
    again = CliRunner().invoke(main, [*args, *slurm])
    assert again.exit_code == 0 and "nothing submitted" in again.output


@pytest.mark.refuses("preprocessing options beside data that is preprocessed already (every API call)")
def test_preprocessing_options_beside_a_preprocessed_are_refused_not_ignored(small_data):
    # review: tprobe.preprocess(pre, canvas=224) returned pre unchanged, the options silently dropped
    pre = api.preprocess(small_data, views="orig", progress=False)
    assert api.preprocess(pre, progress=False) is pre
    with pytest.raises(TprobeError, match="preprocessed already"):
        api.preprocess(pre, canvas=224, progress=False)
