"""Lightning callbacks of the training loop: the validation sample grid, FID/KID at validation,
plain-text progress."""
from __future__ import annotations

import sys
import time

import torch
from einops import rearrange
from lightning.pytorch.callbacks import Callback

from pipeline.inference.pictures import partial_image
from stages.plan import known_after, plan


@torch.no_grad()
def stage_pictures(stage, batch: dict, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What a stage sees and draws, for the first n images of a validation batch: 8-bit pictures
    (n, H, W, C) of the true images and of the stage's own samples given the true context (the
    first-slice decoder's slice, blocky; the size SPN's high bits; the depth SPN's whole image)."""
    truth = stage.sliced({part: batch[part][:n] for part in ("msb", "lsb")})
    truth = {part: slices.long() for part, slices in truth.items()}
    drawn = {part: slices.clone() for part, slices in truth.items()}
    generator = torch.Generator(stage.device).manual_seed(seed)
    steps = plan([stage.stage], stage.S)
    for step in steps:
        drawn[step.part][:, step.k] = stage.sample_slice(truth, step.k, generator=generator)[0]
    every = list(range(stage.S**2))
    shown = known_after(steps, {part: every for part in steps[0].reads})  # what it reads and what it draws
    hp = stage.hparams
    truth_pictures, drawn_pictures = (partial_image(known, shown, stage.S, hp.bits, hp.high_bits) for known in (truth, drawn))
    return truth_pictures, drawn_pictures


class SampleGrid(Callback):
    """At each validation, log `n` true images (top row) over the stage's own samples given the
    true context (bottom row) to the logger as `val/samples`.

    A row shows what the stage sees or draws: the first-slice decoder's slice (blocky), the
    size SPN's high bits, the depth SPN's whole image.
    """

    def __init__(self, n: int = 8):
        self.n = n

    def on_validation_batch_end(self, trainer, stage, outputs, batch, batch_idx, dataloader_idx=0):
        log_image = getattr(trainer.logger, "log_image", None)
        if batch_idx != 0 or self.n < 1 or log_image is None or not trainer.is_global_zero:
            return
        rows = stage_pictures(stage, batch, self.n)
        grid = rearrange(torch.stack(rows), "r n h w c -> (r h) (n w) c").numpy()
        log_image(key="val/samples", images=[grid.squeeze(-1) if stage.C == 1 else grid],
                  caption=["top: data; bottom: samples given the true context"])


class ValidationQuality(Callback):
    """At each validation (not the sanity check), FID and KID (`pipeline.inference.quality.fid_kid`) between the
    stage's own samples given the true context and the true images, as `stage_pictures` draws them,
    over the first `n` validation images, in the features of the run's feature network `net`; logged
    as val/fid and val/kid. A noisy figure for the curve of one run (compare `make quality`'s figures
    between runs); it costs drawing the stage's slices of n images at every validation."""

    def __init__(self, net, n: int = 64):
        self.net, self.n = net, n
        self.truth, self.drawn = [], []

    def on_validation_epoch_start(self, trainer, stage):
        self.truth, self.drawn = [], []

    def on_validation_batch_end(self, trainer, stage, outputs, batch, batch_idx, dataloader_idx=0):
        have = sum(len(x) for x in self.truth)
        if trainer.sanity_checking or not trainer.is_global_zero or have >= self.n:
            return
        truth, drawn = stage_pictures(stage, batch, self.n - have, seed=batch_idx)
        self.truth.append(truth)
        self.drawn.append(drawn)

    def on_validation_epoch_end(self, trainer, stage):
        if trainer.sanity_checking or not trainer.is_global_zero or sum(len(x) for x in self.truth) < 2:
            return
        from pipeline.inference.quality import fid_kid

        layout = lambda pictures: torch.cat(pictures).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        scores = fid_kid(self.net, layout(self.truth), layout(self.drawn))
        if trainer.logger is not None:
            trainer.logger.log_metrics({"val/fid": scores["fid"], "val/kid": scores["kid"]}, step=trainer.global_step)
        trainer.callback_metrics["val/fid"] = torch.tensor(scores["fid"])


class PlainProgress(Callback):
    """Progress as one plain line every `every` training steps (default: a twentieth of the run)
    and after each validation, for logs that are not a terminal (Lightning's progress bar
    redraws itself at every step)."""

    def __init__(self, every: int | None = None, stream=None):
        self.every, self.stream = every, stream or sys.stdout
        self.start = self.start_step = None

    def line(self, trainer, stage, text: str) -> None:
        if trainer.is_global_zero:
            print(f"{stage.stage} step {trainer.global_step}/{trainer.max_steps}: {text}", file=self.stream, flush=True)

    def on_train_start(self, trainer, stage):
        self.start, self.start_step = time.monotonic(), trainer.global_step
        self.every = self.every or max(1, trainer.max_steps // 20)

    def on_train_batch_end(self, trainer, stage, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        seconds = time.monotonic() - self.start
        rate = (step - self.start_step) / max(seconds, 1e-9)
        left = (trainer.max_steps - step) / rate if rate > 0 and trainer.max_steps > 0 else float("nan")
        bpd = trainer.callback_metrics.get("train/bpd")
        loss = f"train/bpd {float(bpd):.3f}, " if bpd is not None else ""
        self.line(trainer, stage, f"{loss}{rate:.1f} steps/s, {seconds / 60:.1f} min so far, "
                                  f"about {left / 60:.1f} min left")

    def on_validation_end(self, trainer, stage):
        value = trainer.callback_metrics.get("val/bpd")
        if value is not None and not trainer.sanity_checking:
            fid = trainer.callback_metrics.get("val/fid")
            self.line(trainer, stage, f"val/bpd {float(value):.4f}" + (f", val/fid {float(fid):.2f}" if fid is not None else ""))
