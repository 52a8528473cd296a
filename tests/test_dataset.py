import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import SAMPLE, save_png

from tprobe.data.dataset import discover, parse_wang_name
from tprobe.errors import TprobeError


def test_bundled_sample_layout():
    ds = discover()
    t = ds.table
    assert ds.layout == "folders" and len(t) == 852 and not ds.skipped
    assert sorted(t["donor"].unique()) == [f"donor_{i}" for i in range(1, 7)]
    assert set(t["label"]) == {0, 1}
    # labels from folders agree with the names; batch/plate/cell parsed
    assert (t["label"] == t["path"].str.contains("_act_").astype(int)).all()
    assert t["batch"].notna().all() and set(t["cell_type"]) <= {"CD3", "CD8"}


def test_parse_wang_name():
    assert parse_wang_name("CD8_12_noact_3_2_101.png") == {
        "cell_type": "CD8",
        "donor": "donor_12",
        "label": 0,
        "batch": 3,
        "plate": 2,
        "cell": 101,
    }
    assert parse_wang_name("cell_7.png") is None


def test_flat_folder_and_unparsable_name(tmp_path):
    for f in sorted((SAMPLE / "donor_2" / "activated").glob("*.png"))[:3]:
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(f, tmp_path / "mystery.png")
    ds = discover(tmp_path)
    assert ds.layout == "flat" and len(ds.table) == 3
    assert ds.table["donor"].eq("donor_2").all() and ds.table["label"].eq(1).all()
    assert len(ds.skipped) == 1 and "mystery.png" in str(ds.skipped[0])
    assert "rename" in ds.skipped[0].reason


def test_unknown_label_folder_is_skipped_with_fix(small_data):
    src = next((small_data / "donor_1" / "activated").glob("*.png"))
    (small_data / "donor_1" / "maybe").mkdir()
    shutil.copy(src, small_data / "donor_1" / "maybe" / "x.png")
    ds = discover(small_data)
    assert len(ds.table) == 24
    assert len(ds.skipped) == 1 and "'maybe' is not a label name" in ds.skipped[0].reason


def test_csv_manifest(tmp_path, small_data):
    files = sorted(small_data.rglob("*.png"))
    df = pd.DataFrame(
        {
            "path": [str(f.relative_to(tmp_path)) for f in files],
            "label": ["activated" if "/activated/" in str(f) else 0 for f in files],
            "donor": [f.parts[-3] for f in files],
            "well": "A1",
        }
    )
    df.loc[0, "label"] = "banana"
    df.to_csv(tmp_path / "m.csv", index=False)
    ds = discover(tmp_path / "m.csv")
    assert ds.layout == "table" and len(ds.table) == len(files) - 1
    assert "well" in ds.table.columns and "banana" in ds.skipped[0].reason
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(TprobeError, match="lacks column.*label"):
        discover(tmp_path / "bad.csv")


def test_empty_and_missing(tmp_path):
    with pytest.raises(TprobeError, match="no usable images"):
        discover(tmp_path)
    with pytest.raises(TprobeError, match="no such file"):
        discover(tmp_path / "nope")
    save_png(tmp_path / "donor_1" / "activated" / "a.png", __import__("numpy").zeros((3, 3), "uint8"))
    assert len(discover(tmp_path).table) == 1


def test_class_folders_without_donor_folders_keep_the_donors_the_names_give(tmp_path):
    """``activated/`` and ``quiescent/`` straight under the root, holding Wang-named files: each image's
    donor is its name's (was 'donor_unknown' for all: one donor, so no donor-held-out split)."""
    names = {
        "activated": ["CD3_1_act_9_1_12.png", "CD3_2_act_2_1_23.png"],
        "quiescent": ["CD3_1_noact_10_1_103.png", "CD3_03_noact_8_1_110.png", "cell_9.png"],
    }
    src = next((SAMPLE / "donor_1" / "activated").glob("*.png"))
    for cls, files in names.items():
        (tmp_path / cls).mkdir()
        for name in files:
            shutil.copy(src, tmp_path / cls / name)
    t = discover(tmp_path).table
    assert dict(zip(t["path"].map(lambda p: Path(p).name), t["donor"], strict=True)) == {
        "CD3_1_act_9_1_12.png": "donor_1",
        "CD3_2_act_2_1_23.png": "donor_2",
        "CD3_1_noact_10_1_103.png": "donor_1",
        "CD3_03_noact_8_1_110.png": "donor_3",
        "cell_9.png": "donor_unknown",  # a name without a donor: as before
    }
    # a donor folder still names the donor of the images in it
    shutil.copytree(tmp_path / "activated", tmp_path / "more" / "patient_x" / "activated")
    t = discover(tmp_path / "more").table
    assert t["donor"].eq("patient_x").all()


@pytest.mark.refuses(
    "a class folder holding a folder of the other class (donor folders named like labels: `1/`, `0/`)"
)
def test_a_donor_folder_named_like_a_label_is_refused_not_read_as_one_class(tmp_path):
    """Donor folders numbered 1, 2, 3: '1' is also a label name (activated), so the quiescent images of
    donor 1 were all read as activated, without a line. Labels that disagree along a path are one line."""
    src = sorted((SAMPLE / "donor_1" / "activated").glob("*.png"))
    for donor in ("1", "2"):
        for cls in ("activated", "quiescent"):
            (tmp_path / "d" / donor / cls).mkdir(parents=True)
            shutil.copy(src[0 if cls == "activated" else 1], tmp_path / "d" / donor / cls / f"cell_{cls}.png")
    with pytest.raises(TprobeError, match=r"d/1: .*label 1 .*'quiescent' inside it.*label 0.*donor_1"):
        discover(tmp_path / "d")
    # a named class folder holding numbered folders (plates 0 and 1) reads as before: by its name
    for cls in ("activated", "quiescent"):
        for plate in ("0", "1"):
            (tmp_path / "e" / cls / plate).mkdir(parents=True)
            shutil.copy(src[int(plate)], tmp_path / "e" / cls / plate / f"{cls[0]}{plate}.png")
    assert discover(tmp_path / "e").table["label"].tolist() == [1, 1, 0, 0]
    (tmp_path / "e" / "activated" / "quiescent").mkdir()  # two named classes along one path
    shutil.copy(src[0], tmp_path / "e" / "activated" / "quiescent" / "x.png")
    with pytest.raises(TprobeError, match=r"activated: .*label 1 .*'quiescent' inside it"):
        discover(tmp_path / "e")


@pytest.mark.refuses("an image beside the donor folders or the class folders (skipped, listed)")
def test_images_outside_every_class_folder_each_have_a_line(small_data):
    """An image beside the donor folders, or in a donor folder beside its class folders, was left out
    without a line (the class it belongs to is unknown)."""
    src = next((small_data / "donor_1" / "activated").glob("*.png"))
    shutil.copy(src, small_data / "stray.png")
    shutil.copy(src, small_data / "donor_1" / "loose.png")
    ds = discover(small_data)
    assert len(ds.table) == 24
    lines = {Path(s.path).name: s.reason for s in ds.skipped}
    assert sorted(lines) == ["loose.png", "stray.png"]
    assert all("not inside an activated or quiescent folder" in why for why in lines.values())


@pytest.mark.refuses(
    "a Wang-named file whose name gives another donor than its donor folder (skipped, listed)"
)
def test_a_file_whose_name_gives_another_donor_than_its_folder_is_skipped_with_a_line(small_data):
    """As a name and a folder giving two labels are: donor_2/activated/CD3_1_act_... was read as donor_2
    without a line, though its name says donor 1 (a misplaced file puts one cell in two donors' reach)."""
    src = next((small_data / "donor_1" / "activated").glob("CD3_1_*.png"))
    shutil.move(src, small_data / "donor_2" / "activated" / src.name)
    (small_data / "donor_01" / "activated").mkdir(parents=True)  # 01 is donor 1: agrees
    other = next((small_data / "donor_1" / "activated").glob("CD3_1_*.png"))
    shutil.move(other, small_data / "donor_01" / "activated" / other.name)
    ds = discover(small_data)
    assert len(ds.table) == 23 and [Path(s.path).name for s in ds.skipped] == [src.name]
    assert "name says donor_1 but folder 'donor_2'" in ds.skipped[0].reason


@pytest.mark.refuses("a file of a format tprobe does not read beside the images (skipped, listed)")
def test_a_jpeg_beside_a_class_s_pngs_has_a_line(small_data, tmp_path):
    """A class folder of PNGs and a few JPEGs: the JPEGs were left out without a line (only a class with
    no PNG/TIFF at all had one). A folder of Wang-named files, likewise."""
    jpg = small_data / "donor_1" / "activated" / "CD3_1_act_9_9_9.jpg"
    jpg.write_bytes(b"\xff\xd8\xff")
    (small_data / "donor_1" / "activated" / "notes.txt").write_text("not an image")  # no line
    ds = discover(small_data)
    assert len(ds.table) == 24 and [Path(s.path).name for s in ds.skipped] == [jpg.name]
    assert "tprobe reads PNG and TIFF" in ds.skipped[0].reason
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((small_data / "donor_1" / "activated").glob("*.png")), flat)
    shutil.copy(jpg, flat)
    assert [Path(s.path).name for s in discover(flat).skipped] == [jpg.name]


def test_a_donor_with_stray_spaces_is_the_same_donor(tmp_path, small_data):
    """'donor_1' and 'donor_1 ' (a hand-edited CSV) were two donors, so one donor's cells could sit on
    both sides of a donor-held-out split; labels were stripped already, donors now too."""
    files = sorted(small_data.rglob("*.png"))
    df = pd.DataFrame(
        {
            "path": [str(f.relative_to(tmp_path)) for f in files],
            "label": [f.parts[-2] for f in files],
            "donor": [f.parts[-3] + (" " if i % 2 else "") for i, f in enumerate(files)],
        }
    )
    df.to_csv(tmp_path / "m.csv", index=False)
    assert sorted(discover(tmp_path / "m.csv").table["donor"].unique()) == ["donor_1", "donor_2"]


def test_unlabelled_images_in_donor_class_folders_take_the_donor_folder(tmp_path):
    """predict reads donors as discover does (a donor-centred run centres each donor on its own cells):
    donor_7/activated/cell.png was donor 'unknown' unless its name was Wang-style, so every donor's
    new cells were centred together."""
    from tprobe.data.dataset import discover_unlabelled

    src = sorted((SAMPLE / "donor_1" / "activated").glob("*.png"))
    for donor, cls, i in [("donor_7", "activated", 0), ("donor_8", "quiescent", 1)]:
        (tmp_path / "new" / donor / cls).mkdir(parents=True)
        shutil.copy(src[i], tmp_path / "new" / donor / cls / f"cell{i}.png")
    shutil.copy(src[2], tmp_path / "new" / "loose.png")
    t = discover_unlabelled(tmp_path / "new").table
    got = dict(zip(t["path"].map(lambda p: Path(p).name), t["donor"], strict=True))
    assert got == {"cell0.png": "donor_7", "cell1.png": "donor_8", "loose.png": "unknown"}
    assert discover(tmp_path / "new").table["donor"].tolist() == [
        "donor_7",
        "donor_8",
    ]  # as training reads them
    # a Wang name still gives its own donor
    shutil.copy(src[0], tmp_path / "new" / src[0].name)
    t = discover_unlabelled(tmp_path / "new").table
    assert t.loc[t["path"].str.endswith(src[0].name), "donor"].item() == "donor_1"


@pytest.mark.refuses("donor folders inside class folders (`DIR/activated/donor_1/`) without Wang names")
def test_donor_folders_inside_class_folders_are_refused_not_read_as_one_donor(tmp_path):
    """DIR/activated/donor_1/cell.png (class folders first, donors inside) with names that give no donor:
    every image was read as one donor, 'donor_unknown', without a line (no donor-held-out split is then
    possible). It is one line naming the accepted layout."""
    src = sorted((SAMPLE / "donor_1" / "activated").glob("*.png"))[:2]
    for cls in ("activated", "quiescent"):
        for donor in ("donor_1", "donor_2"):
            for k, f in enumerate(src):
                (tmp_path / "d" / cls / donor).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, tmp_path / "d" / cls / donor / f"cell_{k}.png")
    with pytest.raises(
        TprobeError, match=r"activated/donor_1: .*inside the class folder .*donor_N/activated"
    ):
        discover(tmp_path / "d")
    # Wang-named files there give their donors by name, as before; numbered (plate) folders are no donors
    for cls, cond in (("activated", "act"), ("quiescent", "noact")):
        for donor in (1, 2):
            (tmp_path / "w" / cls / f"donor_{donor}").mkdir(parents=True)
            shutil.copy(
                src[0], tmp_path / "w" / cls / f"donor_{donor}" / f"CD3_{donor}_{cond}_1_1_{donor}.png"
            )
            (tmp_path / "p" / cls / str(donor)).mkdir(parents=True)
            shutil.copy(src[0], tmp_path / "p" / cls / str(donor) / f"cell_{donor}.png")
    assert sorted(discover(tmp_path / "w").table["donor"]) == ["donor_1", "donor_1", "donor_2", "donor_2"]
    assert discover(tmp_path / "p").table["donor"].eq("donor_unknown").all()
