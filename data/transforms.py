"""The two exact reshuffles of the factorisation (Menick & Kalchbrenner 2019: the subscale ordering and
multidimensional upscaling).

Bit depth:  x (n bits) -> m = x >> (n-b)  (b most significant bits)
                          l = x & (2**(n-b) - 1)  (n-b least significant bits)
Subscale:   x (B, H, W, C) -> slices (B, S*S, H/S, W/S, C), slice k = i*S + j is x[:, i::S, j::S].
Sequence:   one slice (B, h, w, C) -> its T = h*w*C sub-pixels (B, T), in the one order the
            decoders generate them: pixels in raster order, channels innermost.

Every function works on a batch of integer tensors and is exact; settings are checked
by `check_settings`, which raises one `ValueError` naming the setting and the fix.
"""
from __future__ import annotations

import torch
from einops import rearrange

# slice k = i*S + j holds the pixels at offset (i, j) of every S x S block
SLICE_PATTERN = "b (h i) (w j) c -> b (i j) h w c"
UNSLICE_PATTERN = "b (i j) h w c -> b (h i) (w j) c"
# the order of the sub-pixels of a slice: pixels in raster order, channels innermost
SUBPIXEL_ORDER = "(h w c)"


def check_settings(bits: int = 8, high_bits: int | None = None, subscale: int = 1,
                   height: int | None = None, width: int | None = None) -> None:
    """Raise a ValueError naming the bad setting and how to fix it."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported: use 1 <= bits <= 8 (images are 8-bit at most)")
    if high_bits is not None and not 1 <= high_bits <= bits:
        raise ValueError(f"high_bits={high_bits} is invalid for bits={bits}: use 1 <= high_bits <= bits")
    if subscale < 1:
        raise ValueError(f"subscale={subscale} is invalid: use a subscale factor S >= 1")
    for name, size in (("height", height), ("width", width)):
        if size is not None and size % subscale:
            raise ValueError(f"image {name} {size} is not divisible by subscale={subscale}: "
                             f"choose S dividing {size} or resize the images")


def quantize(images: torch.Tensor, bits: int) -> torch.Tensor:
    """8-bit values -> `bits`-bit values by dropping the 8-bits least significant bits."""
    check_settings(bits)
    return images >> (8 - bits)


def split_depth(x: torch.Tensor, bits: int, high_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n-bit x -> (m, l): the b most and the n-b least significant bits."""
    check_settings(bits, high_bits)
    low_bits = bits - high_bits
    return x >> low_bits, x & ((1 << low_bits) - 1)


def merge_depth(msb: torch.Tensor, lsb: torch.Tensor, bits: int, high_bits: int) -> torch.Tensor:
    """Inverse of `split_depth`: x = (m << (n-b)) | l."""
    check_settings(bits, high_bits)
    return (msb << (bits - high_bits)) | lsb


def to_slices(x: torch.Tensor, subscale: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, S*S, H/S, W/S, C) in slice order k = i*S + j."""
    check_settings(subscale=subscale, height=x.shape[1], width=x.shape[2])
    return rearrange(x, SLICE_PATTERN, i=subscale, j=subscale)


def from_slices(slices: torch.Tensor, subscale: int) -> torch.Tensor:
    """(B, S*S, H/S, W/S, C) -> (B, H, W, C); inverse of `to_slices`."""
    check_settings(subscale=subscale)
    if slices.shape[1] != subscale * subscale:
        raise ValueError(f"got {slices.shape[1]} slices, expected S*S = {subscale * subscale} for subscale={subscale}")
    return rearrange(slices, UNSLICE_PATTERN, i=subscale, j=subscale)


def to_sequence(slice_: torch.Tensor) -> torch.Tensor:
    """One slice (B, h, w, C) -> its sub-pixels (B, T = h*w*C) in generation order."""
    return rearrange(slice_, f"b h w c -> b {SUBPIXEL_ORDER}")


def from_sequence(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `to_sequence`: (B, T) -> (B, h, w, C) for a slice of height x width pixels."""
    return rearrange(values, f"b {SUBPIXEL_ORDER} -> b h w c", h=height, w=width)


def pixel_of_subpixel(height: int, width: int, channels: int) -> torch.Tensor:
    """(T,) long: for each sub-pixel of a slice in generation order, its pixel's raster index
    y*width + x. Read off `to_sequence` itself, so the two can never disagree."""
    pixels = torch.arange(height * width).reshape(1, height, width, 1).expand(1, height, width, channels)
    return to_sequence(pixels)[0]
