"""Pictures of images and of images in the making (8-bit uint8 arrays for PNG, GIF and W&B)."""
from __future__ import annotations

import torch
from einops import rearrange, repeat

from data.transforms import from_slices, merge_depth


def to_8bit(x: torch.Tensor, bits: int) -> torch.Tensor:
    """n-bit values -> the 8-bit values they stand for (the inverse of `quantize` up to dropped bits)."""
    return (x.long() << (8 - bits)).to(torch.uint8)


def partial_image(known: dict, done: dict, subscale: int, bits: int, high_bits: int) -> torch.Tensor:
    """The image so far as 8-bit (B, H, W, C), from its MSB and LSB slices (B, S*S, h, w, C) of which
    only the slice ids in done["msb"] and done["lsb"] are real: missing MSB slices show slice 0 of
    their block when it is there (a blocky low-resolution image), missing LSB show as zeros."""
    msb = known["msb"].clone()
    missing = [k for k in range(subscale**2) if k not in done["msb"]]
    if missing and 0 in done["msb"]:
        msb[:, missing] = msb[:, :1].clone()  # of one image, the source and target views overlap
    lsb = known["lsb"].clone()
    lsb[:, [k for k in range(subscale**2) if k not in done["lsb"]]] = 0
    x = merge_depth(from_slices(msb, subscale), from_slices(lsb, subscale), bits, high_bits)
    return to_8bit(x, bits).cpu()


def image_grid(images: torch.Tensor, columns: int | None = None):
    """(N, H, W, C) uint8 -> one (rows*H, columns*W, C) numpy grid, padded with black images."""
    n = images.shape[0]
    columns = columns or max(1, int(n**0.5 + 0.999))
    rows = (n + columns - 1) // columns
    pad = rows * columns - n
    if pad:
        images = torch.cat([images, torch.zeros((pad, *images.shape[1:]), dtype=images.dtype)])
    return rearrange(images, "(r c) h w ch -> (r h) (c w) ch", r=rows, c=columns).numpy()


def upsample_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, h, w, C) -> (N, h*factor, w*factor, C), each pixel repeated."""
    return repeat(images, "n h w c -> n (h i) (w j) c", i=factor, j=factor)
