import os
import signal

import pytest
import torch

from stages import DepthSPN, FirstSliceDecoder, SizeSPN

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def no_wandb_by_default(monkeypatch):
    """Tests log nothing to W&B unless they ask for it (the W&B test sets offline)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def ctrl_c():
    """Ctrl+C raises KeyboardInterrupt during the test, as in a terminal, even in a suite started in the
    background (where the shell set SIGINT to be ignored); the process's own handling comes back after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


TINY = dict(width=16, layers=2, heads=2, context_width=16, context_layers=1, context_attention_layers=1)


def make_stages(image_size=8, channels=1, bits=4, high_bits=2, subscale=2, seed=0, **net) -> dict:
    """Freshly initialised stages of one geometry (random weights: the invariants hold for any)."""
    torch.manual_seed(seed)
    geometry = dict(image_size=image_size, channels=channels, bits=bits, high_bits=high_bits, subscale=subscale)
    stages = {"first_slice": FirstSliceDecoder(**geometry, **{**TINY, **net})}
    if subscale > 1:
        stages["size_spn"] = SizeSPN(**geometry, **{**TINY, **net})
    if high_bits < bits:
        stages["depth_spn"] = DepthSPN(**geometry, **{**TINY, **net})
    for stage in stages.values():
        stage.eval()
        with torch.no_grad():  # make the output layer matter: default init gives near-uniform logits
            stage.decoder.head.weight.mul_(20)
    return stages


def save_cascade(stages: dict, run_dir) -> None:
    """Write stages as the final checkpoints of a run, as training does."""
    from pipeline.checkpoints import save_stage

    for name, stage in stages.items():
        save_stage(stage, run_dir / "checkpoints" / f"{name}.ckpt")


def uniform(stages: dict) -> dict:
    """Zero every output layer: each sub-pixel is then uniform over its values (softmax output)."""
    for stage in stages.values():
        with torch.no_grad():
            stage.decoder.head.weight.zero_()
            stage.decoder.head.bias.zero_()
    return stages


def assert_same_draws(decoder, context, seed: int, draws: dict, reference: str, temperature: float = 1.0):
    """Draws {method: (values (B, T), log_prob (B,))} of `decoder.sample` from one noise (a generator
    seeded `seed`) agree with `reference`'s: rows equal, with log-probabilities within 1e-4 nats, except
    rows whose first difference is a near-tie of the inverse CDF (`pipeline.inference.agreement`)."""
    from pipeline.inference.agreement import slices_agree

    values, log_prob = draws[reference]
    noise = torch.rand(values.shape, generator=torch.Generator().manual_seed(seed))
    for method, (other, other_log_prob) in draws.items():
        assert slices_agree(decoder, context, noise, values, other, temperature).all(), method
        same = (values == other).all(1)
        assert torch.allclose(other_log_prob[same], log_prob[same], atol=1e-4), method
