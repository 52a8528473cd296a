"""Multi-channel 16-bit input: stacks and per-channel files, grey / rgb / per-channel modes, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from click.testing import CliRunner
from PIL import Image

from tprobe.cache.extract import extract, manifest_path
from tprobe.cache.store import FeatureStore
from tprobe.cli import main
from tprobe.data.dataset import DEFAULT_DATA, discover
from tprobe.data.images import read_channels
from tprobe.data.preprocess import PreprocessConfig, load_view, preprocess
from tprobe.errors import ChannelError, TprobeError
from tprobe.models.backbones import Backbone, resolve_model
from tprobe.runs.record import RunRecord
from tprobe.testing import SYNTHETIC_CHANNELS, make_multichannel, save_random_vit

CH = ",".join(SYNTHETIC_CHANNELS)  # nadh,fad,mask
MAX = "nadh=4095,fad=4095,mask=65535"
DONORS = ("donor_1", "donor_2", "donor_3")


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacks")
    return {
        lay: make_multichannel(root / lay, layout=lay, donors=DONORS, per_class=3)
        for lay in ("chw", "hwc", "files")
    }


@pytest.fixture(scope="module")
def dinov3(tmp_path_factory):
    return save_random_vit(tmp_path_factory.mktemp("m") / "dinov3", model_type="dinov3_vit")


def _a_cell(folder, suffix=".tif"):
    return sorted((folder / "donor_1" / "activated").glob(f"*{suffix}"))[0]


def test_the_three_layouts_read_the_same_channels_on_their_own_scales(stacks):
    src = _a_cell(stacks["chw"])
    png = np.asarray(Image.open(DEFAULT_DATA / "donor_1" / "activated" / f"{src.stem}.png")).astype(
        np.float64
    )
    tops = (4095.0, 4095.0, 65535.0)
    chw, dtype = read_channels(src, SYNTHETIC_CHANNELS, max_value=tops)
    hwc, _ = read_channels(stacks["hwc"] / src.relative_to(stacks["chw"]), SYNTHETIC_CHANNELS, max_value=tops)
    template = stacks["files"] / src.relative_to(stacks["chw"]).with_name(src.stem + "_{channel}.tif")
    files, _ = read_channels(template, SYNTHETIC_CHANNELS, max_value=tops)
    assert dtype == "uint16" and chw.shape == (3, *png.shape)
    np.testing.assert_array_equal(chw, hwc)
    np.testing.assert_array_equal(chw, files)
    # nadh = 8-bit x 16 on a 12-bit camera: scaled by 255 / 4095, never clipped
    np.testing.assert_allclose(chw[0], png * 16 * 255 / 4095, rtol=1e-6)
    assert set(np.unique(chw[2])) <= {0.0, 255.0}  # the mask at 65535 of 65535
    # one value for all channels scales nadh by 255 / 65535 instead
    one, _ = read_channels(src, SYNTHETIC_CHANNELS, max_value=65535.0)
    np.testing.assert_allclose(one[0], png * 16 * 255 / 65535, rtol=1e-6)
    with pytest.raises(TprobeError, match="exceeds --max-value 100"):
        read_channels(src, SYNTHETIC_CHANNELS, max_value=100.0)


def test_per_channel_files_are_grouped_into_one_row_per_cell(stacks):
    ds = discover(stacks["files"], channel_files="{cell}_{channel}", channels=SYNTHETIC_CHANNELS)
    assert len(ds.table) == len(discover(stacks["chw"]).table) == 18 and not ds.skipped
    assert all(p.endswith("_{channel}.tif") for p in ds.table["path"])
    # Wang-style names still parse through the template
    assert set(ds.table["donor"]) == set(DONORS) and ds.table["label"].sum() == 9


@pytest.mark.parametrize(
    "mode, layout, use, width",
    [
        ("grey", "chw", None, 32),
        ("rgb", "hwc", None, 32),
        ("per-channel", "files", "nadh,fad", 64),
    ],
)
def test_each_mode_runs_preprocess_extract_probe(stacks, dinov3, tmp_path, mode, layout, use, width):
    args = [
        "--data",
        str(stacks[layout]),
        "--channels",
        CH,
        "--channel-mode",
        mode,
        "--max-value",
        MAX,
        "--views",
        "orig",
        "--canvas",
        "144",
    ]
    args += ["--use", use] if use else []
    args += ["--channel-files", "{cell}_{channel}"] if layout == "files" else []
    r = CliRunner().invoke(main, ["preprocess", *args, "--out", str(tmp_path / "pre")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "pre" / "preprocess.json").read_text())["config"]
    assert saved["channels"] == list(SYNTHETIC_CHANNELS) and saved["max_value"] == [4095, 4095, 65535]
    common = ["--model", str(dinov3), "--data", str(tmp_path / "pre"), "--cache", str(tmp_path / "c")]
    r = CliRunner().invoke(main, ["extract", *common])
    assert r.exit_code == 0, r.output
    store = FeatureStore.open(next((tmp_path / "c").rglob("*.zarr")))
    n = store.n
    assert n >= 12  # a few of the 18 cells fall to the filters
    if mode == "per-channel":
        assert store.channels == ["nadh", "fad"] and store.shapes["cls"] == (n, 2, 32)
        assert store.shapes["patches"] == (n, 2, 81, 32) and store.num_registers == 4
    else:
        assert store.channels == [] and store.shapes["cls"] == (n, 32)
    assert store.attrs["channel_mode"] == mode and store.attrs["preprocess"]["channels"] == list(
        SYNTHETIC_CHANNELS
    )
    assert store.pooled("cls").shape == (n, width)
    r = CliRunner().invoke(
        main, ["probe", *common, "--head", "logreg", "--pool", "cls+mean", "--out", str(tmp_path / "runs")]
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert 0.0 <= metrics["summary"]["roc_auc"]["mean"] <= 1.0
    assert [f["test_donor"] for f in metrics["folds"]] == list(DONORS)
    r = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    used = use.replace(",", "+") if use else {"grey": "nadh", "rgb": "nadh+fad+mask"}[mode]
    assert f"{mode} {used}" in (tmp_path / "rep" / "report.md").read_text()  # the report names the channels


def test_per_channel_tokens_are_each_channels_own_forward(stacks, dinov3, tmp_path):
    from transformers import AutoModel

    cfg = PreprocessConfig(
        channels=SYNTHETIC_CHANNELS,
        channel_mode="per-channel",
        use=("fad", "nadh"),
        max_value=(4095.0, 4095.0, 65535.0),
        views="six",
        canvas=144,
    )
    pre = preprocess(discover(stacks["chw"]), cfg)
    res = extract(
        pre,
        resolve_model(str(dinov3)),
        cache=tmp_path,
        dtype="float32",
        chunk_rows=8,
        batch_size=5,
        progress=False,
        device="cpu",
    )
    store = FeatureStore.open(res.path)
    manifest = pd.read_parquet(manifest_path(res.path))
    rows = [0, 7, len(manifest) - 1]
    views = np.stack([load_view(manifest.path[i], manifest.view[i], cfg) for i in rows])  # (3, 2, 144, 144)
    assert views.shape == (3, 2, 144, 144)
    net = AutoModel.from_pretrained(str(dinov3)).eval()
    bb = Backbone.from_pretrained(str(dinov3), device="cpu")
    cls, patches = store.read("cls"), store.read("patches")
    for c, name in enumerate(("fad", "nadh")):  # --use order is the channel axis order
        with torch.inference_mode():
            hidden = net(
                pixel_values=bb.pixel_values(torch.from_numpy(views[:, c]))
            ).last_hidden_state.numpy()
        np.testing.assert_allclose(cls[rows, c], hidden[:, 0], atol=1e-5)
        np.testing.assert_allclose(patches[rows, c], hidden[:, 5:], atol=1e-5)
        assert store.channels[c] == name
    # poolings are per channel, concatenated in channel order
    mean = store.pooled("mean")
    np.testing.assert_allclose(mean[:, :32], patches[:, 0].mean(1), atol=1e-5)
    np.testing.assert_allclose(mean[:, 32:], patches[:, 1].mean(1), atol=1e-5)


def test_rgb_mode_feeds_the_chosen_channels_as_r_g_b(stacks, dinov3, tmp_path):
    from transformers import AutoModel

    cfg = PreprocessConfig(
        channels=SYNTHETIC_CHANNELS,
        channel_mode="rgb",
        use=("fad", "mask", "nadh"),
        max_value=(4095.0, 4095.0, 65535.0),
        views="orig",
        canvas=144,
    )
    pre = preprocess(discover(stacks["hwc"]), cfg)
    res = extract(pre, resolve_model(str(dinov3)), cache=tmp_path, dtype="float32", progress=False)
    manifest = pd.read_parquet(manifest_path(res.path))
    img = load_view(manifest.path[0], "orig", cfg)
    stack, _ = read_channels(manifest.path[0], SYNTHETIC_CHANNELS, max_value=cfg.max_value)
    np.testing.assert_allclose(img[0].sum(), stack[1].sum() / 255, rtol=1e-5)  # R = fad
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    x = torch.from_numpy(((img - mean) / std)[None].astype(np.float32))
    with torch.inference_mode():
        hidden = AutoModel.from_pretrained(str(dinov3)).eval()(pixel_values=x).last_hidden_state.numpy()
    np.testing.assert_allclose(FeatureStore.open(res.path).read("cls")[0], hidden[0, 0], atol=1e-5)


def test_one_grey_channel_keeps_the_key_and_tokens_of_tprobe_02(small_data, tiny_reg, tmp_path):
    # the preprocess hash keys every store: a one-channel config must hash as in 0.2 (value from commit be88b31)
    assert (
        PreprocessConfig().hash == "79b1fddc01c2" and PreprocessConfig(max_value=4095).hash == "307624abf55d"
    )
    assert "channels" not in PreprocessConfig().to_dict()
    pre = preprocess(discover(small_data), PreprocessConfig(views="orig"))
    named = preprocess(discover(small_data), PreprocessConfig(views="orig", channels=("nadh",)))
    ref = resolve_model(str(tiny_reg))
    a = FeatureStore.open(extract(pre, ref, cache=tmp_path / "a", progress=False).path)
    b = FeatureStore.open(extract(named, ref, cache=tmp_path / "b", progress=False).path)
    assert "channels" not in a.attrs and b.attrs["channels"] == ["nadh"]
    for name in ("cls", "registers", "patches"):
        assert a.read(name).tobytes() == b.read(name).tobytes()


def test_filters_measure_the_segmentation_channel(stacks):
    base = dict(channels=SYNTHETIC_CHANNELS, max_value=(4095.0, 4095.0, 65535.0), views="orig")
    by_nadh = preprocess(discover(stacks["chw"]), PreprocessConfig(**base)).manifest
    by_fad = preprocess(discover(stacks["chw"]), PreprocessConfig(**base, segment_channel="fad")).manifest
    by_mask = preprocess(discover(stacks["chw"]), PreprocessConfig(**base, segment_channel="mask")).manifest
    one = read_channels(by_nadh.path[0], SYNTHETIC_CHANNELS, max_value=base["max_value"])[0]
    assert by_nadh.total_intensity[0] == pytest.approx(one[0].sum())
    assert by_fad.total_intensity[0] == pytest.approx(one[1].sum())
    # a two-valued mask has under 1 bit of entropy: the dim filter drops every cell when it is the segment channel
    assert (by_mask.entropy < 1).all() and (by_mask.drop_reason == "dim").all()


def _one_line_exit_2(r):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    return lines[0]


def test_a_stack_with_another_channel_count_is_one_line(stacks, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "preprocess",
            "--data",
            str(stacks["chw"]),
            "--channels",
            "nadh,fad",
            "--out",
            str(tmp_path / "pre"),
        ],
    )
    line = _one_line_exit_2(r)
    assert ".tif" in line and "has 3 channels" in line and "--channels names 2 (nadh,fad)" in line
    assert not (tmp_path / "pre").exists()


def test_mixed_bit_depths_are_one_line(stacks, tmp_path):
    data = tmp_path / "mixed"
    make_multichannel(data, layout="chw", donors=("donor_1",), per_class=2)
    victim = sorted((data / "donor_1" / "quiescent").glob("*.tif"))[-1]
    tifffile.imwrite(victim, (tifffile.imread(victim) // 257).astype(np.uint8), photometric="minisblack")
    r = CliRunner().invoke(
        main, ["preprocess", "--data", str(data), "--channels", CH, "--out", str(tmp_path / "p")]
    )
    line = _one_line_exit_2(r)
    assert victim.name in line and "8-bit" in line and "16-bit" in line
    assert not (tmp_path / "p").exists()
    # within one cell's channel files, too
    files = tmp_path / "files"
    make_multichannel(files, layout="files", donors=("donor_1",), per_class=1)
    fad = next(files.rglob("*_fad.tif"))
    tifffile.imwrite(fad, (tifffile.imread(fad) // 257).astype(np.uint8))
    with pytest.raises(ChannelError, match="8-bit, but channel nadh of this cell is 16-bit"):
        read_channels(str(fad).replace("_fad", "_{channel}"), SYNTHETIC_CHANNELS)


def test_a_missing_channel_file_is_one_line(tmp_path):
    data = make_multichannel(tmp_path / "files", layout="files", donors=("donor_1",), per_class=2)
    gone = sorted(data.rglob("*_fad.tif"))[1]
    gone.unlink()
    r = CliRunner().invoke(
        main,
        [
            "preprocess",
            "--data",
            str(data),
            "--channels",
            CH,
            "--channel-files",
            "{cell}_{channel}",
            "--out",
            str(tmp_path / "pre"),
        ],
    )
    line = _one_line_exit_2(r)
    assert str(gone) in line and "missing" in line and "add the fad file" in line
    assert not (tmp_path / "pre").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--channel-mode", "rgb", "--channels", "a,b"], "rgb uses 3 channel(s), got 2"),
        (["--channels", "a,b", "--use", "c"], "channel 'c' is not one of --channels a,b"),
        (["--channel-mode", "per-channel"], "need --channels"),
        (["--channels", "a,b", "--max-value", "a=4095"], "give NAME=NUMBER for each of --channels a,b"),
        (  # a channel named twice: the second value was taken, the first dropped without a line
            ["--channels", "a,b", "--max-value", "a=4095,a=65535,b=4095"],
            "names a twice; give NAME=NUMBER once for each of --channels a,b",
        ),
        (["--channels", "a,a"], "names must be non-empty and unique"),
        (["--channels", "a,b", "--channel-files", "{channel}"], "must hold {cell} and {channel}"),
    ],
)
def test_channel_options_are_checked_in_one_line(small_data, tmp_path, args, says):
    r = CliRunner().invoke(
        main, ["preprocess", "--data", str(small_data), *args, "--out", str(tmp_path / "p")]
    )
    assert says in _one_line_exit_2(r)


def test_xarray_names_the_channel_axis(stacks, tiny_reg, tmp_path):
    xr = pytest.importorskip("xarray")
    cfg = PreprocessConfig(
        channels=SYNTHETIC_CHANNELS,
        channel_mode="per-channel",
        views="orig",
        max_value=(4095.0, 4095.0, 65535.0),
    )
    res = extract(
        preprocess(discover(stacks["chw"]), cfg), resolve_model(str(tiny_reg)), cache=tmp_path, progress=False
    )
    ds = xr.open_zarr(res.path, consolidated=False)
    assert ds["cls"].dims == ("rows", "channel", "hidden")
    assert ds["patches"].dims == ("rows", "channel", "patch", "hidden") and ds.sizes["channel"] == 3
    np.testing.assert_array_equal(
        ds["cls"].sel(channel="fad").values, FeatureStore.open(res.path).read("cls")[:, 1]
    )
    h5 = extract(
        preprocess(discover(stacks["chw"]), cfg),
        resolve_model(str(tiny_reg)),
        cache=tmp_path,
        fmt="hdf5",
        progress=False,
    )
    import h5py

    with h5py.File(h5.path) as f:
        assert [d.label for d in f["registers"].dims] == ["rows", "channel", "register", "hidden"]
    np.testing.assert_array_equal(
        FeatureStore.open(h5.path).pooled("concat"), FeatureStore.open(res.path).pooled("concat")
    )


def test_finetune_and_lenet_take_rgb_and_refuse_or_adapt_to_per_channel(stacks, tiny_reg, tmp_path):
    data = ["--data", str(stacks["chw"]), "--channels", CH, "--max-value", MAX, "--views", "orig"]
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(tiny_reg),
            *data,
            "--channel-mode",
            "rgb",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "ft"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "rgb nadh+fad+mask" in RunRecord.load(next((tmp_path / "ft").iterdir())).title
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(tiny_reg),
            *data,
            "--channel-mode",
            "per-channel",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "ft2"),
        ],
    )
    assert "use --channel-mode grey or rgb" in _one_line_exit_2(r)
    r = CliRunner().invoke(
        main,
        [
            "baseline",
            "--name",
            "lenet",
            *data,
            "--channel-mode",
            "per-channel",
            "--use",
            "nadh,fad",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(next((tmp_path / "b").rglob("metrics.json")).read_text())["folds"]


@pytest.mark.parametrize("value", ["nan", "0", "-1", "nadh=4095,fad=inf,mask=1"])
def test_a_max_value_that_is_no_camera_range_is_one_line(stacks, tmp_path, value):
    r = CliRunner().invoke(
        main,
        [
            "preprocess",
            "--data",
            str(stacks["chw"]),
            "--channels",
            CH,
            "--max-value",
            value,
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert "must be a positive number" in _one_line_exit_2(r) and not (tmp_path / "p").exists()


def test_an_interleaved_stack_whose_height_is_the_channel_count_keeps_its_channels(tmp_path):
    hwc = np.stack([np.full((3, 5), v, np.uint16) for v in (10, 20, 30)], axis=-1)  # (H=3, W=5, C=3)
    tifffile.imwrite(tmp_path / "s.tif", hwc, photometric="rgb")
    chw = np.moveaxis(hwc, -1, 0).copy()  # (C=3, H=3, W=5) as pages
    tifffile.imwrite(tmp_path / "p.tif", chw, photometric="minisblack")
    for name in ("s.tif", "p.tif"):
        planes, _ = read_channels(tmp_path / name, "a,b,c", max_value=255.0)
        assert [float(p.mean()) for p in planes] == [10.0, 20.0, 30.0] and planes.shape == (3, 3, 5)
    rgba = np.dstack([hwc.astype(np.uint8), np.full((3, 5), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")  # an opaque alpha is no fourth channel
    assert [float(p.mean()) for p in read_channels(tmp_path / "c.png", "r,g,b")[0]] == [10.0, 20.0, 30.0]
    with pytest.raises(
        ChannelError, match=r"has 3 channels \(interleaved, shape \(3, 5, 3\)\), but --channels names 2"
    ):
        read_channels(tmp_path / "s.tif", "a,b")


def test_channel_files_of_one_cell_with_different_suffixes_are_one_line(tmp_path):
    data = make_multichannel(tmp_path / "f", layout="files", donors=("donor_1",), per_class=1)
    fad = next(data.rglob("*_fad.tif"))
    fad.rename(fad.with_suffix(".TIF"))
    with pytest.raises(ChannelError, match=r"channel files end in \.TIF, \.tif; give every channel file"):
        discover(data, channel_files="{cell}_{channel}", channels=SYNTHETIC_CHANNELS)


def test_predict_finds_a_per_channel_cell_from_one_file_and_lists_strays(tmp_path):
    from tprobe.data.dataset import discover_unlabelled

    data = make_multichannel(tmp_path / "f", layout="files", donors=("donor_1",), per_class=2)
    folder = data / "donor_1" / "activated"
    (folder / "stray.tif").write_bytes((folder / next(folder.glob("*_fad.tif")).name).read_bytes())
    ds = discover_unlabelled(folder, channel_files="{cell}_{channel}", channels=SYNTHETIC_CHANNELS)
    assert len(ds.table) == 2 and [Path(s.path).name for s in ds.skipped] == ["stray.tif"]
    one = sorted(folder.glob("*_nadh.tif"))[0]
    ds = discover_unlabelled(one, channel_files="{cell}_{channel}", channels=SYNTHETIC_CHANNELS)
    assert ds.table["path"].tolist() == [str(one).replace("_nadh.tif", "_{channel}.tif")]
    assert ds.table["label"].tolist() == [1]  # the Wang name parses through the template


def test_a_template_without_channels_and_an_empty_channel_name_are_one_line(stacks, small_data, tmp_path):
    table = tmp_path / "cells.csv"
    cell = next((stacks["files"] / "donor_1" / "activated").glob("*_nadh.tif"))
    table.write_text(f"path,label,donor\n{str(cell).replace('_nadh', '_{channel}')},1,d1\n")
    from tprobe.errors import ChannelError as CE

    with pytest.raises(CE, match="is a per-channel template; pass --channels"):
        preprocess(discover(table), PreprocessConfig())
    r = CliRunner().invoke(
        main, ["preprocess", "--data", str(small_data), "--channels", "a,,b", "--out", str(tmp_path / "p")]
    )
    assert "names must be non-empty" in _one_line_exit_2(r)


def test_a_channel_the_model_and_the_filters_do_not_read_is_not_range_checked(stacks):
    # the mask is at 65535; with --max-value 4095 for every channel only a read mask would be out of range
    cfg = PreprocessConfig(
        channels=SYNTHETIC_CHANNELS,
        channel_mode="per-channel",
        use=("nadh", "fad"),
        max_value=4095.0,
        views="orig",
    )
    assert len(preprocess(discover(stacks["chw"]), cfg).kept) > 0
    with_mask = PreprocessConfig(channels=SYNTHETIC_CHANNELS, channel_mode="per-channel", max_value=4095.0)
    with pytest.raises(
        TprobeError, match=r"--max-value 4095 is below the data: 18 of 18 images .* channel mask"
    ):
        preprocess(discover(stacks["chw"]), with_mask)  # refused once, never cells skipped by brightness


def test_a_stack_without_channels_stops_in_one_line_and_inception_refuses_per_channel(stacks, tmp_path):
    r = CliRunner().invoke(main, ["preprocess", "--data", str(stacks["chw"]), "--out", str(tmp_path / "p")])
    assert "name a stack's planes with --channels" in _one_line_exit_2(r) and not (tmp_path / "p").exists()
    r = CliRunner().invoke(
        main,
        [
            "baseline",
            "--name",
            "inception-frozen",
            "--inception-weights",
            "random",
            "--data",
            str(stacks["chw"]),
            "--channels",
            CH,
            "--channel-mode",
            "per-channel",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert "use --channel-mode grey or rgb" in _one_line_exit_2(r) and not (tmp_path / "b").exists()
