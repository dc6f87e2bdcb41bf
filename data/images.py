"""The one image reader: every image, wherever it enters (a data source, INPUT, IMAGES=), is
decoded here into 8-bit grey or RGB pixels the same way.

* EXIF orientation is applied (a phone photo stored sideways is turned upright).
* 16-bit and 32-bit integer images are scaled to 8 bits by their range (65535 -> 255), not
  clipped; float images are read as [0, 1] (or [0, 255] when any value exceeds 1).
* Transparent pixels (alpha, or a palette's or grey image's transparent entry) are
  composited onto `background` (a colour name or '#rrggbb'; white by default), or the image
  is refused with background='refuse'.
* Palette, GIF, CMYK, bilevel, ... images are converted to the model's channels: grey (1)
  or RGB (3).
* Pillow's decompression-bomb limit stays: an image above it is "too large".
* A file of several frames (an animated GIF, PNG or WebP, a multi-page TIFF) is refused as
  "multi-frame": which frame is meant is the user's to say. A camera's MPO JPEG, whose further
  frames are previews or depth maps of the one photograph, is read as its first frame.

Errors are `ImageError` (a ValueError) with one line saying what is wrong.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps

REFUSE = "refuse"


class ImageError(ValueError):
    """An image that cannot be used; `reason` is 'unreadable', 'too large', 'multi-frame' or 'transparent'."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def open_image(source) -> Image.Image:
    """A path, bytes, a {'bytes', 'path'} dict (a `datasets` image cell), an array or a PIL image ->
    a fully decoded PIL image, upright. Raises ImageError, also for a file of several frames."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, dict):
            image = Image.open(io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"])
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, Path)):
            image = Image.open(source)
        else:
            array = np.asarray(source)
            image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and image.format != "MPO":
            raise ImageError(f"it has {frames} frames (an animation or a multi-page file): give one image per file, "
                             f"e.g. each frame saved as a PNG of its own", "multi-frame")
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large ({error})", "too large") from error
    except ImageError:
        raise
    except Exception as error:  # Pillow raises many kinds for corrupt, truncated or empty files
        raise ImageError(f"unreadable image ({type(error).__name__}: {error})") from error


def to_8bit(image: Image.Image) -> Image.Image:
    """Integer and float images of more than 8 bits -> mode 'L', scaled by their range."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    array = np.asarray(image)
    if image.mode == "F":
        top = 1.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 255.0
        scaled = np.clip(np.nan_to_num(array) / top, 0.0, 1.0) * 255.0
    else:  # 16-bit, or 32-bit whose values fit 16 bits (how many 16-bit files decode): range 65535
        array = array.astype(np.int64)
        top = 65535 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else 2**32 - 1
        scaled = np.clip(array, 0, top) * (255.0 / top)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def composite(image: Image.Image, background: str) -> Image.Image:
    """Transparent pixels onto the background colour; 'refuse' raises ImageError."""
    if not has_transparency(image):
        return image
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:  # declared but unused transparency
        return image.convert("RGB")
    if background == REFUSE:
        raise ImageError("image has transparent pixels (data.background: refuse)", "transparent")
    try:
        colour = ImageColor.getrgb(background)[:3]
    except ValueError as error:
        raise ValueError(f"data.background={background!r} is not a colour: use a name (white), "
                         f"'#rrggbb' or '{REFUSE}'") from error
    canvas = Image.new("RGBA", rgba.size, (*colour, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """An 8-bit PIL image of any mode (palette, CMYK, bilevel, ...) -> mode L (channels 1) or RGB (3)."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported: use 1 (grey) or 3 (RGB)")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # palette and other modes through RGB, so grey palettes stay grey
    return image.convert("L" if channels == 1 else "RGB")


def decode(source, channels: int, background: str = "white") -> tuple[Image.Image, bool]:
    """Decode one image (see `open_image` for the sources) into a PIL image of mode L (channels 1)
    or RGB (3), and whether it had transparent pixels (composited onto `background`).
    Raises ImageError (unreadable, too large, multi-frame, or transparent and refused)."""
    image = to_8bit(open_image(source))
    transparent = has_transparency(image) and image.convert("RGBA").getextrema()[3][0] < 255
    return to_channels(composite(image, background), channels), transparent


def as_array(image: Image.Image) -> np.ndarray:
    """A PIL image of mode L or RGB -> (H, W, C) uint8, writable (torch warns users about read-only arrays)."""
    return np.array(image, dtype=np.uint8).reshape(image.height, image.width, len(image.getbands()))
