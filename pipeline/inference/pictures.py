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


GAP = 2  # pixels of grey between the images of a grid (after zooming)
MIN_WIDTH = 512  # a grid is zoomed by the smallest integer that makes it at least this wide


def image_grid(images: torch.Tensor, columns: int | None = None, min_width: int = MIN_WIDTH, gap: int = GAP):
    """(N, H, W, C) uint8 -> one numpy grid (rows, columns; short rows padded with black images), each
    image zoomed by the same integer factor (nearest neighbour, so its pixels stay exact squares) so
    that the grid is at least `min_width` pixels wide, with `gap` grey pixels around every image."""
    n, height, width, channels = images.shape
    columns = columns or max(1, int(n**0.5 + 0.999))
    rows = (n + columns - 1) // columns
    pad = rows * columns - n
    if pad:
        images = torch.cat([images, torch.zeros((pad, height, width, channels), dtype=images.dtype)])
    zoom = max(1, -(-(min_width - (columns + 1) * gap) // (columns * width)))
    framed = torch.nn.functional.pad(upsample_nearest(images, zoom).permute(0, 3, 1, 2), (0, gap, 0, gap), value=128)
    grid = rearrange(framed, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=columns)
    return torch.nn.functional.pad(grid.permute(2, 0, 1), (gap, 0, gap, 0), value=128).permute(1, 2, 0).numpy()


def shown_frames(count: int, limit: int = 12) -> list[int]:
    """Which of `count` growth frames a growth picture shows: all of them up to `limit`; else the
    empty canvas, then frames 1, 2, 4, 8, ... (each twice as much drawn: with S = 8 and a depth stage,
    the first slice, then ever more slices, frame 64 the whole high-bit image), frames evenly spaced
    after the last of those (the low bits arriving) and the last frame: at most `limit` in all."""
    if count <= limit:
        return list(range(count))
    powers = [2**k for k in range(count.bit_length()) if 2**k < count - 1][: limit - 2]
    room, start, end = limit - len(powers) - 2, powers[-1], count - 1
    tail = [start + round((end - start) * (i + 1) / (room + 1)) for i in range(room)]
    return sorted({0, *powers, *tail, end})


def upsample_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, h, w, C) -> (N, h*factor, w*factor, C), each pixel repeated."""
    return repeat(images, "n h w c -> n (h i) (w j) c", i=factor, j=factor)
