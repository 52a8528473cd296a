"""Fields of view + label masks (tprobe.data.fov) and OME-TIFF input (issue 21, sections 1 and 2)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from tprobe.cache.extract import extract
from tprobe.cache.store import FeatureStore, manifest_path
from tprobe.cli import main
from tprobe.data.dataset import DEFAULT_DATA, discover
from tprobe.data.fov import preprocess_fields, read_mask
from tprobe.data.images import read_image
from tprobe.data.preprocess import PreprocessConfig, Preprocessed, measure, preprocess
from tprobe.errors import ChannelError, TprobeError
from tprobe.models.backbones import resolve_model

GAP = 5  # px of background between the cells of a synthetic field, and around them


def make_fields(root: Path, donors=("donor_1", "donor_2"), per_class: int = 3, per_field: int = 3):
    """Sample cells laid side by side on zero fields, a label image of their rectangles, and the same
    cells as single-cell files. Returns (fields, masks, singles, {(field path, label): cell file name})."""
    fields, masks, singles = root / "fields", root / "masks", root / "singles"
    where = {}
    for donor in donors:
        for cls in ("activated", "quiescent"):
            files = sorted((DEFAULT_DATA / donor / cls).glob("*.png"))[:per_class]
            for d in (fields, masks, singles):
                (d / donor / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, singles / donor / cls / f.name)
            for k in range(0, len(files), per_field):
                cells = [np.asarray(Image.open(f)) for f in files[k : k + per_field]]
                h = max(c.shape[0] for c in cells) + 2 * GAP
                w = sum(c.shape[1] for c in cells) + GAP * (len(cells) + 1)
                field = np.zeros((h, w), np.uint8)
                label = np.zeros((h, w), np.uint16)
                x = GAP
                for i, c in enumerate(cells):
                    field[GAP : GAP + c.shape[0], x : x + c.shape[1]] = c
                    label[GAP : GAP + c.shape[0], x : x + c.shape[1]] = i + 1
                    where[(str(fields / donor / cls / f"field{k}.png"), i + 1)] = files[k + i].name
                    x += c.shape[1] + GAP
                Image.fromarray(field).save(fields / donor / cls / f"field{k}.png")
                tifffile.imwrite(masks / donor / cls / f"field{k}_masks.tif", label)
    return fields, masks, singles, where


def _tokens(pre, res):
    store = FeatureStore.open(res.path)
    arrays = {name: store.read(name) for name in ("cls", "registers", "patches")}
    return pre.kept.reset_index(drop=True), arrays


def test_field_crops_give_the_single_cell_tokens_bit_for_bit(tmp_path, tiny_reg):
    fields, masks, singles, where = make_fields(tmp_path)
    config = PreprocessConfig(outside="keep")  # margin 0: the crop is the cell's own image
    single = preprocess(discover(singles), config)
    fov, warnings = preprocess_fields(fields, masks, config, tmp_path / "prep" / "crops")
    assert warnings == [] and fov.skipped == []
    ref = resolve_model(str(tiny_reg))
    s_rows, s_tok = _tokens(single, extract(single, ref, cache=tmp_path / "c", progress=False))
    f_rows, f_tok = _tokens(fov, extract(fov, ref, cache=tmp_path / "c", progress=False))
    # the same cells are kept and dropped for the same reasons
    s_orig = single.manifest[single.manifest["view"] == "orig"]
    f_orig = fov.manifest[fov.manifest["view"] == "orig"]
    cell_of = {k: v for k, v in where.items()}
    f_names = [cell_of[(f, o)] for f, o in zip(f_orig["field"], f_orig["object"], strict=True)]
    assert sorted(zip(f_names, f_orig["drop_reason"], f_orig["entropy"], strict=True)) == sorted(
        zip(s_orig["path"].map(lambda p: Path(p).name), s_orig["drop_reason"], s_orig["entropy"], strict=True)
    )
    s_index = {
        (Path(p).name, v): i for i, (p, v) in enumerate(zip(s_rows["path"], s_rows["view"], strict=True))
    }
    assert len(f_rows) == len(s_rows) > 0 and set(f_rows["view"]) == set(config.view_names)
    for i, (field, obj, view) in enumerate(
        zip(f_rows["field"], f_rows["object"], f_rows["view"], strict=True)
    ):
        j = s_index[(cell_of[(field, obj)], view)]
        for name in f_tok:
            assert f_tok[name][i].tobytes() == s_tok[name][j].tobytes(), (name, field, obj, view)
    # a cell's id is its field's content hash plus its label, and the row keeps where it came from
    row = f_rows.iloc[0]
    field_hash = hashlib.sha256(Path(row["field"]).read_bytes()).hexdigest()[:16]
    assert (
        row["source_id"] == f"{field_hash}_{row['object']}"
        and row["image_id"] == f"{row['source_id']}_{row['view']}"
    )
    mask = tifffile.imread(row["mask"])
    ys, xs = np.nonzero(mask == row["object"])
    assert (row["bbox_y0"], row["bbox_x0"], row["bbox_y1"], row["bbox_x1"]) == (
        ys.min(),
        xs.min(),
        ys.max() + 1,
        xs.max() + 1,
    )
    assert (row["centroid_y"], row["centroid_x"]) == pytest.approx((ys.mean(), xs.mean()))


def test_crops_margin_outside_border_and_area_filters(tmp_path):
    field = np.full((40, 60), 7, np.uint16) * 100  # 16-bit, a bright background
    mask = np.zeros((40, 60), np.uint16)
    mask[10:20, 10:18] = 1  # 80 px, inside
    mask[12:14, 30:32] = 2  # 4 px: small
    mask[0:8, 40:50] = 3  # touches the top border
    mask[25:38, 25:55] = 4  # 390 px: large
    field[mask > 0] = 3000
    (tmp_path / "f" / "donor_1" / "activated").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "f" / "donor_1" / "activated" / "a.tif", field)
    tifffile.imwrite(
        tmp_path / "f" / "donor_1" / "activated" / "a_cp_masks.tif", mask
    )  # masks beside the fields
    config = PreprocessConfig(
        margin=3, outside="zero", min_object_area=10, max_object_area=200, max_value=4095
    )
    pre, _ = preprocess_fields(tmp_path / "f", None, config, tmp_path / "out" / "crops")
    orig = pre.manifest[pre.manifest["view"] == "orig"].set_index("object")
    assert orig["drop_reason"].to_dict() == {
        1: orig.loc[1, "drop_reason"],
        2: "small_object",
        3: "touches_border",
        4: "large_object",
    }
    crop = tifffile.imread(orig.loc[1, "path"])
    assert crop.dtype == np.uint16 and crop.shape == (10 + 6, 8 + 6)  # bbox plus the margin on each side
    assert (crop[3:-3, 3:-3] == 3000).all() and (crop[:3] == 0).all()  # outside the object: zeroed
    keep = PreprocessConfig(margin=3, outside="keep", max_value=4095)
    pre2, _ = preprocess_fields(tmp_path / "f", None, keep, tmp_path / "out2" / "crops")
    crop = tifffile.imread(pre2.manifest.set_index("object").loc[[1], "path"].iloc[0])
    assert (crop[:3] == 700).all()  # the field's own background
    assert pre2.fingerprint != pre.fingerprint and pre2.config.hash != pre.config.hash
    assert pre.counts().loc[("total", ""), ["touches_border", "small_object", "large_object"]].tolist() == [
        1,
        1,
        1,
    ]


@pytest.mark.refuses("a field of view whose mask has another shape")
@pytest.mark.refuses("a float label image (mask) of a field of view")
@pytest.mark.refuses("a field of view without a mask, or with two")
@pytest.mark.refuses("a Cellpose `_seg.npy` mask (a pickled dict: never unpickled)")
def test_bad_fields_and_masks_are_one_line(tmp_path):
    fields, masks, _, _ = make_fields(tmp_path, donors=("donor_1",), per_class=1, per_field=1)
    config = PreprocessConfig()
    mask = masks / "donor_1" / "activated" / "field0_masks.tif"
    good = tifffile.imread(mask)
    tifffile.imwrite(mask, good[:-1])
    with pytest.raises(TprobeError, match=r"field0_masks.tif: mask is \d+x\d+ px but its field is"):
        preprocess_fields(fields, masks, config, tmp_path / "c")
    tifffile.imwrite(mask, good.astype(np.float32))
    with pytest.raises(TprobeError, match="field0_masks.tif: a float mask"):
        preprocess_fields(fields, masks, config, tmp_path / "c")
    mask.unlink()
    with pytest.raises(TprobeError, match=r"field0.png: no mask found .*add its label image"):
        preprocess_fields(fields, masks, config, tmp_path / "c")
    # a Cellpose _seg.npy is a pickled dict: refused without unpickling it
    seg = mask.with_name("field0_seg.npy")
    np.save(seg, np.array({"masks": good}, dtype=object), allow_pickle=True)
    with pytest.raises(
        TprobeError, match="field0_seg.npy: a pickled .npy .* save its masks as a label image"
    ):
        preprocess_fields(fields, masks, config, tmp_path / "c")
    seg.unlink()
    np.save(mask.with_name("field0_masks.npy"), good)  # a plain integer array is fine
    assert (read_mask(mask.with_name("field0_masks.npy")) == good).all()
    mask.with_name("field0_masks.npy").unlink()
    tifffile.imwrite(mask, good)
    tifffile.imwrite(mask.with_name("field0_cp_masks.tif"), good)
    with pytest.raises(TprobeError, match="two masks fit it"):
        preprocess_fields(fields, masks, config, tmp_path / "c")


@pytest.mark.refuses(
    "`preprocess --fov` with `--data`, crop options without `--fov`, or an `--out` whose `crops/` tprobe did not write"
)
def test_cli_fields_to_store_and_an_empty_label_image_is_a_warning(tmp_path, tiny_reg):
    fields, masks, _, _ = make_fields(tmp_path, per_class=2, per_field=2)
    empty = masks / "donor_2" / "quiescent" / "field0_masks.tif"
    tifffile.imwrite(empty, np.zeros_like(tifffile.imread(empty)))
    r = CliRunner().invoke(
        main,
        [
            "preprocess",
            "--fov",
            str(fields),
            "--masks",
            str(masks),
            "--outside",
            "keep",
            "--out",
            str(tmp_path / "prep"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "warning: " in r.output and "field0_masks.tif: label image has no objects" in r.output
    pre = Preprocessed.load(tmp_path / "prep")  # the crops are verified like any kept file
    assert (
        pre.config.fov and pre.config.outside == "keep" and set(pre.kept["donor"]) == {"donor_1", "donor_2"}
    )
    r = CliRunner().invoke(
        main,
        [
            "extract",
            "--model",
            str(tiny_reg),
            "--data",
            str(tmp_path / "prep"),
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = pd.read_parquet(manifest_path(r.output.strip().splitlines()[-1]))
    assert {"field", "object", "bbox_y0", "centroid_x"} <= set(rows.columns)
    crop = Path(pre.kept["path"].iloc[0])
    tifffile.imwrite(crop, np.zeros((3, 3), np.uint8))
    with pytest.raises(TprobeError, match="changed or missing"):
        Preprocessed.load(tmp_path / "prep")
    r = CliRunner().invoke(main, ["preprocess", "--fov", str(fields), "--data", str(fields)])
    assert r.exit_code == 2 and "give one" in r.output
    r = CliRunner().invoke(main, ["preprocess", "--data", str(fields), "--masks", str(masks)])
    assert r.exit_code == 2 and "apply to fields of view: add --fov FIELDS" in r.output
    (tmp_path / "mine" / "crops").mkdir(parents=True)
    (tmp_path / "mine" / "crops" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(
        main, ["preprocess", "--fov", str(fields), "--masks", str(masks), "--out", str(tmp_path / "mine")]
    )
    assert r.exit_code == 2 and "holds notes.txt, which tprobe did not write" in r.output
    assert (tmp_path / "mine" / "crops" / "notes.txt").exists()


# ---- OME-TIFF -------------------------------------------------------------------------------------
def make_ome(root: Path, names=("nadh", "fad"), donors=("donor_1", "donor_2"), per_class: int = 4) -> Path:
    """Sample cells as 2-channel OME-TIFFs (the cell and a dimmer copy) with named channels, 0.5 µm pixels."""
    for donor in donors:
        for cls in ("activated", "quiescent"):
            (root / donor / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((DEFAULT_DATA / donor / cls).glob("*.png"))[:per_class]:
                img = np.asarray(Image.open(f))
                tifffile.imwrite(
                    root / donor / cls / f"{f.stem}.ome.tif",
                    np.stack([img, img // 2]),
                    ome=True,
                    metadata={
                        "axes": "CYX",
                        "Channel": {"Name": list(names)},
                        "PhysicalSizeX": 0.5,
                        "PhysicalSizeY": 0.5,
                        "PhysicalSizeXUnit": "µm",
                    },
                )
    return root


@pytest.mark.refuses("`--channels` that differ from an OME-TIFF's channel names")
def test_ome_tiff_channel_names_run_preprocess_extract_probe_without_channels(tmp_path, tiny_reg):
    data = make_ome(tmp_path / "ome")
    run = CliRunner().invoke
    r = run(main, ["preprocess", "--data", str(data), "--out", str(tmp_path / "prep")])
    assert r.exit_code == 0, r.output
    pre = Preprocessed.load(tmp_path / "prep")
    assert pre.config.channels == ("nadh", "fad") and pre.config.used_channels == ("nadh",)
    assert set(pre.kept["pixel_size_x"]) == {0.5} and set(pre.kept["pixel_size_unit"]) == {"µm"}
    r = run(
        main,
        [
            "extract",
            "--model",
            str(tiny_reg),
            "--data",
            str(tmp_path / "prep"),
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = run(
        main,
        [
            "probe",
            "--model",
            str(tiny_reg),
            "--data",
            str(tmp_path / "prep"),
            "--cache",
            str(tmp_path / "c"),
            "--head",
            "logreg",
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    # the grey channel the filters measured is the file's first channel, the sample's own cell image
    for path, entropy in zip(pre.kept["path"], pre.kept["entropy"], strict=True):
        png = DEFAULT_DATA / Path(path).parent.relative_to(data) / Path(path).name.replace(".ome.tif", ".png")
        assert entropy == measure(read_image(png))["entropy"]
    # straight from the image folder too, and --channels must be the file's names
    r = run(main, ["extract", "--model", str(tiny_reg), "--data", str(data), "--cache", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = run(
        main, ["preprocess", "--data", str(data), "--channels", "nadh,fadh", "--out", str(tmp_path / "p2")]
    )
    assert r.exit_code == 2 and "OME-XML names the channels nadh,fad, but --channels is nadh,fadh" in r.output


@pytest.mark.refuses("a TIFF with several time points or Z planes and no `--t` / `--z` (or one out of range)")
def test_a_5d_ome_tiff_needs_z_and_t(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 255, (2, 2, 3, 30, 30), dtype=np.uint8)  # T, C, Z, Y, X
    path = tmp_path / "donor_1" / "activated" / "s.ome.tif"
    path.parent.mkdir(parents=True)
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "TCZYX", "Channel": {"Name": ["a", "b"]}})
    ds = discover(tmp_path)
    with pytest.raises(
        ChannelError, match=r"s.ome.tif: .* its 2 planes are T, not channels .*choose one with --t"
    ):
        preprocess(ds, PreprocessConfig(channels=("a", "b")))
    with pytest.raises(
        ChannelError, match=r"its 3 planes are Z, not channels .*choose one with --z N \(0..2\)"
    ):
        preprocess(ds, PreprocessConfig(channels=("a", "b"), t=1))
    with pytest.raises(ChannelError, match=r"--z 3 is out of range; the file has 3 Z planes"):
        preprocess(ds, PreprocessConfig(channels=("a", "b"), t=1, z=3))
    from tprobe.data.preprocess import read_cell

    seg, used, _ = read_cell(
        path, PreprocessConfig(channels=("a", "b"), channel_mode="rgb", use=("b", "a", "b"), t=1, z=2)
    )
    np.testing.assert_array_equal(used[0], stack[1, 1, 2].astype(np.float32))
    np.testing.assert_array_equal(used[1], stack[1, 0, 2].astype(np.float32))
    r = CliRunner().invoke(
        main, ["preprocess", "--data", str(tmp_path), "--z", "1", "--out", str(tmp_path / "p")]
    )
    assert r.exit_code == 2 and "choose one with --t" in r.output


def test_predict_on_fields_scores_each_object_as_its_single_cell_and_draws_overlays(tmp_path, tiny_reg):
    fields, masks, singles, where = make_fields(tmp_path, per_class=3, per_field=3)
    # one more object touching the border of a field: kept as a row, not scored
    mask_file = masks / "donor_1" / "activated" / "field0_masks.tif"
    mask = tifffile.imread(mask_file)
    mask[0:3, 0:3] = 9
    tifffile.imwrite(mask_file, mask)
    run = CliRunner().invoke
    r = run(
        main, ["extract", "--model", str(tiny_reg), "--data", str(singles), "--cache", str(tmp_path / "c")]
    )
    assert r.exit_code == 0, r.output
    r = run(
        main,
        [
            "probe",
            "--model",
            str(tiny_reg),
            "--data",
            str(singles),
            "--cache",
            str(tmp_path / "c"),
            "--head",
            "logreg",
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path / "runs"),
        ],
    )
    assert r.exit_code == 0, r.output
    run_dir = r.output.strip().splitlines()[-1]
    r = run(
        main,
        [
            "predict",
            "--run",
            run_dir,
            str(singles),
            "--cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "single.csv"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = run(
        main,
        [
            "predict",
            "--run",
            run_dir,
            str(fields),
            "--masks",
            str(masks),
            "--cache",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "fields.csv"),
        ],
    )
    assert r.exit_code == 0, r.output
    single = pd.read_csv(tmp_path / "single.csv")
    objects = pd.read_csv(tmp_path / "fields.csv")
    assert len(objects) == len(where) + 1 and {"field", "object", "bbox_y0", "centroid_x"} <= set(
        objects.columns
    )
    border = objects[objects["object"] == 9]
    assert border["drop_reason"].tolist() == ["touches_border"] and border["p_activated"].isna().all()
    p_single = dict(zip(single["path"].map(lambda p: Path(p).name), single["p_activated"], strict=True))
    scored = objects[objects["object"] != 9]
    for field, obj, p in zip(scored["field"], scored["object"], scored["p_activated"], strict=True):
        assert p == pytest.approx(p_single[where[(field, obj)]], rel=0, abs=1e-12) or (
            np.isnan(p) and np.isnan(p_single[where[(field, obj)]])
        )
    pngs = sorted(p.name for p in (tmp_path / "fields-overlays").glob("*.png"))
    assert pngs == sorted(
        f"{d}-{c}-field0.png" for d in ("donor_1", "donor_2") for c in ("activated", "quiescent")
    )
    assert "overlays: " in r.output and "not scored: " in r.output and "object 9: touches_border" in r.output


def test_ome_fields_give_named_multichannel_crops_with_their_pixel_size(tmp_path):
    rng = np.random.default_rng(1)
    field = np.zeros((2, 40, 50), np.uint16)
    field[:, 8:20, 10:24] = rng.integers(100, 4000, (2, 12, 14))
    mask = np.zeros((40, 50), np.uint8)
    mask[8:20, 10:24] = 5
    folder = tmp_path / "fields" / "donor_1" / "quiescent"
    folder.mkdir(parents=True)
    tifffile.imwrite(
        folder / "f.ome.tif",
        field,
        ome=True,
        metadata={
            "axes": "CYX",
            "Channel": {"Name": ["nadh", "fad"]},
            "PhysicalSizeX": 0.25,
            "PhysicalSizeY": 0.25,
        },
    )
    Image.fromarray(mask).save(tmp_path / "fields" / "donor_1" / "quiescent" / "f_cp_masks.png")
    pre, _ = preprocess_fields(
        tmp_path / "fields", None, PreprocessConfig(max_value=4095), tmp_path / "o" / "crops"
    )
    assert pre.config.channels == ("nadh", "fad")
    row = pre.manifest.iloc[0]
    assert row["object"] == 5 and row["label"] == 0 and row["pixel_size_x"] == 0.25
    np.testing.assert_array_equal(tifffile.imread(row["path"]), field[:, 8:20, 10:24])
    with pytest.raises(ChannelError, match="OME-XML names the channels nadh,fad, but --channels is fad,nadh"):
        preprocess_fields(
            tmp_path / "fields", None, PreprocessConfig(channels=("fad", "nadh")), tmp_path / "o2"
        )


def test_a_fields_table_gives_labels_and_donors(tmp_path):
    fields, masks, _, where = make_fields(tmp_path, donors=("donor_1",), per_class=2, per_field=2)
    rows = [
        {
            "image": str(Path(f).relative_to(tmp_path)),
            "label": "activated" if "/activated/" in f else 0,
            "donor": "patient_7",
            "mask": str(
                (masks / Path(f).relative_to(fields)).with_name("field0_masks.tif").relative_to(tmp_path)
            ),
        }
        for f in sorted({f for f, _ in where})
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "fields.csv", index=False)
    pre, _ = preprocess_fields(
        tmp_path / "fields.csv", None, PreprocessConfig(outside="keep"), tmp_path / "o" / "crops"
    )
    orig = pre.manifest[pre.manifest["view"] == "orig"]
    assert len(orig) == len(where) and set(orig["donor"]) == {"patient_7"}
    assert sorted(orig.groupby("label").size().tolist()) == [2, 2]
    pd.DataFrame([{**rows[0], "mask": "gone.tif"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(TprobeError, match=r"bad.csv: line 2 .*mask gone.tif of .* is missing"):
        preprocess_fields(tmp_path / "bad.csv", None, PreprocessConfig(), tmp_path / "o2" / "crops")


@pytest.mark.refuses("a fields table listing one field twice (both lines named)")
def test_a_fields_table_listing_one_field_twice_names_both_lines(tmp_path):
    """Twice, with two labels: its crops were cut twice to one file and the second row's cells dropped as
    'same content as' themselves; as for single-cell manifests, both lines are named."""
    fields, masks, _, where = make_fields(tmp_path, donors=("donor_1",), per_class=2, per_field=2)
    rows = [
        {"image": f, "label": "activated" if "/activated/" in f else 0, "mask": str(m)}
        for f in sorted({f for f, _ in where})
        for m in [(masks / Path(f).relative_to(fields)).with_name("field0_masks.tif")]
    ]
    pd.DataFrame([*rows, {**rows[0], "label": 0}]).to_csv(tmp_path / "fields.csv", index=False)
    with pytest.raises(TprobeError, match=r"fields.csv: lines 2 and 4 .* both list .*field0.png"):
        preprocess_fields(tmp_path / "fields.csv", None, PreprocessConfig(), tmp_path / "o" / "crops")


@pytest.mark.refuses("a fields table with an empty donor cell")
def test_a_fields_table_with_an_empty_donor_is_one_line_not_donor_nan(tmp_path):
    fields, masks, _, where = make_fields(tmp_path, donors=("donor_1",), per_class=2, per_field=2)
    rows = [
        {"image": f, "label": 1 if "/activated/" in f else 0, "mask": str(m), "donor": "p7"}
        for f in sorted({f for f, _ in where})
        for m in [(masks / Path(f).relative_to(fields)).with_name("field0_masks.tif")]
    ]
    rows[1]["donor"] = ""  # read as NaN: its cells formed a donor 'nan'
    pd.DataFrame(rows).to_csv(tmp_path / "fields.csv", index=False)
    with pytest.raises(TprobeError, match=r"fields.csv: 1 row\(s\) have an empty donor \(line 3\)"):
        preprocess_fields(tmp_path / "fields.csv", None, PreprocessConfig(), tmp_path / "o" / "crops")


@pytest.mark.refuses("one field file found in two class folders (skipped once, both named)")
def test_a_field_found_twice_is_skipped_once_with_a_line_naming_both(tmp_path):
    """The same field in two class folders: its cells were cut twice to one crop file, the second copy's
    cells dropped as 'same content as' that same file, and its border objects counted twice."""
    fields, masks, _, where = make_fields(tmp_path, donors=("donor_1",), per_class=2, per_field=2)
    src = fields / "donor_1" / "activated" / "field0.png"
    shutil.copy(src, fields / "donor_1" / "quiescent" / "field9.png")
    shutil.copy(
        masks / "donor_1" / "activated" / "field0_masks.tif",
        masks / "donor_1" / "quiescent" / "field9_masks.tif",
    )
    pre, _ = preprocess_fields(fields, masks, PreprocessConfig(), tmp_path / "o" / "crops")
    lines = [str(s) for s in pre.skipped]
    assert len(lines) == 1 and "field9.png: same content as" in lines[0] and "field0.png" in lines[0]
    orig = pre.manifest[pre.manifest["view"] == "orig"]
    assert len(orig) == len(where) and not orig["path"].str.contains("field9").any()


@pytest.mark.refuses("a binary mask (one value in several pieces) given as a label image")
@pytest.mark.parametrize("on", [1, 255])
def test_a_binary_mask_of_several_cells_is_one_line_not_one_object(tmp_path, on):
    # a 0/1 or 0/255 segmentation mask is one object spanning every cell: it was cut to one crop of
    # the whole field and dropped as multi_cell (or touches_border), without a line
    fields, masks, _, _ = make_fields(tmp_path, donors=("donor_1",), per_class=3, per_field=3)
    mask = masks / "donor_1" / "activated" / "field0_masks.tif"
    labels = tifffile.imread(mask)
    tifffile.imwrite(mask, ((labels > 0) * on).astype(np.uint8))
    with pytest.raises(
        TprobeError, match=r"field0_masks.tif: a binary mask .*3 separate .*skimage.measure.label"
    ):
        preprocess_fields(fields, masks, PreprocessConfig(), tmp_path / "c")
    # a label image with a single cell (one object, one piece) is fine, whatever its value
    one = np.where(labels == 2, on, 0).astype(np.uint8)
    tifffile.imwrite(mask, one)
    assert (read_mask(mask) == one).all()


def test_huge_label_ids_are_cut_and_drawn_as_their_objects_without_one_entry_per_id(tmp_path):
    """Label ids near 4e9 in a uint32 mask (ids hashed or offset per tile): find_objects, bincount and
    the overlay's score table allocated one entry per id up to the largest (tens of GB: MemoryError, or
    the process killed). The objects are now numbered 1..n for the work, and keep their own ids."""
    from tprobe.data.fov import draw_overlay

    fields, masks, _, _ = make_fields(tmp_path, donors=("donor_1",), per_class=3, per_field=3)
    mask_file = masks / "donor_1" / "activated" / "field0_masks.tif"
    ref, _ = preprocess_fields(fields, masks, PreprocessConfig(), tmp_path / "ref" / "crops")
    labels = tifffile.imread(mask_file)
    big = {1: 4_294_967_000, 2: 7, 3: 3_000_000_001}
    huge = np.zeros(labels.shape, np.uint32)
    for k, v in big.items():
        huge[labels == k] = v
    tifffile.imwrite(mask_file, huge)
    pre, _ = preprocess_fields(fields, masks, PreprocessConfig(), tmp_path / "o" / "crops")
    cols = ["area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "crop_id"]

    def objects(p):
        orig = p.manifest[(p.manifest["view"] == "orig") & p.manifest["field"].str.contains("activated")]
        return orig.set_index("object")

    got, want = objects(pre), objects(ref)
    assert sorted(got.index) == sorted(big.values())
    for k, v in big.items():
        assert got.loc[v, cols].tolist() == want.loc[k, cols].tolist()
        assert got.loc[v, "source_id"] == f"{got.loc[v, 'field_id']}_{v}"
    png = draw_overlay(
        fields / "donor_1" / "activated" / "field0.png",
        mask_file,
        {big[1]: 0.9, 7: float("nan"), big[3]: 0.1},
        PreprocessConfig(),
        tmp_path / "overlay.png",
    )
    assert png.stat().st_size > 0


def test_predict_on_fields_gives_a_skipped_field_its_row(tmp_path, tiny_reg):
    """A field predict cannot cut (unreadable, or a copy of another field) had no CSV row, only a
    'skipped:' line, though predict gives every input its row: it has one, kept False, with its reason."""
    fields, masks, singles, where = make_fields(tmp_path, per_class=2, per_field=2)
    here, there = fields / "donor_1" / "activated", masks / "donor_1" / "activated"
    (here / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    shutil.copy(there / "field0_masks.tif", there / "broken_masks.tif")
    shutil.copy(here / "field0.png", here / "field7.png")  # the same field twice
    shutil.copy(there / "field0_masks.tif", there / "field7_masks.tif")
    run = CliRunner().invoke
    cache = ["--cache", str(tmp_path / "c")]
    r = run(main, ["extract", "--model", str(tiny_reg), "--data", str(singles), *cache])
    assert r.exit_code == 0, r.output
    r = run(
        main,
        ["probe", "--model", str(tiny_reg), "--data", str(singles), *cache, "--head", "logreg"]
        + ["--bootstrap", "20", "--out", str(tmp_path / "runs")],
    )
    assert r.exit_code == 0, r.output
    run_dir = r.output.strip().splitlines()[-1]
    csv = tmp_path / "fields.csv"
    r = run(
        main, ["predict", "--run", run_dir, str(fields), "--masks", str(masks), *cache, "--out", str(csv)]
    )
    assert r.exit_code == 0, r.output
    objects = pd.read_csv(csv)
    assert len(objects) == len(where) + 2
    bad = objects[objects["field"].str.endswith(("broken.png", "field7.png"))].set_index("field")
    assert {Path(f).name: why for f, why in bad["drop_reason"].items()} == {
        "broken.png": "unreadable",
        "field7.png": "duplicate",
    }
    assert not bad["kept"].any() and bad["p_activated"].isna().all() and bad["object"].isna().all()
    assert bad["mask"].map(lambda m: Path(m).name).tolist() == ["broken_masks.tif", "field7_masks.tif"]
    assert f"not scored: {here / 'broken.png'}: unreadable" in r.output
    pngs = sorted(p.name for p in (tmp_path / "fields-overlays").glob("*.png"))
    assert "donor_1-activated-broken.png" not in pngs and "donor_1-activated-field0.png" in pngs
