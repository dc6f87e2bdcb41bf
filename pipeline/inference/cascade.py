"""The cascade of trained stages: exact log-likelihood of whole images and sampling.

    log p(x) = log p_first(m_0) + sum_{k>=1} log p_size(m_k | m_<k) + sum_k log p_depth(l_k | m, l_<k)

Scoring and sampling take the slices in the cascade's order (`stages.plan`), each slice drawn by
cached decoding. Some slices may be given (`fixed`): super-resolution fixes slice 0, bit-depth
expansion fixes every MSB slice.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data.transforms import from_slices, merge_depth, split_depth, to_slices
from pipeline.checkpoints import load_stage
from pipeline.inference.pictures import partial_image
from pipeline.inference.processes import in_processes
from pipeline.progress import progress_bar
from stages import GEOMETRY, geometry, native
from stages.metrics import bits_per_dim
from stages.plan import Step, known_after, plan


def differences(a: dict, b: dict) -> tuple[str, str]:
    """The GEOMETRY settings in which two geometries differ, as 'key=value, ...' of each ('' if none)."""
    keys = [key for key in GEOMETRY if a[key] != b[key]]
    return tuple(", ".join(f"{key}={side[key]}" for key in keys) for side in (a, b))


def stage_sums(slices: dict[Step, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-slice log-probabilities {step: (B,) nats} (`Cascade.slice_log_prob`) -> each stage's sum,
    {stage: (B,) nats}, added in the order given."""
    out = {}
    for step, nats in slices.items():
        out[step.stage] = out[step.stage] + nats if step.stage in out else nats
    return out


class Cascade:
    """The trained stages of one experiment, {stage name: SubscaleStage}; raises ValueError when
    they were trained for different geometries (image size, channels, bits, high bits, S)."""

    def __init__(self, stages: dict):
        self.stages = {name: stage.eval() for name, stage in stages.items()}
        first = stages["first_slice"]
        hp = first.hparams
        self.bits, self.high_bits, self.S, self.C = hp.bits, hp.high_bits, hp.subscale, hp.channels
        self.height, self.width, self.h, self.w = first.height, first.width, first.h, first.w
        self.dims = first.dims
        self.device = first.device
        self.geometry = geometry(hp)
        for name, stage in stages.items():
            theirs, ours = differences(geometry(stage.hparams), self.geometry)
            if theirs:
                raise ValueError(f"stage {name} was trained with {theirs}, first_slice with {ours}: "
                                 f"retrain {name} with the settings of the other stages")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images."""
        return self.height, self.width, self.C

    @classmethod
    def load(cls, run_dir: str | Path, names: list[str], device: str | torch.device | None = None,
             expected: dict | None = None) -> "Cascade":
        """The stages `names` from `run_dir/checkpoints/<stage>.ckpt`. With `expected` (a config's data
        section), raises ValueError naming every geometry setting the checkpoints were not trained with."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        stages = {}
        for name in names:
            path = Path(run_dir) / "checkpoints" / f"{name}.ckpt"
            stages[name] = load_stage(name, path, device)
            config, trained = differences(geometry(expected), geometry(stages[name].hparams)) if expected else ("", "")
            if config:
                raise ValueError(f"the config says {config} but {path} was trained with {trained}: put the "
                                 f"config back, or retrain with the new settings (make clean train-all)")
        return cls(stages)

    def to(self, device) -> "Cascade":
        """Move every stage to `device`."""
        self.stages = {name: stage.to(device) for name, stage in self.stages.items()}
        self.device = torch.device(device)
        return self

    # ------------------------------------------------------------ scoring
    def known(self, images: torch.Tensor) -> dict:
        """n-bit images (B, H, W, C) -> their MSB and LSB slices, (B, S*S, h, w, C) each."""
        msb, lsb = split_depth(images.long().to(self.device), self.bits, self.high_bits)
        return {"msb": to_slices(msb, self.S), "lsb": to_slices(lsb, self.S)}

    @torch.no_grad()
    def slice_log_prob(self, images: torch.Tensor) -> dict[Step, torch.Tensor]:
        """Exact log-probability in nats of each slice of n-bit images (B, H, W, C) given its true
        context: {step of the cascade's order (`plan`): (B,)}, in that order."""
        known = self.known(images)
        out = {}
        for step in self.plan():
            k = torch.full((images.shape[0],), step.k, dtype=torch.long, device=self.device)
            out[step] = -self.stages[step.stage].slice_nll(known, k)
        return out

    @torch.no_grad()
    def log_prob(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact log-probability in nats of n-bit images, per stage: {stage: (B,)}, the sum over the
        stage's slices in the cascade's order."""
        return stage_sums(self.slice_log_prob(images))

    def bpd(self, nats: torch.Tensor | float) -> float:
        """Nats per image -> bits per dimension of these images."""
        return float(bits_per_dim(nats, self.dims))

    # ------------------------------------------------------------ sampling
    def plan(self, fixed_msb=(), fixed_lsb=()) -> list[Step]:
        """The steps (stage, part, k, reads) of the cascade's order (`stages.plan`) for its stages,
        leaving out the given MSB slices `fixed_msb` and LSB slices `fixed_lsb`."""
        fixed = {"msb": set(fixed_msb), "lsb": set(fixed_lsb)}
        return [step for step in plan(self.stages, self.S) if step.k not in fixed[step.part]]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
               known: dict | None = None, fixed_msb=(), fixed_lsb=(), frames: bool = False, progress: bool | str = False,
               method: str = "fast", workers: int | None = None):
        """Draw n images, slice by slice in the cascade's order, skipping the given slices (`known`:
        {"msb"|"lsb": (n, S*S, h, w, C) n-bit slices}, of which `fixed_msb`/`fixed_lsb` are kept).

        Returns n-bit images (n, H, W, C); the log-probability in nats at temperature 1 of the
        drawn slices given the rest, (n,) (of the whole image when nothing is fixed); and, if
        `frames`, pictures of the image growing, one per slice: 8-bit (n, H, W, C) each.
        `progress`: a bar of the sub-pixels drawn, described by the string given, if one is. `method` is the
        decoding of each slice (see `SliceDecoder.sample`). Each image draws its noise
        from a generator of its own, seeded by the next number of `generator`: the i-th image drawn
        from a generator is the same however the images are split into batches. On a CPU the images
        are split between `workers` forked processes (`pipeline.inference.processes`; by default one
        per thread torch may use, at most n; 1 keeps it in this process).
        """
        shape = (n, self.S**2, self.h, self.w, self.C)
        known = known or {}
        known = {part: known[part].to(self.device, torch.long, copy=True) if part in known  # never the caller's
                 else torch.zeros(shape, dtype=torch.long, device=self.device) for part in ("msb", "lsb")}
        seeds = self.image_seeds(n, generator)
        if method in ("fast", "native"):  # build or load the C++ sampler once, here, before the bar and the forks
            native.usable(self.device, torch.float32)
        steps = len(self.plan(fixed_msb, fixed_lsb)) * self.h * self.w * self.C * n
        bar = progress_bar(steps, progress if isinstance(progress, str) else "sampling", "sub-pixel", disable=not progress)

        def share(rows, progress):  # rows: the indices of one process's images
            part = {name: slices[rows] for name, slices in known.items()}
            return self.draw(seeds[rows], part, fixed_msb, fixed_lsb, frames, temperature, method, progress)

        drawn = in_processes(share, torch.arange(n), bar, self.device, workers)
        out = (torch.cat([images for images, _, _ in drawn]), torch.cat([log_prob for _, log_prob, _ in drawn]),
               [torch.cat(frame) for frame in zip(*(pictures for _, _, pictures in drawn))])
        bar.close()
        return out

    @staticmethod
    def image_seeds(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The seeds (n,) of the noise generators of the next n images drawn from `generator` (a CPU
        generator, so that images do not depend on the device; None: torch's default one)."""
        return torch.randint(2**62, (n,), generator=generator)

    def slice_noise(self, stream: torch.Generator) -> torch.Tensor:
        """The uniforms (T,) of one image's next slice, from its own generator `stream`; the slices of
        an image draw theirs in the order of `plan`."""
        return torch.rand(self.h * self.w * self.C, generator=stream)

    def draw(self, seeds: torch.Tensor, known: dict, fixed_msb, fixed_lsb, frames: bool, temperature: float,
             method: str, progress):
        """`sample` in this process: the images whose noise generators are seeded by `seeds` (n,), given
        `known` (filled in place); progress counts sub-pixels drawn."""
        n = len(seeds)
        log_prob = torch.zeros(n, device=self.device)
        streams = [torch.Generator().manual_seed(int(seed)) for seed in seeds]  # one per image, on the CPU
        given = {"msb": fixed_msb, "lsb": fixed_lsb}
        steps = self.plan(fixed_msb, fixed_lsb)
        pictures = [self.picture(known, known_after([], given))] if frames else []
        for i, (stage, part, k, _) in enumerate(steps):
            noise = torch.stack([self.slice_noise(g) for g in streams])  # (n, T)
            values, lp = self.stages[stage].sample_slice(known, k, temperature, None, progress, method, noise)
            known[part][:, k] = values
            log_prob += lp
            if frames:
                pictures.append(self.picture(known, known_after(steps[: i + 1], given)))
        images = merge_depth(from_slices(known["msb"], self.S), from_slices(known["lsb"], self.S),
                             self.bits, self.high_bits)
        return images, log_prob, pictures

    def picture(self, known: dict, done: dict) -> torch.Tensor:
        """The image so far, 8-bit (n, H, W, C) (see `pipeline.inference.pictures.partial_image`)."""
        return partial_image(known, done, self.S, self.bits, self.high_bits)
