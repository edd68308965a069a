"""Every kind of bad or unusual input file: decoded correctly or rejected with a reason."""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from facelora.config import ImagesParams
from facelora.prepare.images import ImageRejected, read_image, scan_images


@pytest.fixture
def rgb():
    """A deterministic, asymmetric test picture (so rotations are visible)."""
    y, x = np.mgrid[0:60, 0:90]
    img = np.stack([x * 2, y * 4, (x + y) % 256], axis=-1).astype(np.uint8)
    img[5:15, 5:25] = (255, 0, 0)  # a red block near the top left
    return img


def reject_reason(path, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        read_image(path, ImagesParams(**kw))
    return info.value.reason


def test_zero_byte_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    assert reject_reason(tmp_path / "a.jpg") == "empty file (0 bytes)"


@pytest.fixture
def noise():
    return np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)


def test_truncated_jpeg(tmp_path, noise):
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    assert reject_reason(tmp_path / "t.jpg").startswith("truncated or corrupt image data")


def test_truncated_header(tmp_path, noise):
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    (tmp_path / "h.jpg").write_bytes(buf.getvalue()[:300])
    assert reject_reason(tmp_path / "h.jpg").startswith("not a readable image")


def test_corrupt_png_body(tmp_path, noise):
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[5000:9000] = b"\x00" * 4000  # damage the compressed pixel data, keep the length
    (tmp_path / "c.png").write_bytes(bytes(data))
    assert reject_reason(tmp_path / "c.png").startswith("truncated or corrupt image data")


def test_text_file_with_image_extension(tmp_path):
    (tmp_path / "n.png").write_text("hello, I am not a picture")
    assert reject_reason(tmp_path / "n.png").startswith("not a readable image")


def test_unsupported_format_inside_a_jpg_name(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "really_a_gif.jpg", format="GIF")
    assert "unsupported image format GIF" in reject_reason(tmp_path / "really_a_gif.jpg")


def _bomb(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_bomb(50_000, 50_000))
    reason = reject_reason(tmp_path / "bomb.png")
    assert reason.startswith("too many pixels: 50000x50000") and "before decoding" in reason


def test_huge_file_refused(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "big.png")
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "big.png").write_bytes(data + b"\0" * (2 * 1024 * 1024))  # trailing junk
    assert reject_reason(tmp_path / "big.png", max_file_mb=1).startswith("file too large: 2 MB")


def test_cmyk_jpeg_converted(tmp_path, rgb):
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = read_image(tmp_path / "cmyk.jpg", ImagesParams())
    assert out.rgb.shape == rgb.shape and out.rgb.dtype == np.uint8
    assert "CMYK converted to RGB" in out.info.notes
    assert np.abs(out.rgb.astype(int) - rgb).mean() < 12


def test_16bit_greyscale_png_scaled_to_8bit(tmp_path):
    grey16 = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    out = read_image(tmp_path / "g16.png", ImagesParams())
    assert out.rgb.shape == (32, 64, 3)
    assert out.rgb[0, 0, 0] == 0 and out.rgb[-1, -1, 0] == 255
    assert np.all(out.rgb[..., 0] == out.rgb[..., 1])
    assert "16-bit converted to 8-bit" in out.info.notes


def test_16bit_colour_png(tmp_path, rgb):
    cv2.imwrite(str(tmp_path / "c16.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    out = read_image(tmp_path / "c16.png", ImagesParams())
    assert np.abs(out.rgb.astype(int) - rgb).max() <= 1


def test_greyscale_becomes_rgb(tmp_path, rgb):
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png", ImagesParams())
    assert out.rgb.shape == rgb.shape and "greyscale converted to RGB" in out.info.notes


def test_alpha_composited_on_background(tmp_path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a transparent stripe
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png", ImagesParams(alpha_background=(0, 255, 0)))
    assert (out.rgb[:, :10] == (0, 255, 0)).all()
    assert (out.rgb[:, 20:] == rgb[:, 20:]).all()
    assert any(n.startswith("alpha composited") for n in out.info.notes)


def test_palette_with_transparency(tmp_path, rgb):
    im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    out = read_image(tmp_path / "p.png", ImagesParams())
    assert out.rgb.shape == rgb.shape and out.rgb.dtype == np.uint8


def test_exif_rotation_is_applied(tmp_path, rgb):
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))  # as a phone stores a sideways photo
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.jpg", quality=98, exif=exif.tobytes())
    out = read_image(tmp_path / "r.jpg", ImagesParams())
    assert (out.info.width, out.info.height) == (90, 60)
    assert out.rgb.shape == rgb.shape
    assert np.abs(out.rgb.astype(int) - rgb).mean() < 6  # upright again
    assert out.info.orientation == 6


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_exif_orientation_comes_out_upright(tmp_path, rgb, orientation):
    inverse = {  # what a camera stores for each tag, so that the fix gives `rgb` back
        1: lambda a: a,
        2: np.fliplr,
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: np.transpose(a, (1, 0, 2)),
        6: lambda a: np.rot90(a, 1),
        7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2),
        8: lambda a: np.rot90(a, -1),
    }
    stored = np.ascontiguousarray(inverse[orientation](rgb))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif.tobytes())
    out = read_image(tmp_path / "o.png", ImagesParams())
    assert (out.rgb == rgb).all()


def test_reduced_decoding_keeps_coordinates_consistent(tmp_path):
    big = np.zeros((2000, 3000, 3), np.uint8)
    big[1000:1100, 2000:2100] = 255
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    out = read_image(tmp_path / "big.jpg", ImagesParams(), max_side=600)
    assert max(out.rgb.shape[:2]) == 600 and out.scale == pytest.approx(0.2, rel=0.01)
    ys, xs = np.nonzero(out.rgb[..., 0] > 128)
    assert xs.mean() / out.scale == pytest.approx(2050, abs=8)
    assert ys.mean() / out.scale == pytest.approx(1050, abs=8)
    assert (out.info.width, out.info.height) == (3000, 2000)


def test_odd_file_names_are_found(tmp_path, rgb):
    names = ["Zoë portrait 01.jpg", "with space.png", "日本語.webp", "UPPER.JPG"]
    for n in names:
        Image.fromarray(rgb).save(tmp_path / n)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "scan.tiff").write_bytes(b"II*\0")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(rgb).save(tmp_path / ".hidden" / "x.jpg")
    found = {rel: reason for rel, _, reason in scan_images(tmp_path, ImagesParams())}
    assert set(found) == set(names) | {"scan.tiff"}
    assert found["scan.tiff"].startswith("unsupported file type .tiff")
    for n in names:
        assert found[n] is None
        assert read_image(tmp_path / n, ImagesParams()).rgb.shape == rgb.shape


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="paths.raw"):
        list(scan_images(tmp_path / "nope", ImagesParams()))
