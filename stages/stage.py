"""The three stages of the cascade as thin LightningModules around the shared networks.

    FirstSliceDecoder  log p(m_0)                  unconditional decoder over the first MSB slice
    SizeSPN            log p(m_k | m_<k), k >= 1   size-upscaling SPN, weights shared over k
    DepthSPN           log p(l_k | m, l_<k)        depth-upscaling SPN, weights shared over k

Every stage works on `known`, a dict of slices {"msb": (B, S*S, h, w, C), "lsb": ...};
the stages differ only in which slices they model and what they condition on.
Training uses the paper's Monte-Carlo estimator (one random target slice per example,
times the number of slices); validation computes the exact NLL over all of them.
"""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.callbacks import Timer
from torchmetrics import MeanMetric

from data.transforms import check_settings, from_sequence, to_sequence, to_slices
from stages import plan
from stages.metrics import bits_per_dim
from stages.networks import ConditioningNetwork, ContextConfig, DecoderConfig, SliceDecoder

# the settings that fix what a stage models; the data section of a config sets them for every stage
GEOMETRY = ("image_size", "channels", "bits", "high_bits", "subscale")


def geometry(settings: dict) -> dict:
    """The GEOMETRY entries of a config section or a stage's hyperparameters, with image_size as (H, W)."""
    size = settings["image_size"]
    return {**{key: settings[key] for key in GEOMETRY}, "image_size": (size, size) if isinstance(size, int) else tuple(size)}


class TrainingDiverged(ValueError):
    """The training loss stopped being finite; the message names the step and the learning rate."""


def scaled(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer values of `bits` bits -> floats in [-1, 1]."""
    return values.float() * (2.0 / max(2**bits - 1, 1)) - 1.0


class SubscaleStage(L.LightningModule):
    """One stage of the cascade: a `SliceDecoder` (and, for the SPNs, a `ConditioningNetwork`) over
    the slices the stage models, trained with the paper's Monte-Carlo estimator (one random target
    slice per example) and validated on the exact NLL of all its slices (`val/bpd`: its share of the whole image's
    bits/dim). Geometry: image_size (H or [H, W]), channels C, bits n, high_bits b, subscale S;
    `ordinal_init`: the decoder's value embedding and output head start smooth in the value
    (`stages.networks.ordinal_rows`); `init_from`: the earlier stage whose trained decoder this one
    starts from (`start_from`; training does it when the stage starts afresh). The learning rate warms
    up linearly for `warmup_steps`, then decays on a cosine to 0 at `max_steps`, or at the trainer's
    `max_time` when that comes first (the share of max_time spent counts from the start, warm-up
    included). Raises ValueError for settings that do not fit together or do not suit the stage."""

    stage = ""  # name of the stage: its checkpoint file and W&B job_type

    def __init__(
        self,
        image_size: int | list[int] = 28,
        channels: int = 1,
        bits: int = 8,
        high_bits: int = 8,
        subscale: int = 1,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
        ordinal_init: bool = True,
        context_width: int = 128,
        context_layers: int = 4,
        context_attention_layers: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        init_from: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else image_size
        check_settings(bits, high_bits, subscale, self.height, self.width)
        if not lr >= 0:  # 0 is allowed: the weights stay as they start (tests use it)
            raise ValueError(f"lr={lr}: the learning rate is a number of 0 or more, such as 4e-3")
        earlier = plan.ORDER[: plan.ORDER.index(self.stage)] if self.stage in plan.ORDER else ()
        if init_from is not None and init_from not in earlier:
            raise ValueError(f"init_from={init_from!r}: the {self.stage} can start from the decoder of an earlier stage "
                             f"({', '.join(earlier) or 'it has none'}), or from none")
        self.S, self.C = subscale, channels
        self.h, self.w = self.height // subscale, self.width // subscale
        self.dims = self.height * self.width * channels  # bits/dim is per sub-pixel of the whole image
        self.check_geometry()
        context = self.context_channels()
        self.context_net = None if context == 0 else ConditioningNetwork(ContextConfig(
            in_channels=context, n_slices=subscale**2, positions=self.h * self.w, width=context_width,
            layers=context_layers, attention_layers=context_attention_layers, heads=heads))
        self.decoder = SliceDecoder(DecoderConfig(
            n_values=2**self.value_bits, slice_shape=(self.h, self.w, channels), width=width,
            layers=layers, heads=heads, context_width=context_width if context else 0, dropout=dropout,
            ordinal_init=ordinal_init))
        self.val_nll = MeanMetric()
        self.time_used = 0.0  # the share of the trainer's max_time spent so far (0 without one)
        self.slice_ids = torch.tensor(self.modelled_slices())  # on the CPU, like the estimator's generator
        # before[k, j] = 1 where slice j of the modelled part is drawn before its slice k (`stages.plan`)
        self.before = torch.zeros(subscale**2, subscale**2)
        for k in range(subscale**2):
            self.before[k, plan.known_before(self.part, k, subscale)] = 1.0

    # ------------------------------------------------------------ what each stage models
    value_bits: int  # bits of the modelled sub-pixels

    @property
    def part(self) -> str:
        """The part of the image whose slices it models, "msb" or "lsb" (`stages.plan`)."""
        return plan.PART[self.stage]

    @property
    def context_parts(self) -> tuple[str, ...]:
        """The parts its conditioning network sees; of its own part, the slices before k (`stages.plan`)."""
        return plan.READS[self.stage]

    def check_geometry(self) -> None:
        """Raise ValueError when the geometry does not suit this stage."""

    def modelled_slices(self) -> list[int]:
        """The slice ids k this stage models, in generation order (`stages.plan`)."""
        return plan.modelled_slices(self.stage, self.S)

    def context_channels(self) -> int:
        """Channels of the stacked context at slice resolution (0: no conditioning)."""
        return 0

    def context_stack(self, known: dict, k: torch.Tensor) -> torch.Tensor:
        """The conditioning network's input for target slices k (B,): (B, context_channels(), h, w)."""
        raise NotImplementedError

    def target(self, known: dict) -> torch.Tensor:
        """The slices of the modelled part (B, S*S, h, w, C)."""
        return known[self.part]

    # ------------------------------------------------------------ shared machinery
    def sliced(self, batch: dict) -> dict:
        """A batch {"msb", "lsb": (B, H, W, C)} -> its slices {"msb", "lsb": (B, S*S, h, w, C)}."""
        return {part: to_slices(batch[part], self.S) for part in ("msb", "lsb")}

    def start_from(self, source: SubscaleStage) -> None:
        """Warm start: copy the trained decoder of an earlier stage `source` into this stage's decoder: the value
        embedding, the positions, the first `layers` blocks, the final norm and the head; the context projection
        and the conditioning network keep their initialisation. The stage then starts from a model of one
        slice's sub-pixels and learns to read its context. Raises ValueError when the decoders do not fit
        together (another width, number of heads, slice or number of values, or fewer layers in `source`)."""
        name, theirs = source.stage, source.decoder.state_dict()
        mismatch = ""
        if source.hparams.heads != self.hparams.heads:
            mismatch = f"its heads are {self.hparams.heads}, the {name}'s {source.hparams.heads}"
        own = {key: value for key, value in self.decoder.state_dict().items() if not key.startswith("context_projection.")}
        for key, value in own.items():
            if not mismatch and (key not in theirs or theirs[key].shape != value.shape):
                got = f"has {tuple(theirs[key].shape)}" if key in theirs else "has none"
                mismatch = f"its {key} is {tuple(value.shape)}, the {name}'s {got}"
        if mismatch:
            raise ValueError(f"the {self.stage} cannot start from the {name} decoder (init_from: {name}): {mismatch}; "
                             f"give both the same width, heads and values, and the {name} at least as many layers, "
                             f"or remove init_from")
        self.decoder.load_state_dict({key: theirs[key] for key in own}, strict=False)

    def known_mask(self, k: torch.Tensor) -> torch.Tensor:
        """(B,) target slice ids -> (B, S*S) float, 1 for the slices of the modelled part drawn before k."""
        return self.before.to(k.device)[k]

    def context(self, known: dict, k: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel context of target slices k (B,): (B, h*w, context_width), or None (first slice)."""
        if self.context_net is None:
            return None
        return self.context_net(self.context_stack(known, k), k)  # (B, h*w, context_width)

    def slice_nll(self, known: dict, k: torch.Tensor) -> torch.Tensor:
        """Exact NLL in nats of slice k[b] of each example given its true earlier context, (B,)."""
        target = self.target(known)[torch.arange(len(k), device=k.device), k]  # (B, h, w, C)
        values = to_sequence(target).long()  # (B, T)
        logits = self.decoder(values, self.context(known, k))  # (B, T, n_values)
        return F.cross_entropy(logits.float().transpose(1, 2), values, reduction="none").sum(1)

    def random_slices(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One target slice per example, uniform over this stage's slices (the estimator's draw), (B,)."""
        return self.slice_ids[torch.randint(len(self.slice_ids), (batch,), generator=generator)].to(self.device)

    def estimate(self, known: dict, k: torch.Tensor) -> torch.Tensor:
        """The paper's Monte-Carlo estimate of the stage's NLL from one slice per example, (B,)."""
        return len(self.modelled_slices()) * self.slice_nll(known, k)

    def nll(self, known: dict) -> torch.Tensor:
        """Exact NLL in nats of all of this stage's slices, (B,)."""
        batch = known["msb"].shape[0]
        return sum(self.slice_nll(known, torch.full((batch,), k, device=self.device)) for k in self.modelled_slices())

    @torch.no_grad()
    def sample_slice(self, known: dict, k: int, temperature: float = 1.0, generator=None, progress=None,
                     method: str = "fast", noise: torch.Tensor | None = None):
        """Draw slice k given `known`; returns values (B, h, w, C) and their log-prob (B,) at temperature 1.
        The noise: `noise` (B, T) uniforms, or drawn from `generator`; `method`: see `SliceDecoder.sample`."""
        batch = known["msb"].shape[0]
        ids = torch.full((batch,), k, device=self.device)
        values, log_prob = self.decoder.sample(batch, self.context(known, ids), temperature, generator,
                                               method=method, progress=progress, noise=noise)
        return from_sequence(values, self.h, self.w), log_prob

    # ------------------------------------------------------------ Lightning
    def configure_model(self) -> None:
        if self.hparams.compile:
            self.decoder.compile()
            if self.context_net is not None:
                self.context_net.compile()

    def training_step(self, batch, batch_idx):
        known = self.sliced(batch)
        # the draw depends on the seed, the step and the process only, so a resumed run draws what it would have
        draw = torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + self.global_step) * 1009
                                             + self.global_rank)
        estimate = self.estimate(known, self.random_slices(batch["msb"].shape[0], draw))  # (B,) unbiased, nats
        loss = estimate.mean() / self.dims  # nats per dim of the whole image
        if not torch.isfinite(loss):
            raise self.diverged(f"the loss is {loss.item()}")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpd", bits_per_dim(estimate.mean(), self.dims))
        return loss

    def validation_step(self, batch, batch_idx):
        known = self.sliced(batch)
        self.val_nll.update(self.nll(known))

    def on_validation_epoch_end(self):
        nll = self.val_nll.compute()
        self.val_nll.reset()
        if not torch.isfinite(nll):
            raise self.diverged(f"the validation NLL is {nll.item()}")
        self.log("val/bpd", bits_per_dim(nll, self.dims), prog_bar=True)

    def on_train_start(self):
        self.time_used = 0.0  # until the first batch reads the Timer (a fit without max_time keeps 0)

    def on_train_batch_start(self, batch, batch_idx):
        """With --trainer.max_time, note the share of it spent (rank 0's clock, so that every process
        steps at the same learning rate); the schedule ends at whichever of max_steps and max_time is first."""
        timer = next((callback for callback in self.trainer.callbacks if isinstance(callback, Timer)), None)
        if timer is not None and timer.time_remaining() is not None:
            elapsed = timer.time_elapsed()
            self.time_used = self.trainer.strategy.broadcast(elapsed / max(elapsed + timer.time_remaining(), 1e-9))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if not torch.stack([p.isfinite().all() for p in self.parameters()]).all():  # before any checkpoint sees them
            raise self.diverged("the weights hold NaN or infinity")

    def diverged(self, what: str) -> TrainingDiverged:
        """The one-line error that stops a diverging run, naming the step, the learning rate the run was
        given (`lr`, what --model.lr sets) and the rate its schedule had reached at that step. The step at
        which a too-high rate first overflows depends on the CPU's float kernels; the given rate does not."""
        now = self._trainer.optimizers[0].param_groups[0]["lr"] if self._trainer is not None else float("nan")
        return TrainingDiverged(f"{self.stage} diverged at step {self.global_step} (learning rate {self.hparams.lr:.3g}, "
                                f"{now:.3g} at that step of its schedule): {what}; "
                                f"no checkpoint holds that: lower the learning rate (ARGS=\"--model.lr=...\") "
                                f"and make the target again")

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def schedule(step: int) -> float:  # linear warmup, then cosine decay to 0 by max_steps or max_time
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(max((step - hp.warmup_steps) / max(total - hp.warmup_steps, 1), self.time_used), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FirstSliceDecoder(SubscaleStage):
    """log p(m_0): the first slice of the MSB image, unconditionally."""

    stage = "first_slice"

    @property
    def value_bits(self) -> int:
        return self.hparams.high_bits


class SizeSPN(SubscaleStage):
    """log p(m_k | m_<k) for k = 1 .. S*S-1."""

    stage = "size_spn"

    @property
    def value_bits(self) -> int:
        return self.hparams.high_bits

    def check_geometry(self):
        if self.S < 2:
            raise ValueError("the size SPN needs subscale >= 2 (with S = 1 the first slice is the whole image)")

    def context_channels(self):
        return self.S**2 * self.C + self.S**2  # MSB slices (future ones zeroed) + presence masks

    def context_stack(self, known, k):
        present = self.known_mask(k)  # (B, S*S)
        msb = scaled(known["msb"], self.hparams.high_bits) * present[:, :, None, None, None]
        mask = present[:, :, None, None].expand(-1, -1, self.h, self.w)
        return torch.cat([rearrange(msb, "b k h w c -> b (k c) h w"), mask], dim=1)


class DepthSPN(SubscaleStage):
    """log p(l_k | m, l_<k) for k = 0 .. S*S-1: the low bits given all the high bits."""

    stage = "depth_spn"

    @property
    def value_bits(self) -> int:
        return self.hparams.bits - self.hparams.high_bits

    def check_geometry(self):
        if self.hparams.high_bits >= self.hparams.bits:
            raise ValueError("the depth SPN needs high_bits < bits (with b = n there are no low bits to model)")

    def context_channels(self):
        return 2 * self.S**2 * self.C + self.S**2  # all MSB slices + LSB slices < k + presence masks

    def context_stack(self, known, k):
        hp = self.hparams
        present = self.known_mask(k)
        msb = scaled(known["msb"], hp.high_bits)
        lsb = scaled(known["lsb"], hp.bits - hp.high_bits) * present[:, :, None, None, None]
        mask = present[:, :, None, None].expand(-1, -1, self.h, self.w)
        return torch.cat([rearrange(msb, "b k h w c -> b (k c) h w"),
                          rearrange(lsb, "b k h w c -> b (k c) h w"), mask], dim=1)


STAGES = {cls.stage: cls for cls in (FirstSliceDecoder, SizeSPN, DepthSPN)}
