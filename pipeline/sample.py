"""`make sample`, `make upscale`, `make deepen`: draw images from the cascade.

Outputs (in `$(RUN_DIR)/samples/`, or `upscale/`, `deepen/`): samples.npz with `images`
(uint8, N x H x W x C, 8-bit values) and `log_prob` (nats per image at temperature 1;
NaN at another temperature), grid.png, and growth.png / growth.gif, the image growing
slice by slice and bit by bit.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from data.transforms import quantize, split_depth, to_slices
from pipeline.cascade import Cascade, image_grid, to_8bit, upsample_nearest
from pipeline.config import load_experiment, stage_names, wandb_mode
from pipeline.io import check_shape, read_image, save_gif, save_npz, save_png


def load_cascade(args) -> tuple[dict, Cascade]:
    experiment = load_experiment(args.exp)
    return experiment, Cascade.load(args.run_dir, stage_names(experiment))


def draw(cascade: Cascade, n: int, batch: int, temperature: float, seed: int, conditions=None, fixed_msb=(),
         fixed_lsb=()):
    """Draw n images in batches from one seeded generator; conditions: (n, ...) sliced known parts."""
    if temperature <= 0:
        raise ValueError(f"TEMPERATURE={temperature} is invalid: use a positive temperature (1.0 is exact)")
    if n < 1 or batch < 1:
        raise ValueError(f"N={n}, BATCH={batch}: both must be at least 1")
    generator = torch.Generator(cascade.device).manual_seed(seed)
    images, log_probs, growth = [], [], None
    for start in range(0, n, batch):
        size = min(batch, n - start)
        known = None if conditions is None else {p: v[start:start + size] for p, v in conditions.items()}
        x, lp, frames = cascade.sample(size, temperature, generator, known, fixed_msb, fixed_lsb,
                                       frames=start == 0, progress=True)
        images.append(x.cpu())
        log_probs.append(lp.cpu())
        growth = growth if growth is not None else frames
    log_prob = torch.cat(log_probs).double().numpy()
    if temperature != 1.0:
        log_prob[:] = np.nan  # the recorded log-probability is that of the temperature-1 model
    return torch.cat(images), log_prob, growth


def write_outputs(out: Path, cascade: Cascade, images: torch.Tensor, log_prob: np.ndarray, growth: list,
                  title: str, experiment: dict, extra_left: torch.Tensor | None = None) -> None:
    images8 = to_8bit(images, cascade.bits)
    grid_images = images8 if extra_left is None else torch.cat([extra_left, images8])
    columns = None if extra_left is None else max(len(extra_left), int(math.sqrt(len(grid_images)) + 0.999))
    save_npz(out / "samples.npz", images=images8.numpy(), log_prob=log_prob)
    save_png(out / "grid.png", image_grid(grid_images, columns))
    shown = slice(0, min(4, len(images)))  # growth of the first few images: one row each
    strip = np.concatenate([image_grid(frame[shown], columns=1) for frame in growth], axis=1)
    save_png(out / "growth.png", strip)
    save_gif(out / "growth.gif", [image_grid(frame[shown], columns=shown.stop) for frame in growth])
    finite = np.isfinite(log_prob)
    bpd = cascade.bpd(-log_prob[finite].mean()) if finite.any() else float("nan")
    print(f"wrote {len(images)} images to {out}/ (samples.npz, grid.png, growth.png, growth.gif); "
          f"their own bits/dim: {bpd:.3f}")
    log_to_wandb(out, experiment, title, bpd)


def log_to_wandb(out: Path, experiment: dict, job: str, bpd: float) -> None:
    """Samples join the experiment's W&B group as a run of job_type `job`."""
    mode = wandb_mode()
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=experiment.get("wandb", {}).get("project", "subscale-pixel-networks"),
                     group=experiment["name"], job_type=job, name=f"{experiment['name']}-{job}",
                     dir=str(out), mode=mode, reinit="finish_previous")
    run.log({f"{job}/grid": wandb.Image(str(out / "grid.png")), f"{job}/growth": wandb.Image(str(out / "growth.png")),
             f"{job}/bpd_of_samples": bpd})
    run.finish()


def main(args) -> None:
    experiment, cascade = load_cascade(args)
    images, log_prob, growth = draw(cascade, args.n, args.batch, args.temperature, args.seed)
    write_outputs(Path(args.run_dir) / "samples", cascade, images, log_prob, growth, "sample", experiment)


def upscale(args) -> None:
    """Super-resolution: the input (H/S x W/S) is slice 0; the other slices are drawn.

    Exact for b = n. With a depth stage the MSB of slices >= 1 are drawn given m_0 only
    (conditioning them on l_0 too would weight each by p(l_0 | m)), then the LSB exactly.
    """
    experiment, cascade = load_cascade(args)
    if cascade.S == 1:
        raise ValueError(f"experiment {experiment['name']!r} has S = 1: there is nothing to upscale")
    low = read_image(args.input)[None]
    check_shape(low, (cascade.h, cascade.w, cascade.C), f"INPUT {args.input}")
    x0 = quantize(torch.from_numpy(low).long(), cascade.bits).expand(args.n, -1, -1, -1)
    m0, l0 = split_depth(x0, cascade.bits, cascade.high_bits)
    shape = (args.n, cascade.S**2, cascade.h, cascade.w, cascade.C)
    known = {"msb": torch.zeros(shape, dtype=torch.long), "lsb": torch.zeros(shape, dtype=torch.long)}
    known["msb"][:, 0], known["lsb"][:, 0] = m0, l0
    images, log_prob, growth = draw(cascade, args.n, args.batch, args.temperature, args.seed, known,
                                    fixed_msb=[0], fixed_lsb=[0])
    assert torch.equal(to_slices(images, cascade.S)[:, 0], x0), "slice 0 must equal the input"
    given = upsample_nearest(to_8bit(x0[:1], cascade.bits), cascade.S)
    write_outputs(Path(args.run_dir) / "upscale", cascade, images, log_prob, growth, "upscale", experiment, given)


def deepen(args) -> None:
    """Bit-depth expansion: the input's b high bits are kept, the low bits drawn."""
    experiment, cascade = load_cascade(args)
    if "depth_spn" not in cascade.stages:
        raise ValueError(f"experiment {experiment['name']!r} has no depth stage (b = n): nothing to deepen")
    image = read_image(args.input)[None]
    check_shape(image, cascade.shape, f"INPUT {args.input}")
    x = quantize(torch.from_numpy(image).long(), cascade.bits).expand(args.n, -1, -1, -1)
    msb, _ = split_depth(x, cascade.bits, cascade.high_bits)
    known = {"msb": to_slices(msb, cascade.S)}
    images, log_prob, growth = draw(cascade, args.n, args.batch, args.temperature, args.seed, known,
                                    fixed_msb=list(range(cascade.S**2)))
    assert torch.equal(split_depth(images, cascade.bits, cascade.high_bits)[0], msb), "the high bits must be kept"
    given = to_8bit(msb[:1] << (cascade.bits - cascade.high_bits), cascade.bits)
    write_outputs(Path(args.run_dir) / "deepen", cascade, images, log_prob, growth, "deepen", experiment, given)
