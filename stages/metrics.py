"""The one formula for bits per dimension."""
import math

import torch


def bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Negative log-likelihood in nats (per image) -> bits per sub-pixel of the whole image."""
    return nats / (dims * math.log(2))
