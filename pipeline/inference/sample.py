"""`make sample`, `make upscale`, `make deepen`: draw images from the cascade.

Outputs (in `$(RUN_DIR)/samples/`, or `upscale/`, `deepen/`): samples.npz with
    images          uint8 (N, H, W, C), 8-bit values
    log_prob        float64 (N,), log p(image) in nats under the whole cascade (temperature 1),
                    so that `make evaluate IMAGES=.../samples.npz` gives back the same numbers
    log_prob_drawn  float64 (N,), nats: the part that was drawn (upscale: every slice but slice 0,
                    given it; deepen: the low bits given the high bits; sample: the whole image)
both NaN when sampled at a temperature other than 1; grid.png, and growth.png / growth.gif,
the image growing slice by slice and bit by bit.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from data.transforms import quantize, split_depth, to_slices
from pipeline.config import data_geometry, load_experiment, stage_names
from pipeline.inference.cascade import Cascade
from pipeline.inference.pictures import image_grid, shown_frames, to_8bit, upsample_nearest
from pipeline.io import check_shape, folder_at_once, read_image, save_gif, save_npz, save_png
from pipeline.tracking import log_job


def exact_float32() -> None:
    """Full float32 in matrix products and convolutions from now on, in this process: never TF32 on a
    GPU (cuBLAS, cuDNN) nor a lower internal precision elsewhere, so that exact scores (evaluate, the
    sampler's log_prob, the codec) do not depend on the hardware's defaults."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def load_cascade(args) -> tuple[dict, Cascade]:
    """The experiment's config and its trained cascade, to be run in full float32 (`exact_float32`);
    raises ValueError when they disagree on the geometry, FileNotFoundError when a stage is not trained."""
    exact_float32()
    experiment = load_experiment(args.exp)
    return experiment, Cascade.load(args.run_dir, stage_names(experiment), expected=data_geometry(experiment))


def check_sampling_settings(n: int, batch: int, temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"TEMPERATURE={temperature} is invalid: use a positive number (1.0 is exact)")
    if n < 1 or batch < 1:
        raise ValueError(f"N={n}, BATCH={batch}: both must be at least 1")


def available_memory() -> int | None:
    """Bytes of memory this process may still take: Linux's MemAvailable, or less when a cgroup (a
    container, a scheduler's job) limits it; None where unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def check_memory(n: int, batch: int, cascade: Cascade, given: bool = False) -> None:
    """Raise ValueError (lower N, or BATCH) when drawing n images `batch` at a time needs more memory than
    is available: at least 16 bytes per sub-pixel of the n images (their n-bit values, as the batches
    and once joined; 16 more for the `given` slices of upscale and deepen) and, per image of a batch,
    24 bytes per sub-pixel (its known slices and noise) and the 4 kB state of its noise generator."""
    available = available_memory()
    batch = min(batch, n)
    outputs = (32 if given else 16) * n * cascade.dims
    need = outputs + batch * (24 * cascade.dims + 4096)
    if available is not None and need > available:
        gib = 2**30
        what = "N" if outputs > available / 2 else "BATCH (and N)"
        raise ValueError(f"N={n} images of {' x '.join(map(str, cascade.shape))} drawn BATCH={batch} at a time need "
                         f"at least {need / gib:,.1f} GiB of memory, and {available / gib:,.1f} GiB are available: "
                         f"lower {what}")


def draw(cascade: Cascade, n: int, batch: int, temperature: float, seed: int, conditions=None, fixed_msb=(),
         fixed_lsb=()):
    """Draw n images in batches from one seeded generator; conditions: (n, ...) sliced known parts.
    Returns n-bit images (n, H, W, C), the log-prob of the drawn slices (n,) and the growth pictures."""
    check_sampling_settings(n, batch, temperature)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the images do not depend on the device
    images, log_probs, growth = [], [], None
    for start in range(0, n, batch):
        size = min(batch, n - start)
        known = None if conditions is None else {p: v[start:start + size] for p, v in conditions.items()}
        images_in = f"image {start + 1}" if size == 1 else f"images {start + 1}-{start + size}"
        bar = "sampling" if size == n else f"sampling {images_in} of {n}"  # one bar a batch
        x, lp, frames = cascade.sample(size, temperature, generator, known, fixed_msb, fixed_lsb,
                                       frames=start == 0, progress=bar)
        images.append(x.cpu())
        log_probs.append(lp.cpu())
        growth = growth if growth is not None else frames
    return torch.cat(images), torch.cat(log_probs).double().numpy(), growth


def log_p_images(cascade: Cascade, images: torch.Tensor, batch: int) -> np.ndarray:
    """log p(image) in nats under the whole cascade, (n,) float64."""
    parts = [sum(cascade.log_prob(images[i:i + batch]).values()).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy()


def write_outputs(out: Path, cascade: Cascade, images: torch.Tensor, log_prob: np.ndarray,
                  log_prob_drawn: np.ndarray, temperature: float, growth: list, job: str, experiment: dict,
                  given: torch.Tensor | None = None) -> None:
    """samples.npz, grid.png (the given image first, when there is one), growth.png and .gif; W&B."""
    if temperature != 1.0:  # the recorded log-probabilities are those of the temperature-1 model
        log_prob, log_prob_drawn = np.full_like(log_prob, np.nan), np.full_like(log_prob_drawn, np.nan)
    images8 = to_8bit(images, cascade.bits)
    grid_images = images8 if given is None else torch.cat([given, images8])
    columns = None if given is None else max(len(given), int(math.sqrt(len(grid_images)) + 0.999))
    shown = slice(0, min(4, len(images)))  # growth of the first few images: one row each
    with folder_at_once(out) as folder:
        save_npz(folder / "samples.npz", images=images8.numpy(), log_prob=log_prob, log_prob_drawn=log_prob_drawn)
        save_png(folder / "grid.png", image_grid(grid_images, columns))
        frames = [growth[i] for i in shown_frames(len(growth))]
        steps = torch.stack([frame[shown] for frame in frames], 1)  # (images, frames, H, W, C): one row per image
        save_png(folder / "growth.png", image_grid(steps.flatten(0, 1), columns=len(frames)))
        save_gif(folder / "growth.gif", [image_grid(frame[shown], columns=shown.stop) for frame in growth])
    bpd = cascade.bpd(-log_prob.mean()) if np.isfinite(log_prob).all() else float("nan")
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} to {out}/ "
          f"(samples.npz, grid.png, growth.png, growth.gif); bits/dim of the images under the cascade: {bpd:.3f}")
    log_job(experiment, job, out.parent, {f"{job}/bpd_of_samples": bpd},
            {f"{job}/grid": out / "grid.png", f"{job}/growth": out / "growth.png"})


def main(args) -> None:
    check_sampling_settings(args.n, args.batch, args.temperature)
    experiment, cascade = load_cascade(args)
    check_memory(args.n, args.batch, cascade)
    images, log_prob, growth = draw(cascade, args.n, args.batch, args.temperature, args.seed)
    write_outputs(Path(args.run_dir) / "samples", cascade, images, log_prob, log_prob, args.temperature, growth,
                  "sample", experiment)


def upscale(args) -> None:
    """Super-resolution: the input (H/S x W/S) is slice 0; the other slices are drawn.

    Exact for b = n. With a depth stage the MSB of slices >= 1 are drawn given m_0 only
    (conditioning them on l_0 too would weight each by p(l_0 | m)), then the LSB exactly.
    """
    check_sampling_settings(args.n, args.batch, args.temperature)
    experiment = load_experiment(args.exp)
    if "size_spn" not in stage_names(experiment):  # before the checkpoints: an untrained run says it too
        raise ValueError(f"experiment {experiment['name']!r} has S = 1: there is nothing to upscale")
    experiment, cascade = load_cascade(args)
    check_memory(args.n, args.batch, cascade, given=True)
    low = read_image(args.input, cascade.C, experiment["data"].get("background", "white"))[None]
    check_shape(low, (cascade.h, cascade.w, cascade.C), f"INPUT {args.input}")
    x0 = quantize(torch.from_numpy(low).long(), cascade.bits).expand(args.n, -1, -1, -1)
    m0, l0 = split_depth(x0, cascade.bits, cascade.high_bits)
    shape = (args.n, cascade.S**2, cascade.h, cascade.w, cascade.C)
    known = {"msb": torch.zeros(shape, dtype=torch.long), "lsb": torch.zeros(shape, dtype=torch.long)}
    known["msb"][:, 0], known["lsb"][:, 0] = m0, l0
    images, drawn, growth = draw(cascade, args.n, args.batch, args.temperature, args.seed, known,
                                 fixed_msb=[0], fixed_lsb=[0])
    if not torch.equal(to_slices(images, cascade.S)[:, 0], x0):
        raise RuntimeError("upscale changed slice 0, which it must keep: a bug, please report it")
    given = upsample_nearest(to_8bit(x0[:1], cascade.bits), cascade.S)
    write_outputs(Path(args.run_dir) / "upscale", cascade, images, log_p_images(cascade, images, args.batch), drawn,
                  args.temperature, growth, "upscale", experiment, given)


def deepen(args) -> None:
    """Bit-depth expansion: the input's b high bits are kept, the low bits drawn."""
    check_sampling_settings(args.n, args.batch, args.temperature)
    experiment = load_experiment(args.exp)
    if "depth_spn" not in stage_names(experiment):  # before the checkpoints: an untrained run says it too
        raise ValueError(f"experiment {experiment['name']!r} has no depth stage (b = n): nothing to deepen")
    experiment, cascade = load_cascade(args)
    check_memory(args.n, args.batch, cascade, given=True)
    image = read_image(args.input, cascade.C, experiment["data"].get("background", "white"))[None]
    check_shape(image, cascade.shape, f"INPUT {args.input}")
    x = quantize(torch.from_numpy(image).long(), cascade.bits).expand(args.n, -1, -1, -1)
    msb, _ = split_depth(x, cascade.bits, cascade.high_bits)
    known = {"msb": to_slices(msb, cascade.S)}
    images, drawn, growth = draw(cascade, args.n, args.batch, args.temperature, args.seed, known,
                                 fixed_msb=list(range(cascade.S**2)))
    if not torch.equal(split_depth(images, cascade.bits, cascade.high_bits)[0], msb):
        raise RuntimeError("deepen changed the high bits, which it must keep: a bug, please report it")
    given = to_8bit(msb[:1] << (cascade.bits - cascade.high_bits), cascade.bits)
    write_outputs(Path(args.run_dir) / "deepen", cascade, images, log_p_images(cascade, images, args.batch), drawn,
                  args.temperature, growth, "deepen", experiment, given)
