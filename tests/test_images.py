import numpy as np
import pytest
import tifffile
from conftest import save_png

from tprobe.data.images import read_image
from tprobe.errors import TprobeError


def test_8bit_png_unchanged(tmp_path):
    arr = np.arange(30, dtype=np.uint8).reshape(5, 6)
    out = read_image(save_png(tmp_path / "a.png", arr))
    assert out.dtype == np.float32 and np.array_equal(out, arr)


def test_16bit_tiff_scaled_by_documented_rule(tmp_path):
    arr = np.array([[0, 257, 65535]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    assert np.allclose(read_image(tmp_path / "a.tif"), [[0, 1, 255]])
    arr12 = np.array([[0, 4095]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "b.tif", arr12)
    assert np.allclose(read_image(tmp_path / "b.tif", max_value=4095), [[0, 255]])


def test_16bit_above_max_value_is_an_error_not_clipped(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.array([[5000]], dtype=np.uint16))
    with pytest.raises(TprobeError, match="exceeds --max-value 4095"):
        read_image(tmp_path / "a.tif", max_value=4095)


def test_grey_saved_as_rgb_is_accepted_colour_is_refused(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (4, 4), dtype=np.uint8)
    rgb = np.stack([grey] * 3, -1)
    assert np.array_equal(read_image(save_png(tmp_path / "g.png", rgb)), grey)
    rgb[0, 0, 1] += 1
    with pytest.raises(TprobeError, match="RGB colour image.*greyscale"):
        read_image(save_png(tmp_path / "c.png", rgb))
    rgba = np.dstack([rgb, np.full((4, 4), 128, np.uint8)])
    with pytest.raises(TprobeError, match="RGBA"):
        read_image(save_png(tmp_path / "d.png", rgba))


def test_corrupt_and_empty_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(TprobeError, match="bad.png: cannot be read"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(TprobeError, match="zero.png"):
        read_image(tmp_path / "zero.png")


def _write_png16(path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA), written by hand: Pillow cannot write 16-bit colour."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    samples = 1 if arr.ndim == 2 else arr.shape[2]
    rows = arr.astype(">u2").reshape(h, -1).tobytes()
    n = w * samples * 2
    raw = b"".join(b"\x00" + rows[i * n : (i + 1) * n] for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[samples]
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_palette_png_is_read_as_its_palette_values_not_its_indices(tmp_path):
    from PIL import Image

    from tprobe.data.fov import read_mask

    index = np.arange(64, dtype=np.uint8).reshape(8, 8)
    im = Image.fromarray(index, "P")
    im.putpalette([255 - i for i in range(256) for _ in range(3)])  # a grey palette, inverted
    im.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), 255 - index)  # was the indices 0..63
    colour = Image.fromarray(index, "P")
    colour.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    colour.save(tmp_path / "c.png")
    with pytest.raises(TprobeError, match="c.png: RGB colour image"):
        read_image(tmp_path / "c.png")
    # a label image saved with a palette (as VOC-style tools write them): its indices are the labels
    assert np.array_equal(read_mask(tmp_path / "c.png"), index)


@pytest.mark.refuses("a 16-bit colour or grey+alpha PNG (Pillow would keep its top byte only)")
@pytest.mark.parametrize("samples", [3, 4])
def test_16bit_colour_png_is_refused_not_read_as_its_top_byte(tmp_path, samples):
    from tprobe.data.images import UnsupportedPixels, read_channels

    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 64  # 12-bit data: 0..4032
    _write_png16(tmp_path / "g.png", grey)  # 16-bit grey PNG: read exactly
    assert np.allclose(read_image(tmp_path / "g.png", max_value=4095), grey * (255 / 4095))
    arr = np.stack([grey] * samples, -1)
    if samples == 4:
        arr[..., 3] = 65535
    # Pillow decodes it as 8-bit: the low byte lost, --max-value ignored
    _write_png16(tmp_path / "rgb.png", arr)
    with pytest.raises(UnsupportedPixels, match=r"rgb.png: 16-bit colour or grey\+alpha PNG.*TIFF"):
        read_image(tmp_path / "rgb.png", max_value=4095)
    with pytest.raises(UnsupportedPixels, match=r"rgb.png: 16-bit colour or grey\+alpha PNG"):
        read_channels(tmp_path / "rgb.png", "a,b,c", max_value=4095)
