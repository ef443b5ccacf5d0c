"""The one image loader: every PIL mode becomes correct RGB; bad files are reported by name, never fatal."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from mnv4.data.images import BadImage, BadImageLog, ImageReadError, find_images, load_rgb, try_load_rgb


def _gradient(w: int = 24, h: int = 16) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "mode,suffix",
    [("RGB", ".jpg"), ("L", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("1", ".png"), ("RGBA", ".png"), ("LA", ".png")],
)
def test_every_mode_becomes_rgb_of_the_same_size(tmp_path, mode, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(_gradient()).convert(mode).save(path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (24, 16)
    a = np.asarray(im, dtype=np.float64)
    assert a.std() > 20  # the picture survived: not a blank or saturated image


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:4, :, 3] = 255  # top half opaque, bottom half fully transparent (black underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    a = np.asarray(load_rgb(tmp_path / "t.png"))
    assert tuple(a[0, 0]) == (200, 0, 0)
    assert tuple(a[7, 7]) == (255, 255, 255)


def test_palette_transparency_and_sixteen_bit_grey(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    a = np.asarray(load_rgb(tmp_path / "p.png"))
    assert tuple(a[0, 0]) == (10, 200, 30) and tuple(a[3, 3]) == (255, 255, 255)

    deep = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000).astype(np.uint16)  # up to 60000
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    g = np.asarray(load_rgb(tmp_path / "d.png"))[..., 0].astype(int)
    # scaled, not clipped: 60000/65535 of white at the brightest pixel, a smooth ramp below it
    assert g.max() == round(60000 / 257) and g.min() == 0 and len(np.unique(g)) == 16


def test_unreadable_truncated_and_oversized_files_are_named(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="notes.jpg: not an image PIL can read"):
        load_rgb(tmp_path / "notes.jpg")
    bad = try_load_rgb(tmp_path / "cut.jpg")
    assert isinstance(bad, BadImage) and bad.path.endswith("cut.jpg") and bad.reason
    big = try_load_rgb(tmp_path / "big.png", max_pixels=1000)
    assert isinstance(big, BadImage) and "4,096 pixels exceeds the limit of 1,000" in big.reason
    with pytest.raises(ImageReadError, match="no such file"):
        load_rgb(tmp_path / "missing.png")


def test_decompression_bomb_header_is_skipped_not_fatal(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (16, 16)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR width/height: 10^10 px
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # keep the chunk's checksum valid
    path.write_bytes(bytes(raw))
    bad = try_load_rgb(path)
    assert isinstance(bad, BadImage) and "exceeds" in bad.reason and "pixels" in bad.reason


def test_find_images_and_the_bad_image_log(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    Image.fromarray(_gradient()).save(tmp_path / "a" / "1.png")
    Image.fromarray(_gradient()).save(tmp_path / "2.JPG")
    (tmp_path / "readme.txt").write_text("x")
    found = find_images([tmp_path])
    assert [p.name for p in found] == ["2.JPG", "1.png"] or [p.name for p in found] == ["1.png", "2.JPG"]
    assert len(found) == 2
    with pytest.raises(Exception, match="no such image file or folder"):
        find_images([tmp_path / "nope"])
    log = BadImageLog()
    log.add([BadImage("x.jpg", "broken"), BadImage("x.jpg", "broken")])
    log.add(BadImage("y.jpg", "truncated"))
    assert len(log) == 2 and log.summary() == "skipped 2 unreadable image(s)"
    assert capsys.readouterr().err.count("skipping unreadable image") == 2
