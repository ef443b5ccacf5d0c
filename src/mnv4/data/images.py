"""The one image loader every command uses: any file PIL can read, as an RGB image, or a reason why not.

Training, evaluation, prediction, export calibration and parity, distillation labelling and search
all read images through :func:`load_rgb` (or :func:`try_load_rgb`, which returns a
:class:`BadImage` instead of raising), so a file that one command can read every command can read,
and a file none can read is reported the same way everywhere: path, reason, and a count at the end.

What it does to a file:

* decodes it fully (truncation shows up here, not later in a worker);
* applies the EXIF orientation, so a phone photo is seen upright, as a viewer shows it;
* converts every PIL mode to 8-bit RGB: palette and grey modes directly, transparent images
  (RGBA, LA, PA, P with transparency) composited on white (dropping alpha would expose whatever
  colour the encoder left under transparent pixels, often black), CMYK and YCbCr/LAB/HSV through
  PIL's conversions, and high-bit-depth modes (I;16*, I, F) rescaled to 0-255 instead of clipped;
* refuses images above ``max_pixels`` (default 178,956,970, PIL's own limit) by name, before
  decoding, instead of letting a decompression-bomb header end the run.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import MNv4Error

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "BadImage",
    "BadImageLog",
    "ImageReadError",
    "is_image_file",
    "find_images",
    "load_rgb",
    "to_rgb",
    "try_load_rgb",
    "require_readable",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
MAX_PIXELS = 178_956_970  # PIL's default Image.MAX_IMAGE_PIXELS (a 13377 x 13377 image)


class ImageReadError(MNv4Error):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class BadImage:
    """Stands in for an unreadable image in a dataset; collate functions drop and report it."""

    path: str
    reason: str


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_SUFFIXES)


def find_images(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Image files named in ``inputs`` (files, or folders searched recursively), in a stable order.

    A named file is kept whatever its suffix (the loader decides whether it is an image); in folders
    only files with an image suffix count. A missing path is an error.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            out.extend(sorted(q for q in found if q.is_file() and is_image_file(q.name)))
        elif p.is_file():
            out.append(p)
        else:
            raise MNv4Error(f"no such image file or folder: {p}")
    return out


def _high_bit_depth_to_rgb(im: Image.Image) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        a = a / 257.0  # 0..65535 -> 0..255
    else:  # "I" (32-bit int) or "F" (float): scale by what the data actually spans
        finite = a[np.isfinite(a)]
        top = float(finite.max()) if finite.size else 0.0
        low = float(finite.min()) if finite.size else 0.0
        if low < 0 or top > 255:
            a = (a - min(low, 0.0)) / max(top - min(low, 0.0), 1e-12) * 255.0
        elif im.mode == "F" and top <= 1.0:
            a = a * 255.0
    a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (see the module docstring for what each mode becomes)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _high_bit_depth_to_rgb(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully and return it as RGB; raises :class:`ImageReadError` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageReadError(
                        path, f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}; downscale it"
                    )
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"too many pixels ({e})") from None
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError) as e:
        # PIL raises all of these for damaged or unsupported files, depending on the plugin
        reason = str(e).strip() or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image PIL can read"
        raise ImageReadError(path, reason) from None


def try_load_rgb(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> Image.Image | BadImage:
    """:func:`load_rgb`, but an unreadable file gives a :class:`BadImage` instead of an exception."""
    try:
        return load_rgb(path, max_pixels)
    except ImageReadError as e:
        return BadImage(e.path, e.reason)


def require_readable(load: Callable[[int], Any], n: int, what: str, probes: int = 32) -> None:
    """Fail before any work when none of a spread of ``probes`` images can be read.

    ``load(i)`` gives image ``i`` of ``n`` or a :class:`BadImage` for it; ``what`` names the set in the message.
    """
    if n == 0:
        raise MNv4Error(f"the {what} set is empty")
    idx = list(range(n)) if n <= probes else sorted({round(i * (n - 1) / (probes - 1)) for i in range(probes)})
    first_bad = None
    for i in idx:
        item = load(i)
        if not isinstance(item, BadImage):
            return
        first_bad = first_bad or item
    raise MNv4Error(
        f"none of {len(idx)} {what} images sampled across the set could be read (e.g. {first_bad.path}: "
        f"{first_bad.reason}); check the files"
    )


class BadImageLog:
    """Collects unreadable files; prints each path once (with its reason) and counts them."""

    def __init__(self, verbose: bool = True) -> None:
        self.paths: dict[str, str] = {}
        self.verbose = verbose

    def add(self, bad: BadImage | Sequence[BadImage]) -> None:
        for b in [bad] if isinstance(bad, BadImage) else bad:
            if b.path not in self.paths:
                self.paths[b.path] = b.reason
                if self.verbose:
                    print(f"skipping unreadable image {b.path}: {b.reason}", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        return f"skipped {len(self)} unreadable image(s)" if self.paths else ""
