import numpy as np
import pytest
from conftest import copy_subset, save_png

from tprobe.data.dataset import discover
from tprobe.data.preprocess import PreprocessConfig, apply_view, measure, pad_to_canvas, preprocess
from tprobe.errors import TprobeError


def test_entropy_of_known_histograms():
    two = np.array([[0, 255] * 8] * 4, dtype=np.float32)  # two equal bins -> 1 bit
    assert measure(two)["entropy"] == pytest.approx(1.0)
    flat = np.arange(256, dtype=np.float32).reshape(16, 16)  # uniform over 256 -> 8 bits
    assert measure(flat)["entropy"] == pytest.approx(8.0)
    assert measure(np.full((5, 5), 7.0))["entropy"] == 0.0
    assert measure(flat)["total_intensity"] == pytest.approx(255 * 256 / 2)


def test_component_count_ignores_specks_and_uses_4_connectivity():
    img = np.zeros((40, 40), np.float32)
    img[2:10, 2:10] = 200  # 64 px cell
    img[20:28, 20:28] = 200  # a second 64 px cell
    img[35, 35] = 200  # 1 px speck: ignored
    assert measure(img)["n_components"] == 2
    diag = np.zeros((20, 20), np.float32)
    diag[0:6, 0:6] = diag[6:12, 6:12] = 200  # touch only at a corner: two under 4-connectivity
    assert measure(diag)["n_components"] == 2
    assert measure(img, PreprocessConfig(min_component_area=100))["n_components"] == 0
    img[10, 2:10] = 200  # bridge below threshold area? no: joins nothing, still two cells
    assert measure(img)["n_components"] == 2


def test_components_label_as_scikit_image_does():
    """The labeller called on the mask's bytes gives skimage.measure.label(connectivity=1)'s labels."""
    from skimage.measure import label

    from tprobe.data.preprocess import _components

    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = rng.random((rng.integers(1, 50), rng.integers(1, 50))) < rng.random()
        np.testing.assert_array_equal(_components(mask), label(mask, connectivity=1))
    strided = rng.random((40, 40)) < 0.5  # a non-contiguous view
    np.testing.assert_array_equal(_components(strided[::2, 1::3]), label(strided[::2, 1::3], connectivity=1))


def test_components_fall_back_to_the_public_label(monkeypatch):
    """A scikit-image without the private labeller: the public function, the same count."""
    import sys

    img = np.zeros((20, 20), np.float32)
    img[0:6, 0:6] = img[6:12, 6:12] = 200
    monkeypatch.setitem(sys.modules, "skimage.measure._ccomp", None)  # import fails
    assert measure(img)["n_components"] == 2


def test_measuring_does_not_import_scipy_ndimage():
    """The component count needs neither scipy.ndimage nor scikit-image's morphology: their import was
    0.2-0.4 s of `tprobe extract`'s start-up (issue 20)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from tprobe.data.preprocess import measure\n"
        "img = np.zeros((30, 30), np.float32); img[2:10, 2:10] = 200\n"
        "assert measure(img)['n_components'] == 1\n"
        "print(sorted(m for m in ('scipy.ndimage', 'skimage.morphology') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _dataset_of(tmp_path, images: dict):
    for name, arr in images.items():
        save_png(tmp_path / name, arr)
    return discover(tmp_path)


def test_filters_apply_to_both_classes(tmp_path):
    rng = np.random.default_rng(0)
    cell = np.zeros((30, 30), np.uint8)
    cell[1:29, 1:29] = rng.integers(21, 255, (28, 28))  # bright, one cell, high entropy
    dim = np.zeros((30, 30), np.uint8)
    dim[10:14, 10:14] = 30  # near-empty
    two = cell.copy()
    two[14:16, :] = 0  # cut into two cells
    ds = _dataset_of(
        tmp_path,
        {
            "donor_1/activated/CD3_1_act_1_1_1.png": cell,
            "donor_1/quiescent/CD3_1_noact_2_1_1.png": cell[::-1],
            "donor_1/activated/CD3_1_act_1_1_2.png": dim,
            "donor_1/quiescent/CD3_1_noact_2_1_2.png": dim // 2,
            "donor_1/activated/CD3_1_act_1_1_3.png": two,
            "donor_1/quiescent/CD3_1_noact_2_1_3.png": two.T,
        },
    )
    pre = preprocess(ds)
    src = pre.manifest[pre.manifest["view"] == "orig"].set_index("cell")
    assert src.groupby("label")["drop_reason"].apply(sorted).to_dict() == {
        0: ["", "dim", "multi_cell"],
        1: ["", "dim", "multi_cell"],
    }
    counts = pre.counts()
    assert counts.loc[("total", ""), "dim"] == 2 and counts.loc[("total", ""), "kept"] == 2


def test_padding_is_centred_and_large_images_dropped_or_resized(tmp_path):
    img = np.ones((10, 20), np.float32)
    out = pad_to_canvas(img, PreprocessConfig(canvas=28))
    rows, cols = np.nonzero(out)
    assert out.shape == (28, 28) and (rows.min(), rows.max(), cols.min(), cols.max()) == (9, 18, 4, 23)
    big = np.ones((50, 30), np.float32)
    assert pad_to_canvas(big, PreprocessConfig(canvas=28, fit="resize")).shape == (28, 28)
    with pytest.raises(TprobeError, match="--fit resize"):
        pad_to_canvas(big, PreprocessConfig(canvas=28))
    filled = pad_to_canvas(img, PreprocessConfig(canvas=28, fit="fill"))
    assert np.nonzero(filled)[1].max() - np.nonzero(filled)[1].min() == 27
    ds = _dataset_of(
        tmp_path,
        {"donor_1/activated/a.png": (np.random.default_rng(1).integers(0, 255, (50, 30))).astype(np.uint8)},
    )
    cfg = PreprocessConfig(canvas=28, max_components=10**6, entropy_min=0, entropy_dim=0)
    assert preprocess(ds, cfg).manifest["drop_reason"].tolist() == ["too_large"]


def test_views_are_exact_rotations_and_flips():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert np.array_equal(apply_view(a, "r90"), np.rot90(a))
    assert np.array_equal(apply_view(a, "r270"), np.rot90(a, -1))
    assert np.array_equal(apply_view(a, "fliph"), np.fliplr(a))
    assert np.array_equal(apply_view(a, "flipv"), np.flipud(a))
    anti = apply_view(a, "antitranspose")
    assert all(anti[i, j] == a[3 - j, 3 - i] for i in range(4) for j in range(4))
    d8 = {apply_view(a, v).tobytes() for v in PreprocessConfig(views="dihedral8").view_names}
    assert len(d8) == 8  # all eight symmetries distinct


def test_manifest_columns_groups_and_determinism(tmp_path):
    data = copy_subset(tmp_path / "d")
    pre = preprocess(discover(data))
    m = pre.manifest
    for col in (
        "image_id",
        "path",
        "label",
        "donor",
        "group",
        "view",
        "kept",
        "drop_reason",
        "cell_type",
        "batch",
        "plate",
        "cell",
        "entropy",
        "total_intensity",
        "n_components",
    ):
        assert col in m.columns
    kept = m[m["kept"]]
    assert kept["image_id"].is_unique
    views = kept.groupby("group")["view"].apply(sorted)
    assert all(v == sorted(PreprocessConfig().view_names) for v in views)
    assert kept.groupby("group")[["donor", "label"]].nunique().max().max() == 1
    again = preprocess(discover(data))
    assert again.manifest.equals(m) and again.fingerprint == pre.fingerprint
    assert PreprocessConfig(canvas=154).hash != PreprocessConfig().hash
    assert PreprocessConfig().hash == PreprocessConfig().hash


def test_bad_files_are_reported_and_the_rest_processed(small_data):
    (small_data / "donor_1" / "activated" / "CD3_1_act_9_9_9.png").write_bytes(b"broken")
    save_png(
        small_data / "donor_2" / "quiescent" / "CD3_2_noact_1_9_9.png",
        np.zeros((5, 5, 3), np.uint8) + np.array([1, 2, 3], np.uint8),
    )
    pre = preprocess(discover(small_data))
    assert len(pre.skipped) == 2
    assert {r for r in pre.manifest["drop_reason"] if r} >= {"unreadable"}
    msgs = " ".join(str(s) for s in pre.skipped)
    assert "CD3_1_act_9_9_9.png: cannot be read" in msgs and "RGB colour" in msgs
    assert pre.manifest["kept"].sum() > 0


def test_invalid_config_names_the_choices():
    with pytest.raises(TprobeError, match="pad, resize, fill"):
        PreprocessConfig(fit="stretch")


def test_16_bit_data_far_below_max_value_is_a_warning_naming_its_brightest_pixel(tmp_path):
    """12-bit camera data saved as 16-bit TIFFs, preprocessed with the default --max-value 65535: every cell
    is scaled 16x too dark and dropped as dim (or kept dim) without a hint. One warning line names the
    brightest pixel and --max-value; the numbers are unchanged."""
    import tifffile
    from click.testing import CliRunner
    from PIL import Image

    from tprobe.cli import main

    pngs = copy_subset(tmp_path / "png", donors=("donor_1",), per_class=3)
    tifs = tmp_path / "tif"
    brightest = 0
    for png in sorted(pngs.rglob("*.png")):
        arr = np.asarray(Image.open(png), np.uint16) * 16  # the same cell from a 12-bit camera: 0..4080
        brightest = max(brightest, int(arr.max()))
        (tifs / png.relative_to(pngs)).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite((tifs / png.relative_to(pngs)).with_suffix(".tif"), arr)
    pre = preprocess(discover(tifs))
    assert len(pre.warnings) == 1, pre.warnings
    assert f"brightest pixel of the 6 16-bit images is {brightest}" in pre.warnings[0]
    assert "--max-value 65535" in pre.warnings[0] and "--max-value 4095" in pre.warnings[0]
    res = CliRunner().invoke(main, ["preprocess", "--data", str(tifs), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert sum(line.startswith("warning: ") and "brightest" in line for line in res.output.splitlines()) == 1
    # the camera's range given, or 8-bit data: no warning
    assert not preprocess(discover(tifs), PreprocessConfig(max_value=4095)).warnings
    assert not preprocess(discover(pngs)).warnings
