"""What ordinary lossless codecs spend on the same images, in bits per dimension: PNG, lossless
WebP and lossless JPEG-XL (through the `pillow-jxl-plugin`), one image per file and all images
in one mosaic file (per-file headers dominate at 28 x 28, so the mosaic is the fair figure).
Every encoding is checked to decode to the same pixels."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

SETTINGS = {  # the strongest lossless setting of each
    "png": dict(format="PNG", optimize=True),
    "webp": dict(format="WEBP", lossless=True, quality=100, method=6),
    # effort 10, libjxl's slowest and smallest: the comparison is with each codec at its best
    "jxl": dict(format="JXL", lossless=True, effort=10),
}


def available() -> list[str]:
    """The codecs Pillow can write here (JPEG-XL needs the pillow-jxl-plugin package)."""
    try:
        import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)
    except ImportError:
        return ["png", "webp"]
    return list(SETTINGS)


def encoded_size(image: np.ndarray, codec: str) -> int:
    """Bytes of one (H, W, C) uint8 image in `codec`; raises RuntimeError if it does not decode back."""
    picture = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    picture.save(buffer, **SETTINGS[codec])
    buffer.seek(0)
    if not np.array_equal(np.asarray(Image.open(buffer).convert(picture.mode)), np.asarray(picture)):
        raise RuntimeError(f"{codec} did not give back the same pixels: it is not lossless here")
    return buffer.getbuffer().nbytes


def mosaic(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> one near-square (rows*H, columns*W, C) image, black where the grid is not full."""
    n, h, w, c = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * columns, h, w, c), images.dtype)
    grid[:n] = images
    return grid.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


class CodecSizes:
    """Running totals of bits per codec, one image per file; the mosaic of all images is made at the end
    (the images are not kept here: the caller holds them)."""

    def __init__(self, codecs: list[str] | None = None):
        self.codecs = codecs or available()
        self.bits = {codec: 0 for codec in self.codecs}

    def add(self, images: np.ndarray) -> None:
        """images: (B, H, W, C) uint8, the pixels as stored (n-bit values, unscaled)."""
        for codec in self.codecs:
            self.bits[codec] += sum(8 * encoded_size(image, codec) for image in images)

    def bits_per_dim(self, images: np.ndarray) -> dict[str, float]:
        """{codec: bits/dim one image per file, codec_mosaic: bits/dim of the one mosaic file}, given all
        the images added, (N, H, W, C) uint8 in the order added."""
        dims = images.size
        grid = mosaic(images)
        out = {codec: bits / dims for codec, bits in self.bits.items()}
        out.update({f"{codec}_mosaic": 8 * encoded_size(grid, codec) / dims for codec in self.codecs})
        return out
