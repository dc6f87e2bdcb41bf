"""What two samplers of one cascade may be held to: the same images, except at a float tie.

Every sampler reads each value off the inverse CDF of its own float computation of the same
distribution, with the same uniform. Two computations in another order (the C++ loop, the
Python step, another CPU's kernels) differ by float rounding, about 1e-6 in a probability, so
when the uniform falls that close to the boundary between two values, one sampler may take the
value on either side; everything after that sub-pixel then follows from another prefix. So two
samplers agree when, for every image, the first sub-pixel (in the cascade's order) at which their
draws differ lies at a near-tie: the uniform within `EPSILON` of every CDF boundary between the two
values, by the reference computation (the full forward pass) on their common prefix.
"""
from __future__ import annotations

import torch

from data.transforms import to_sequence
from stages.networks import log_probs

EPSILON = 1e-4  # a near-tie: the uniform within this of a CDF boundary (CDF normalised to 1)


def near_tie(log_p: torch.Tensor, uniform: float, a: int, b: int, temperature: float = 1.0,
             eps: float = EPSILON) -> bool:
    """Whether drawing `a` or `b` with `uniform` from log-probabilities `log_p` (V,) at `temperature`
    is a matter of float rounding: every CDF boundary between the two values within `eps` of it."""
    cdf = torch.softmax(log_p.double() / temperature, -1).cumsum(-1)
    low, high = min(a, b), max(a, b)
    return bool(((cdf[low:high] - uniform).abs() <= eps).all())


@torch.no_grad()
def slices_agree(decoder, context: torch.Tensor | None, noise: torch.Tensor, first: torch.Tensor,
                 second: torch.Tensor, temperature: float = 1.0, eps: float = EPSILON) -> torch.Tensor:
    """Two draws (B, T) of one slice by `decoder` (a `SliceDecoder`) given `context` (B, h*w, D) or None,
    from the same uniforms `noise` (B, T): (B,) bool, True where the rows are equal or first differ
    at a near-tie."""
    agree = torch.ones(len(first), dtype=torch.bool)
    for row in range(len(first)):
        a, b = first[row], second[row]
        if torch.equal(a, b):
            continue
        t = int((a != b).nonzero()[0])
        logits = decoder(a[None], None if context is None else context[row:row + 1])  # (1, T, V)
        agree[row] = near_tie(log_probs(logits[0, t]).cpu(), float(noise[row, t]), int(a[t]), int(b[t]),
                              temperature, eps)
    return agree


@torch.no_grad()
def compare(cascade, seeds: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
            temperature: float = 1.0, eps: float = EPSILON) -> dict:
    """Compare two draws (N, H, W, C) n-bit of `cascade.sample` from the same per-image `seeds` (N,)
    (`Cascade.image_seeds`), nothing fixed. Returns {"identical": images equal, "near_ties": images whose
    first difference is a near-tie, "disagree": the others}; two samplers agree when "disagree" is 0."""
    counts = {"identical": 0, "near_ties": 0, "disagree": 0}
    for i, seed in enumerate(seeds.tolist()):
        if torch.equal(first[i], second[i]):
            counts["identical"] += 1
            continue
        known, other = cascade.known(first[i:i + 1]), cascade.known(second[i:i + 1])
        stream = torch.Generator().manual_seed(int(seed))
        for stage_name, part, k, _ in cascade.plan():  # the noise of each slice, drawn in the cascade's order
            noise = cascade.slice_noise(stream)[None]  # (1, T)
            a, b = to_sequence(known[part][:, k]), to_sequence(other[part][:, k])  # (1, T)
            if not torch.equal(a, b):
                stage = cascade.stages[stage_name]
                context = stage.context(known, torch.tensor([k], device=cascade.device))
                tie = bool(slices_agree(stage.decoder, context, noise, a, b, temperature, eps)[0])
                counts["near_ties" if tie else "disagree"] += 1
                break
    return counts
