"""The PixelCNN++ baseline: an exact likelihood (its mass over every value of a pixel sums to 1) and
causality (no prediction reads its own pixel or a later one)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.pixelcnnpp import PixelCNNpp


@pytest.mark.parametrize("channels, bits", [(1, 4), (1, 8), (3, 2)])
def test_the_mixture_sums_to_one_over_every_value_of_every_pixel(channels, bits):
    torch.manual_seed(0)
    model = PixelCNNpp(channels, bits, filters=8, blocks=1, mixtures=3)
    with torch.no_grad():  # sharp components too, where the tails and the tiny-bin branch matter
        model.out.bias.normal_(0, 1)
    images = torch.randint(0, 2**bits, (2, 8, 8, channels))
    log_probs = model.every_value_log_probs(images)  # (2^(nC), B, H, W)
    assert log_probs.shape == (2 ** (bits * channels), 2, 8, 8)
    assert torch.logsumexp(log_probs.double(), 0).abs().max() < 1e-5
    # and nll is the sum over pixels of the image's own values' -log p
    own = -model.pixel_log_probs(model(images), images).sum(dim=(1, 2))
    assert torch.allclose(model.nll(images), own)


@pytest.mark.parametrize("channels", [1, 3])
def test_changing_a_pixel_changes_no_prediction_at_or_before_it(channels):
    torch.manual_seed(0)
    model = PixelCNNpp(channels, 8, filters=8, blocks=1, mixtures=2).eval()
    size = 8
    order = torch.arange(size * size).reshape(size, size)
    for i, j in [(0, 0), (0, 5), (3, 0), (3, 3), (7, 6), (7, 7)]:
        images = torch.randint(0, 256, (1, size, size, channels))
        changed = images.clone()
        changed[0, i, j] = (changed[0, i, j] + 97) % 256
        with torch.no_grad():
            moved = (model(changed) - model(images)).abs().amax(dim=1)[0]  # (H, W)
        assert (moved[order <= i * size + j] == 0).all(), (i, j)
        if i * size + j < size * size - 1:
            assert (moved[order > i * size + j] > 0).any()  # later predictions do read it


def test_training_lowers_the_nll():
    torch.manual_seed(0)
    model = PixelCNNpp(1, 8, filters=8, blocks=1, mixtures=3)
    images = (torch.arange(64).reshape(1, 8, 8, 1) * 4).expand(16, -1, -1, -1).contiguous()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.nll(images).mean().item()
    for _ in range(30):
        loss = model.nll(images).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.nll(images).mean().item() < 0.8 * before, before


def test_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        PixelCNNpp(channels=2)
