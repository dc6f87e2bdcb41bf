"""Output distributions of a sub-pixel: what the decoder's head turns into log-probabilities.

Both give exact, normalised categorical distributions over the `n_values` integer values of
a sub-pixel, and the mass of any bin of consecutive values [lo, hi] (the bit-depth split
needs it: with b < n the size SPN scores the bin of its MSB, the depth SPN the exact value
within that known bin).

* `Softmax`: one logit per value (the paper's choice).
* `LogisticMixture`: a mixture of K discretised logistics over the values scaled to [-1, 1]
  (Salimans et al., "PixelCNN++", ICLR 2017, section 2.1), 3K numbers per sub-pixel. Nearby
  values get nearby mass by construction, which a softmax has to learn value by value.

Shapes: `out` is the head's output (..., params); values, lo, hi are long tensors (...);
results are log-probabilities in nats, (...) or (..., n_values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Softmax:
    """Categorical distribution from `n_values` logits."""

    def __init__(self, n_values: int):
        self.n_values = n_values
        self.params = n_values

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """(..., n_values) log-probabilities of every value, nats."""
        return F.log_softmax(out.float(), dim=-1)

    def log_prob(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Log-probability of `values` (...), nats."""
        return -F.cross_entropy(out.float().movedim(-1, 1), values, reduction="none")

    def log_prob_bin(self, out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Log of the mass of the values lo..hi (inclusive), nats."""
        log_p = self.log_probs(out)
        v = torch.arange(self.n_values, device=out.device)
        inside = (v >= lo[..., None]) & (v <= hi[..., None])
        return torch.logsumexp(log_p.masked_fill(~inside, float("-inf")), dim=-1)


class LogisticMixture:
    """Mixture of `components` discretised logistics over values 0 .. n_values-1.

    A value v stands for the interval [c - d, c + d] around c = 2v/(n_values-1) - 1 with
    d = 1/(n_values-1); the lowest and highest values take the tails down to -inf and up to
    +inf, so the masses of all values sum to 1 exactly (up to float rounding).
    """

    def __init__(self, n_values: int, components: int = 10):
        if n_values < 2:
            raise ValueError(f"a logistic mixture needs at least 2 values per sub-pixel, got {n_values}")
        self.n_values, self.components = n_values, components
        self.params = 3 * components

    def split(self, out: torch.Tensor):
        """(..., 3K) -> log mixture weights, means, inverse scales, each (..., K)."""
        logits, means, log_scales = out.float().chunk(3, dim=-1)
        return F.log_softmax(logits, dim=-1), means, torch.exp(-log_scales.clamp(min=-7.0))

    def log_prob_bin(self, out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Log of the mass of the values lo..hi (inclusive), nats, (...)."""
        log_weights, means, inv_scales = self.split(out)
        half = 1.0 / (self.n_values - 1)
        upper = (2.0 * hi.float() * half - 1.0 + half)[..., None]  # upper edge of the bin, (..., 1)
        lower = (2.0 * lo.float() * half - 1.0 - half)[..., None]
        top, bottom = hi[..., None] >= self.n_values - 1, lo[..., None] <= 0
        a = (upper - means) * inv_scales  # logistic CDF at the edges: sigmoid(a) - sigmoid(b)
        b = (lower - means) * inv_scales
        # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)); stable
        # everywhere; a tail edge (+-inf) contributes 0 to each term that involves it
        log_mass = (torch.where(top, 0.0, -F.softplus(-a)) + torch.where(bottom, 0.0, -F.softplus(b))
                    + torch.where(top | bottom, 0.0, torch.log(-torch.expm1(b - a))))
        return torch.logsumexp(log_weights + log_mass, dim=-1)

    def log_prob(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Log-probability of `values` (...), nats."""
        return self.log_prob_bin(out, values, values)

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """(..., n_values) log-probabilities of every value, nats."""
        v = torch.arange(self.n_values, device=out.device)
        return self.log_prob(out[..., None, :].expand(*out.shape[:-1], self.n_values, out.shape[-1]),
                             v.expand(*out.shape[:-1], self.n_values))


def output_distribution(kind: str, n_values: int, components: int = 10):
    """`softmax` or `logistic_mixture` over n_values values; raises ValueError for another name."""
    if kind == "softmax":
        return Softmax(n_values)
    if kind == "logistic_mixture":
        return LogisticMixture(n_values, components)
    raise ValueError(f"output={kind!r} is unknown: use softmax or logistic_mixture")
