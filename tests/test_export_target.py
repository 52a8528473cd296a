"""`tprobe export` writes only where it is told, never over the store, its manifest or (unasked) a file (issue 18, 8)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tprobe.cache.extract import extract, manifest_path
from tprobe.cli import main
from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, preprocess
from tprobe.models.backbones import resolve_model


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_plain):
    from conftest import copy_subset

    root = tmp_path_factory.mktemp("export")
    data = copy_subset(root / "data", per_class=2)
    pre = preprocess(discover(data), PreprocessConfig(views="orig"), progress=False)
    ref = resolve_model(str(tiny_plain))
    return {
        fmt: extract(pre, ref, cache=root / "c", fmt=fmt, progress=False, device="cpu").path
        for fmt in ("zarr", "hdf5")
    }


def _export(store, out, *extra):
    return CliRunner().invoke(main, ["export", str(store), "--to", "anndata", str(out), *extra])


def _snapshot(path):
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def _one_line(r):
    return r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "unexpected" not in r.output


@pytest.mark.refuses("an export target that is the store or its manifest")
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_export_never_writes_over_the_store_or_its_manifest(stores, tmp_path, fmt):
    store = stores[fmt]
    before, manifest = _snapshot(store), manifest_path(store).read_bytes()
    link = tmp_path / "link.h5ad"
    link.symlink_to(store)
    for target in (store, manifest_path(store), link):
        for extra in ((), ("--overwrite",)):
            r = _export(store, target, *extra)
            assert _one_line(r) and "export to another path" in r.output, r.output
    assert _snapshot(store) == before and manifest_path(store).read_bytes() == manifest
    assert not list(store.parent.glob("*.tmp*"))


@pytest.mark.refuses("an existing export target without --overwrite")
def test_an_existing_file_is_replaced_only_with_overwrite(stores, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    r = _export(stores["zarr"], out)
    assert _one_line(r) and "--overwrite" in r.output and out.read_text() == "keep me"
    r = _export(stores["zarr"], out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


@pytest.mark.refuses("a folder or unwritable export target (no temp file left)")
def test_a_folder_or_unwritable_target_is_one_line_and_leaves_no_temp_file(stores, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    r = _export(stores["zarr"], folder, "--overwrite")
    assert _one_line(r) and "is a folder" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _export(stores["zarr"], blocker / "cells.h5ad")  # its parent is a file: cannot be written
    assert _one_line(r) and "cannot be written" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and not list(folder.iterdir())


def test_a_write_that_fails_half_way_removes_its_temp_file(stores, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def broken(table, where, **kw):
        open(where, "wb").write(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken)
    r = CliRunner().invoke(
        main, ["export", str(stores["zarr"]), "--to", "parquet", str(tmp_path / "x.parquet")]
    )
    assert _one_line(r) and "No space left on device" in r.output, r.output
    assert list(tmp_path.iterdir()) == []
