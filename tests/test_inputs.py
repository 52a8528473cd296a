"""Issue 18, the input files: nothing silent, nothing that hangs, one line each.

Symlinked folders, duplicate rows, Z-stacks, unsupported pixel types, a too-low --max-value, and
files that would abort or hang a run (a FIFO, /dev/zero, a huge declared image).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from conftest import SAMPLE, copy_subset, save_png
from PIL import Image

from tprobe.cli import main
from tprobe.data.dataset import discover, discover_unlabelled
from tprobe.data.images import read_channels, read_image
from tprobe.data.preprocess import PreprocessConfig, preprocess
from tprobe.errors import ChannelError, TprobeError
from tprobe.features.sources import from_table


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO blocks open() forever)."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def huge_tiff(path: Path) -> Path:
    """A 1.7 MB TIFF declaring 3 x 24576 x 24576 uint8 (1.8 GB decoded): zlib tiles of zeros, reused."""
    tile = 8192
    blob = zlib.compress(bytes(tile * tile))
    tiles = iter([blob] * (3 * (24576 // tile) ** 2))
    tifffile.imwrite(
        path,
        tiles,
        shape=(3, 24576, 24576),
        dtype="uint8",
        compression="zlib",
        tile=(tile, tile),
        photometric="minisblack",
    )
    return path


def huge_png(path: Path, side: int = 20000) -> Path:
    """A 60-byte PNG whose header declares side x side greyscale pixels (Pillow: DecompressionBombError)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


# item 3 ------------------------------------------------------------------------------------
def _table_case(tmp_path, small_data):
    pre = preprocess(discover(small_data), PreprocessConfig(views="orig"))
    orig = pre.kept
    rel = orig["path"].map(lambda p: Path(p).relative_to(small_data).as_posix())
    table = pd.DataFrame({"file": rel, "f": np.arange(len(orig), dtype=float)})
    return pre, table


@pytest.mark.refuses("a feature table with two rows naming one image (both lines named)")
def test_two_table_rows_naming_one_image_are_refused_with_both_rows(tmp_path, small_data):
    pre, table = _table_case(tmp_path, small_data)
    # the same image again, under its bare file name (unique in the data): before, the later row won
    again = table.iloc[[2]].assign(file=Path(table["file"].iloc[2]).name, f=-1.0)
    pd.concat([table, again]).to_csv(tmp_path / "t.csv", index=False)
    last = len(table)  # the added row's 0-based index
    with pytest.raises(
        TprobeError, match=rf"t.csv: lines 4 and {last + 2} \(line 1 is the header\) both name "
    ):
        from_table(tmp_path / "t.csv", pre.manifest, id_column="file")
    pd.concat([table, again]).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(TprobeError, match=rf"t.parquet: rows 3 and {last + 1} \(counted from 1\) both name "):
        from_table(tmp_path / "t.parquet", pre.manifest, id_column="file")
    # the same id twice: both rows named too
    pd.concat([table, table.iloc[[5]]]).to_csv(tmp_path / "same.csv", index=False)
    with pytest.raises(
        TprobeError, match=rf"lines 7 and {last + 2} \(line 1 is the header\) have the same file"
    ):
        from_table(tmp_path / "same.csv", pre.manifest, id_column="file")
    table.to_csv(tmp_path / "ok.csv", index=False)  # one row per image still joins
    assert len(from_table(tmp_path / "ok.csv", pre.manifest, id_column="file").X) == len(table)


@pytest.mark.refuses("a manifest listing one image twice (both lines named)")
def test_duplicate_manifest_rows_name_both_lines(tmp_path, small_data):
    files = sorted(small_data.rglob("*.png"))
    rows = [{"path": str(f.relative_to(tmp_path)), "label": f.parts[-2], "donor": f.parts[-3]} for f in files]
    dup = {**rows[1], "path": "./" + rows[1]["path"]}  # the same file, spelled differently
    pd.DataFrame([*rows, dup]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(
        TprobeError, match=rf"m.csv: lines 3 and {len(rows) + 2} \(line 1 is the header\) both list"
    ):
        discover(tmp_path / "m.csv")
    pd.DataFrame(rows).to_csv(tmp_path / "ok.csv", index=False)
    assert len(discover(tmp_path / "ok.csv").table) == len(rows)


# item 5 ------------------------------------------------------------------------------------
@pytest.mark.refuses("a symlink loop among the image folders (listed, not followed)")
def test_symlinked_donor_and_class_folders_are_followed_and_a_loop_is_listed(tmp_path):
    elsewhere = copy_subset(tmp_path / "elsewhere", donors=("donor_2", "donor_3"), per_class=4)
    data = copy_subset(tmp_path / "data", donors=("donor_1",), per_class=4)
    (data / "donor_2").symlink_to(elsewhere / "donor_2", target_is_directory=True)  # a symlinked donor
    (data / "donor_3").mkdir()
    shutil.copytree(elsewhere / "donor_3" / "activated", data / "donor_3" / "activated")
    (data / "donor_3" / "quiescent").symlink_to(elsewhere / "donor_3" / "quiescent")  # a symlinked class
    (data / "donor_1" / "activated" / "loop").symlink_to(data, target_is_directory=True)  # a loop to the top
    (data / "donor_2" / "quiescent" / "self").symlink_to(elsewhere / "donor_2")  # a loop inside a link
    with deadline(60):
        ds = discover(data)
    t = ds.table
    assert len(t) == 24  # 3 donors x 2 classes x 4, before: 12 (donor_2 and donor_3/quiescent lost silently)
    assert sorted(t.groupby(["donor", "label"]).size().tolist()) == [4] * 6
    assert sorted(Path(s.path).name for s in ds.skipped) == ["loop", "self"]
    assert all("symlink loops back" in s.reason for s in ds.skipped)
    with deadline(60):
        unlabelled = discover_unlabelled(data)
    assert len(unlabelled.table) == 24 and len(unlabelled.skipped) == 2


@pytest.mark.refuses("a broken symlink, a class folder without images (each listed)")
def test_a_broken_link_and_a_class_without_images_each_have_a_line(tmp_path):
    data = copy_subset(tmp_path / "data", donors=("donor_1",), per_class=2)
    (data / "donor_2").symlink_to(tmp_path / "moved" / "donor_2")  # a donor moved away: a dangling link
    (data / "donor_3" / "activated").mkdir(parents=True)
    (data / "donor_3" / "activated" / "cell.jpg").write_bytes(b"jpeg")  # a class of unsupported files
    (data / "donor_3" / "activated" / ".DS_Store").write_bytes(b"")
    ds = discover(data)
    assert len(ds.table) == 4
    reasons = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(reasons) == {"donor_2", "activated"}
    assert "does not exist; fix or remove the link" in reasons["donor_2"]
    assert "class folder holds no .png/.tif image (1 other file(s), e.g. cell.jpg)" in reasons["activated"]


# item 9 ------------------------------------------------------------------------------------
@pytest.mark.refuses("a Z or T stack given as channels (the axes found are named)")
def test_a_z_stack_is_not_taken_as_channels(tmp_path):
    planes = np.random.default_rng(0).integers(0, 4000, (3, 16, 16), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", planes, imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(ChannelError, match=r"z.tif: the TIFF's axes are ZYX .*3 planes are Z, not channels"):
        read_channels(tmp_path / "z.tif", "a,b,c")
    tifffile.imwrite(tmp_path / "t.tif", planes, imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(ChannelError, match="axes are TYX"):
        read_channels(tmp_path / "t.tif", "a,b,c")
    tifffile.imwrite(
        tmp_path / "c.tif", planes, imagej=True, metadata={"axes": "CYX"}
    )  # a channel hyperstack
    stack, _ = read_channels(tmp_path / "c.tif", "a,b,c")
    np.testing.assert_allclose(stack, planes * (255 / 65535), rtol=1e-6)
    tifffile.imwrite(
        tmp_path / "plain.tif", planes, photometric="minisblack"
    )  # no axis labels: (C, H, W) as documented
    assert read_channels(tmp_path / "plain.tif", "a,b,c")[0].shape == (3, 16, 16)
    hyper = np.stack([planes, planes])  # 2 channels x 3 slices
    tifffile.imwrite(tmp_path / "cz.tif", hyper.swapaxes(0, 1), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ChannelError, match=r"shape \(3, 2, 16, 16\), axes ZCYX"):
        read_channels(tmp_path / "cz.tif", "a,b")


# item 11 -----------------------------------------------------------------------------------
@pytest.mark.refuses("an image whose header declares more than --max-pixels values")
def test_a_huge_declared_image_is_refused_from_its_header(tmp_path):
    with pytest.raises(
        TprobeError, match=r"declares 3 x 24576 x 24576 = 1,811,939,328 values, over --max-pixels 50"
    ):
        read_image(huge_tiff(tmp_path / "huge.tif"))
    with pytest.raises(
        TprobeError, match="big.png: declares 400,000,000 pixels, over --max-pixels 50,000,000"
    ):
        read_image(huge_png(tmp_path / "big.png"))
    with pytest.raises(
        TprobeError, match=r"mid.png: declares 8000 x 8000 x 1 = 64,000,000 values, over --max-pixels"
    ):
        read_image(huge_png(tmp_path / "mid.png", 8000))  # under Pillow's own limit, over ours
    small = save_png(tmp_path / "s.png", np.full((20, 30), 7, np.uint8))
    assert read_image(small, max_pixels=600).shape == (20, 30)
    with pytest.raises(TprobeError, match="over --max-pixels 599"):
        read_image(small, max_pixels=599)


@pytest.mark.refuses("a FIFO or device file named as an image (never opened)")
def test_fifo_and_device_are_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with (
        deadline(30),
        pytest.raises(TprobeError, match=r"pipe.png: is a FIFO \(named pipe\), not an image file"),
    ):
        read_image(tmp_path / "pipe.png")
    with deadline(30), pytest.raises(TprobeError, match="/dev/zero: is a device, not an image file"):
        read_image("/dev/zero")


@pytest.mark.refuses("bad files among good ones (each skipped with a line; exit 3)")
def test_bad_files_are_skipped_each_with_a_line_and_exit_3(tmp_path):
    data = copy_subset(tmp_path / "data", donors=("donor_1", "donor_2"), per_class=3)
    os.mkfifo(data / "donor_1" / "activated" / "pipe.png")
    huge_png(data / "donor_1" / "quiescent" / "bomb.png")
    huge_tiff(data / "donor_2" / "activated" / "huge.tif")
    rows = [
        {"path": str(p), "label": p.parts[-2], "donor": p.parts[-3]}
        for p in sorted(data.rglob("*"))
        if p.suffix in (".png", ".tif")
    ]
    pd.DataFrame([*rows, {"path": "/dev/zero", "label": "activated", "donor": "donor_2"}]).to_csv(
        tmp_path / "m.csv", index=False
    )
    with deadline(120):
        r = CliRunner().invoke(
            main,
            [
                "preprocess",
                "--data",
                str(tmp_path / "m.csv"),
                "--views",
                "orig",
                "--out",
                str(tmp_path / "p"),
            ],
        )
    assert r.exit_code == 3, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("skipped: ")]
    assert len(lines) == 4 and "4 file(s) skipped" in r.output
    for name, why in [
        ("pipe.png", "FIFO"),
        ("bomb.png", "--max-pixels"),
        ("huge.tif", "--max-pixels"),
        ("/dev/zero", "is a device"),
    ]:
        assert any(name in line and why in line for line in lines), (name, lines)
    manifest = pd.read_parquet(tmp_path / "p" / "manifest.parquet")
    assert len(manifest) == 16 and (manifest["drop_reason"] == "unreadable").sum() == 4  # 12 images + 4 bad
    # --max-pixels is an option: every sample cell (about 50 x 50 px) is over 100
    r = CliRunner().invoke(
        main,
        [
            "preprocess",
            "--data",
            str(data / "donor_2"),
            "--max-pixels",
            "100",
            "--views",
            "orig",
            "--out",
            str(tmp_path / "q"),
        ],
    )
    assert "over --max-pixels 100" in r.output


# one-line messages -------------------------------------------------------------------------
@pytest.mark.refuses("signed, 32-bit or float pixels (the type found is named)")
@pytest.mark.parametrize(
    "dtype, says",
    [
        ("int16", "16-bit signed integer pixels (int16)"),
        ("uint32", "32-bit unsigned integer pixels (uint32)"),
        ("float32", "32-bit floating-point pixels (float32)"),
    ],
)
def test_unsupported_pixel_types_are_refused_with_the_bit_depth(tmp_path, dtype, says):
    tifffile.imwrite(tmp_path / "a.tif", np.full((8, 8), 100, dtype))
    with pytest.raises(
        TprobeError, match=rf"a.tif: {re.escape(says)} are not supported; .*\(uint8, uint16\)"
    ):
        read_image(tmp_path / "a.tif")
    # in a dataset: refused once (exit 2), counted, not skipped file by file nor read as "dim" cells
    data = copy_subset(tmp_path / "data", donors=("donor_1",), per_class=2)
    shutil.copy(tmp_path / "a.tif", data / "donor_1" / "activated" / "a.tif")
    r = CliRunner().invoke(main, ["preprocess", "--data", str(data), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and not (tmp_path / "p").exists()
    assert f"1 of 5 images have pixels tprobe cannot scale, e.g. {data}" in r.output and says in r.output


@pytest.mark.refuses("a --max-value below the data (the count above it is named)")
def test_a_too_low_max_value_is_refused_once_with_the_count(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i, top in enumerate([4000, 4000, 4000, 60000, 9000]):
        donor, cls = f"donor_{1 + i % 2}", ("activated", "quiescent")[i % 2]
        (data / donor / cls).mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 3000, (32, 32)).astype(np.uint16)
        img[5, 5] = top
        if top > 9000:
            img[6, 6] = img[7, 7] = top  # 3 pixels above
        tifffile.imwrite(data / donor / cls / f"c{i}.tif", img)
    with pytest.raises(
        TprobeError,
        match=r"--max-value 4095 is below the data: 2 of 5 images have pixels above it "
        r"\(4 pixels; the brightest, 60000, in .*c3.tif\)",
    ):
        preprocess(discover(data), PreprocessConfig(max_value=4095.0))
    assert len(preprocess(discover(data), PreprocessConfig(max_value=65535.0)).manifest) > 0
    # predict scores with the run's fixed scaling: there each such image keeps its row, with its line
    pre = preprocess(discover_unlabelled(data), PreprocessConfig(max_value=4095.0), each_file=True)
    assert sorted(Path(s.path).name for s in pre.skipped) == ["c3.tif", "c4.tif"]
    assert all("exceeds --max-value 4095" in s.reason for s in pre.skipped) and len(pre.manifest) >= 5


def test_max_pixels_keeps_the_default_hash():
    assert PreprocessConfig().hash == PreprocessConfig(max_pixels=50_000_000).hash
    assert PreprocessConfig(max_pixels=10**6).hash != PreprocessConfig().hash
    assert PreprocessConfig.from_dict(PreprocessConfig(max_pixels=10**6).to_dict()).max_pixels == 10**6
    with pytest.raises(TprobeError, match="--max-pixels 0"):
        PreprocessConfig(max_pixels=0)


def test_sample_images_are_far_under_the_default_max_pixels():
    sizes = [read_image(p).size for p in sorted((SAMPLE / "donor_1" / "activated").glob("*.png"))[:20]]
    assert max(sizes) < 50_000_000 / 1000


@pytest.mark.refuses("a saved preprocess folder whose image vanished or became a FIFO")
def test_a_saved_folder_whose_image_became_a_fifo_or_vanished_is_refused_not_hung(tmp_path, small_data):
    from tprobe.data.preprocess import Preprocessed

    pre = preprocess(discover(small_data), PreprocessConfig(views="orig"))
    pre.save(tmp_path / "p")
    first, second = pre.kept["path"].iloc[0], pre.kept["path"].iloc[1]
    os.remove(first)
    os.mkfifo(first)
    with (
        deadline(30),
        pytest.raises(TprobeError, match="changed or missing since .*run `tprobe preprocess` again"),
    ):
        Preprocessed.load(tmp_path / "p")
    os.remove(first)
    shutil.copy(second, first)
    os.remove(second)
    with pytest.raises(TprobeError, match="changed or missing since"):
        Preprocessed.load(tmp_path / "p")


@pytest.mark.refuses("grey images of two bit depths in one dataset (8-bit beside 16-bit)")
def test_grey_images_of_two_bit_depths_are_one_line_not_two_scales(tmp_path):
    """8-bit files are read as they are and 16-bit ones scaled by 255/--max-value: in one dataset the
    two parts are on one scale only by chance, so (as for channels) the mix is refused, both files named."""
    data = copy_subset(tmp_path / "data", donors=("donor_1",), per_class=2)
    png = sorted((data / "donor_1" / "quiescent").glob("*.png"))[-1]
    wide = np.asarray(read_image(png), np.uint16) * 16  # the same cell as 12-bit data
    tifffile.imwrite(png.with_suffix(".tif"), wide)
    png.unlink()
    r = CliRunner().invoke(main, ["preprocess", "--data", str(data), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and not (tmp_path / "p").exists(), r.output
    line = r.output.strip().splitlines()[-1]
    assert png.with_suffix(".tif").name in line and "16-bit" in line and "8-bit" in line, line
    # one bit depth: accepted, as before
    (data / "donor_1" / "quiescent" / png.with_suffix(".tif").name).unlink()
    assert len(preprocess(discover(data), PreprocessConfig()).kept) > 0


@pytest.mark.refuses("a TIFF holding several images of one size (an OME-TIFF of several positions)")
def test_a_tiff_holding_several_images_is_one_line_not_its_first_image(tmp_path):
    """An OME-TIFF of two positions (two series of one size): only the first was read, the second lost
    without a line. A smaller extra series (a thumbnail or preview) still reads the first."""
    first, second = np.full((16, 16), 100, np.uint8), np.full((16, 16), 200, np.uint8)
    with tifffile.TiffWriter(tmp_path / "two.ome.tif", ome=True) as w:
        w.write(first, metadata={"axes": "YX"})
        w.write(second, metadata={"axes": "YX"})
    with pytest.raises(TprobeError, match=r"two.ome.tif: holds 2 images .*16x16.*one image per file"):
        read_image(tmp_path / "two.ome.tif")
    tifffile.imwrite(tmp_path / "thumb.tif", first)
    tifffile.imwrite(tmp_path / "thumb.tif", np.zeros((4, 4), np.uint8), append=True)
    assert np.array_equal(read_image(tmp_path / "thumb.tif"), first)


@pytest.mark.refuses("a manifest column named crop_id (tprobe's own)")
def test_a_manifests_own_cell_id_column_is_kept_not_taken_for_a_crops_id(tmp_path):
    """A CSV manifest's extra column cell_id (text, 'cell_1' in each donor) was read as a field crop's id:
    it replaced the content hash as source_id, so donor_2's cells were dropped as 'same content as'
    donor_1's. Extra columns are kept as they are; a crop_id column (tprobe's own) is one line."""
    files = [f for d in ("donor_1", "donor_2") for f in sorted((SAMPLE / d / "activated").glob("*.png"))[:3]]
    df = pd.DataFrame(
        {"path": list(map(str, files)), "label": 1, "donor": [f.parts[-3] for f in files]}
    ).assign(cell_id=["cell_1", "cell_2", "cell_3"] * 2)
    df.to_csv(tmp_path / "m.csv", index=False)
    pre = preprocess(discover(tmp_path / "m.csv"), PreprocessConfig(views="orig"))
    assert not pre.skipped and (pre.manifest["drop_reason"] != "duplicate").all()
    assert pre.manifest["cell_id"].tolist() == df["cell_id"].tolist()  # kept as it is
    assert not pre.manifest["source_id"].isin(df["cell_id"]).any() and "crop_id" not in pre.manifest
    df.rename(columns={"cell_id": "crop_id"}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(TprobeError, match=r"c.csv: column crop_id is tprobe's own .*rename it"):
        discover(tmp_path / "c.csv")


@pytest.mark.refuses("predict on images of another bit depth than the run's training images")
def test_predict_refuses_images_of_another_bit_depth_than_the_runs(tmp_path, tiny_reg):
    # a run trained on 8-bit PNGs (read as they are) scored 16-bit TIFFs scaled by --max-value 65535:
    # 12-bit cells 16x too dark, every score silently off; the run records its images' bit depth
    from tprobe.cache.extract import extract
    from tprobe.data.images import read_image
    from tprobe.features.sources import from_store
    from tprobe.models.backbones import resolve_model
    from tprobe.probing.predict import predict
    from tprobe.probing.run import ProbeRun
    from tprobe.runs.record import RunRecord

    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2", "donor_3"), per_class=3)
    store = extract(
        preprocess(discover(data)), resolve_model(str(tiny_reg)), cache=tmp_path / "c1", progress=False
    )
    run_dir = ProbeRun(head="logreg", n_boot=20).fit(from_store(store.path, "cls")).save(tmp_path / "runs")
    assert RunRecord.load(run_dir).features.pixel_type == "uint8"
    new = copy_subset(tmp_path / "new", donors=("donor_4",), per_class=2)
    assert predict(run_dir, new, cache=tmp_path / "c2")["p_activated"].notna().any()  # same depth: fine
    for png in sorted(new.rglob("*.png")):  # the same cells as 12-bit TIFFs
        tifffile.imwrite(png.with_suffix(".tif"), np.asarray(read_image(png), np.uint16) * 16)
        png.unlink()
    with pytest.raises(
        ChannelError, match=r"\.tif: 16-bit pixels, but run .* was trained on 8-bit .*convert"
    ):
        predict(run_dir, new, cache=tmp_path / "c2")
    # a run recorded before the bit depth was: scored as before, no refusal
    cfg = run_dir / "config.json"
    old = cfg.read_text().replace('"pixel_type": "uint8",', "")
    assert old != cfg.read_text()
    cfg.write_text(old)
    assert predict(run_dir, new, cache=tmp_path / "c2")["path"].str.endswith(".tif").sum() == 4


def test_hidden_files_and_folders_are_ignored_by_discovery(tmp_path):
    # macOS writes ._NAME.png (AppleDouble) beside every file copied to a non-Mac disk, and .DS_Store;
    # each ._ file was an image row, then 'unreadable' (a line each, exit 3)
    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2"), per_class=2)
    n = len(discover(data).table)
    for png in list(data.rglob("*.png")):
        (png.parent / f"._{png.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
        (png.parent / ".DS_Store").write_bytes(bytes(10))
        hidden = png.parent / ".thumbnails"
        hidden.mkdir(exist_ok=True)
        shutil.copy(png, hidden / png.name)
    (data / "._donor_3").write_bytes(bytes(10))
    found = discover(data)
    assert len(found.table) == n and not found.skipped, found.skipped
    assert not any("/." in p for p in found.table["path"])
    for folder in (data, data / "donor_1" / "activated"):  # predict's discovery too
        new = discover_unlabelled(folder)
        assert not new.skipped and not any("/." in p for p in new.table["path"]), new.table["path"]
    # a flat folder of Wang-named files
    flat = tmp_path / "flat"
    flat.mkdir()
    for png in list(data.rglob("*.png"))[:3]:
        if not png.name.startswith(".") and ".thumbnails" not in str(png):
            shutil.copy(png, flat / png.name)
            (flat / f"._{png.name}").write_bytes(bytes(10))
    (flat / ".Trash-1000" / "activated").mkdir(parents=True)  # a hidden class folder: still a flat folder
    found = discover(flat)
    assert found.layout == "flat" and not found.skipped and not any("/." in p for p in found.table["path"])


@pytest.mark.refuses("a grey+alpha PNG with transparent pixels (skipped, listed)")
def test_a_grey_alpha_png_is_read_as_grey_when_opaque_and_refused_accurately_when_not(tmp_path):
    # an 8-bit grey+alpha PNG (what some viewers export) stopped preprocess with "name a stack's
    # planes with --channels": it is one grey image when its alpha is opaque everywhere
    data = copy_subset(tmp_path / "d", donors=("donor_1", "donor_2"), per_class=2)
    png = sorted(data.rglob("*.png"))[0]
    grey = np.asarray(read_image(png), np.uint8)
    la = np.stack([grey, np.full_like(grey, 255)], axis=-1)
    save_png(png, la)
    assert Image.open(png).mode == "LA"
    assert (read_image(png) == grey).all()
    pre = preprocess(discover(data))
    assert png.name in " ".join(pre.manifest["path"]) and not pre.skipped
    la[0, 0, 1] = 0  # one transparent pixel: tprobe cannot say what the pixel is
    save_png(png, la)
    with pytest.raises(TprobeError, match=r"grey\+alpha PNG with transparent pixels") as exc:
        read_image(png)
    assert "--channels" not in str(exc.value) and str(png) in str(exc.value)
    pre = preprocess(discover(data), each_file=True)
    assert [s.path for s in pre.skipped] == [str(png)]
