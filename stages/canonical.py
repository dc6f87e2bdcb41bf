"""The codec's probabilities in pinned float arithmetic (`stages/canonical.cpp`), the same on every CPU.

A compressed file decodes only where the decoder computes the encoder's probabilities bit for
bit. PyTorch's kernels do not promise that between CPU kinds (vector width, MKL's code path and
thread count reorder sums), so `pipeline.codec.coder` computes the conditioning network and the cached
slice decoder with `stages/canonical.cpp` instead: fixed order of every sum, only correctly rounded
IEEE-754 operations, exp and erf computed from them, compiled with -ffp-contract=off. The context
stack the conditioning network reads is built by the stage (`context_stack`) from integers by one
multiplication and one subtraction per value, which are correctly rounded everywhere too.

The module is built with this machine's C++ compiler like the slice sampler (`stages.native`);
its vector flags follow the CPU, and change the speed only, never a result (a test decodes under
one build what another encoded). Without a compiler the codec cannot run: `CanonicalUnavailable`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from stages import native

SOURCE = Path(__file__).with_name("canonical.cpp")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]  # contract=off pins the arithmetic;
# no-trapping-math lets the loops of exp and erf vectorise (selects for branches), which changes no result


class CanonicalUnavailable(OSError):
    """The pinned arithmetic cannot be built here (no C++ compiler): a missing tool, like a missing file."""


@functools.cache
def load():
    """The compiled module; raises CanonicalUnavailable when it cannot be built."""
    module = native.build_extension("spn_canonical", SOURCE, FLAGS, what="the codec's pinned arithmetic",
                                    instead="make compress and decompress cannot run")
    if module is None:
        raise CanonicalUnavailable("the codec needs its C++ module (the note above says why it was not built): "
                                   "install a C++ compiler (apt-get install g++) and run the command again")
    return module


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by their own names, as contiguous CPU float32 tensors (integer
    buffers kept as int64): the one layout the C++ side reads, which refuses a name it does not
    compute."""
    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        tensor = tensor.detach().cpu()
        out[name] = (tensor.long() if not tensor.is_floating_point() else tensor.float()).contiguous()
    return out


def norm_eps(module: nn.Module) -> float:
    """The one epsilon of every layer and group norm in `module`; raises ValueError otherwise, and for a
    GELU that is not the exact (erf) one."""
    eps = {m.eps for m in module.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))}
    if len(eps) > 1:
        raise ValueError(f"norms with epsilons {sorted(eps)}: the codec's pinned path computes one")
    if any(isinstance(m, nn.GELU) and m.approximate != "none" for m in module.modules()):
        raise ValueError("a tanh-approximated GELU: the codec's pinned path computes the exact one")
    return float(eps.pop()) if eps else 1e-5


def context(stage, known: dict, k: torch.Tensor) -> torch.Tensor | None:
    """The stage's context of target slices k (B,), (B, h*w, context_width) float32, or None for the
    first-slice decoder: `stage.context` in pinned arithmetic."""
    if stage.context_net is None:
        return None
    stack = stage.context_stack(known, k).float().cpu().contiguous()
    net = stage.context_net
    return load().context(weights(net), stack, k.cpu().long().contiguous(), net.cfg.heads, norm_eps(net))


class Decoder:
    """Cached decoding of one slice for `batch` sequences in pinned arithmetic: `step(previous, t)`
    returns the probabilities (B, 2**bits) float64 of the values at t (those of `SliceDecoder.step`,
    up to float rounding), given the values at t-1 (the start token at t = 0), (B,) long."""

    def __init__(self, decoder, context: torch.Tensor | None, batch: int):
        decoder.check_packable()  # the decoder the C++ computes: NotImplementedError for another
        empty = torch.zeros(0)
        self._step = load().Decoder(weights(decoder), empty if context is None else context, batch,
                                    decoder.cfg.heads, norm_eps(decoder)).step

    def step(self, previous: torch.Tensor, t: int) -> torch.Tensor:
        return self._step(previous.cpu().long().contiguous(), t)


def build() -> None:
    """`make install`: build the module now rather than at the first `make compress`, and say so."""
    try:
        load()
        print("codec's pinned arithmetic: ready")
    except CanonicalUnavailable:
        print("codec's pinned arithmetic: not built, make compress and decompress need a C++ compiler")
