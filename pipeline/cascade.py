"""The cascade of trained stages: exact log-likelihood of whole images and sampling.

    log p(x) = log p_first(m_0) + sum_{k>=1} log p_size(m_k | m_<k) + sum_k log p_depth(l_k | m, l_<k)

Sampling runs the stages in that order, slice by slice, each slice by cached decoding.
Some slices may be given (`fixed`): super-resolution fixes slice 0, bit-depth
expansion fixes every MSB slice.
"""
from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange, repeat
from tqdm.auto import tqdm

from data.transforms import from_slices, merge_depth, split_depth, to_slices
from stages import STAGES
from stages.metrics import bits_per_dim

STAGE_NAMES = ("first_slice", "size_spn", "depth_spn")


class Cascade:
    def __init__(self, stages: dict):
        self.stages = {name: stage.eval() for name, stage in stages.items()}
        hp = stages["first_slice"].hparams
        self.bits, self.high_bits, self.S, self.C = hp.bits, hp.high_bits, hp.subscale, hp.channels
        first = stages["first_slice"]
        self.height, self.width, self.h, self.w = first.height, first.width, first.h, first.w
        self.dims = first.dims
        self.device = first.device
        for name, stage in stages.items():
            if (stage.hparams.bits, stage.hparams.high_bits, stage.S, stage.height, stage.C) != \
                    (self.bits, self.high_bits, self.S, self.height, self.C):
                raise ValueError(f"stage {name} was trained for another geometry than first_slice; retrain it")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.C

    @classmethod
    def load(cls, run_dir: str | Path, names: list[str], device: str | torch.device | None = None) -> "Cascade":
        """The stages `names` from `run_dir/checkpoints/<stage>.ckpt`."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        stages = {}
        for name in names:
            path = Path(run_dir) / "checkpoints" / f"{name}.ckpt"
            if not path.exists():
                raise FileNotFoundError(f"no checkpoint {path}: train the cascade first (make train-all)")
            stages[name] = STAGES[name].load_from_checkpoint(path, map_location=device, weights_only=False)
        return cls(stages)

    def to(self, device) -> "Cascade":
        self.stages = {name: stage.to(device) for name, stage in self.stages.items()}
        self.device = torch.device(device)
        return self

    # ------------------------------------------------------------ scoring
    def known(self, images: torch.Tensor) -> dict:
        """n-bit images (B, H, W, C) -> their MSB and LSB slices, (B, S*S, h, w, C) each."""
        msb, lsb = split_depth(images.long().to(self.device), self.bits, self.high_bits)
        return {"msb": to_slices(msb, self.S), "lsb": to_slices(lsb, self.S)}

    @torch.no_grad()
    def log_prob(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact log-probability in nats of n-bit images, per stage: {stage: (B,)}."""
        known = self.known(images)
        batch = images.shape[0]
        out = {"first_slice": -self.stages["first_slice"].slice_nll(known, torch.zeros(batch, dtype=torch.long,
                                                                                       device=self.device))}
        for name in ("size_spn", "depth_spn"):
            if name in self.stages:
                out[name] = -self.stages[name].nll(known)
        return out

    def bpd(self, nats: torch.Tensor | float) -> float:
        return float(bits_per_dim(nats, self.dims))

    # ------------------------------------------------------------ sampling
    def plan(self, fixed_msb=(), fixed_lsb=()) -> list[tuple[str, str, int]]:
        """The (stage, part, slice) steps that sampling takes, in order, skipping given slices."""
        steps = [("first_slice", "msb", 0)] + [("size_spn", "msb", k) for k in range(1, self.S**2)]
        if "depth_spn" in self.stages:
            steps += [("depth_spn", "lsb", k) for k in range(self.S**2)]
        return [(stage, part, k) for stage, part, k in steps
                if k not in (fixed_msb if part == "msb" else fixed_lsb)]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               known: dict | None = None, fixed_msb=(), fixed_lsb=(), frames: bool = False, progress: bool = False):
        """Draw n images. Returns n-bit images (n, H, W, C), log-prob (n,) in nats at temperature 1
        of the drawn slices, and (if frames) the list of pictures of the image growing."""
        shape = (n, self.S**2, self.h, self.w, self.C)
        known = known or {}
        known = {part: known.get(part, torch.zeros(shape, dtype=torch.long)).to(self.device).long()
                 for part in ("msb", "lsb")}
        log_prob = torch.zeros(n, device=self.device)
        steps = self.plan(fixed_msb, fixed_lsb)
        done = {"msb": set(fixed_msb), "lsb": set(fixed_lsb)}
        pictures = [self.picture(known, done)] if frames else []
        bar = tqdm(total=len(steps) * self.h * self.w * self.C, unit="sub-pixel", disable=not progress,
                   desc="sampling")
        for stage, part, k in steps:
            bar.set_description(f"{stage} slice {k}")
            values, lp = self.stages[stage].sample_slice(known, k, temperature, generator, progress=bar)
            known[part][:, k] = values
            log_prob += lp
            done[part].add(k)
            if frames:
                pictures.append(self.picture(known, done))
        bar.close()
        images = merge_depth(from_slices(known["msb"], self.S), from_slices(known["lsb"], self.S),
                             self.bits, self.high_bits)
        return images, log_prob, pictures

    def picture(self, known: dict, done: dict) -> torch.Tensor:
        """The image so far as 8-bit (n, H, W, C): missing MSB slices show slice 0 of their block
        (a blocky low-resolution image), missing LSB show as zeros."""
        msb = known["msb"].clone()
        missing = [k for k in range(self.S**2) if k not in done["msb"]]
        if missing and 0 in done["msb"]:
            msb[:, missing] = msb[:, :1]
        lsb = known["lsb"].clone()
        lsb[:, [k for k in range(self.S**2) if k not in done["lsb"]]] = 0
        x = merge_depth(from_slices(msb, self.S), from_slices(lsb, self.S), self.bits, self.high_bits)
        return to_8bit(x, self.bits).cpu()


def to_8bit(x: torch.Tensor, bits: int) -> torch.Tensor:
    """n-bit values -> the 8-bit values they stand for (the inverse of `quantize` up to dropped bits)."""
    return (x.long() << (8 - bits)).to(torch.uint8)


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
