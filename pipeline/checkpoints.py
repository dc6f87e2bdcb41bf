"""Final stage checkpoints: what sampling, evaluation and the codec need, and nothing else.

A stage's final checkpoint `$(RUN_DIR)/checkpoints/<stage>.ckpt` holds its weights and
hyperparameters (no optimiser state), in the format Lightning's `load_from_checkpoint`
reads, and is always loaded with `weights_only=True`: a checkpoint from elsewhere cannot
run code. It is written to a temporary file, then renamed, so it is never half-written.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import lightning
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from pipeline.io import atomic_write
from stages import STAGES


class NonFiniteWeights(ValueError):
    """Weights that hold NaN or infinity: training diverged."""


def check_finite(state_dict: dict, what: str) -> None:
    """Raise NonFiniteWeights naming the first tensor of `state_dict` that is not finite."""
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise NonFiniteWeights(f"{what}: {key} holds NaN or infinity, so it is not saved; training diverged: "
                                   f"lower the learning rate (ARGS=\"--model.lr=...\") and make the target again")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe against a kill at any moment and against divergence:
    a checkpoint is written to a temporary file and renamed (the old one stays whole until then),
    and one whose weights are not finite is never written."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        check_finite(checkpoint.get("state_dict", {}), f"checkpoint {path}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())


def save_stage(stage, path: str | Path, global_step: int = 0) -> None:
    """Write the stage's weights and hyperparameters (and the training steps it took) to `path`,
    atomically; raises NonFiniteWeights instead of writing weights that are not finite."""
    state = {key: value.detach().cpu() for key, value in stage.state_dict().items()}
    check_finite(state, str(path))
    checkpoint = {"state_dict": state, "hyper_parameters": dict(stage.hparams), "global_step": global_step,
                  "pytorch-lightning_version": lightning.__version__}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, buffer.getvalue())


def load_stage(name: str, path: str | Path, device="cpu"):
    """The stage `name` from its checkpoint, on `device`, in eval mode. Raises FileNotFoundError when
    the file is missing and ValueError when it is not a readable checkpoint of that stage."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}: train the cascade first (make train-all)")
    try:
        return STAGES[name].load_from_checkpoint(path, map_location=device, weights_only=True).eval()
    except Exception as error:  # truncated, corrupt, foreign or unsafe pickles all land here
        raise ValueError(f"cannot load {path} as the {name} checkpoint ({type(error).__name__}: {error}); "
                         f"remove it and train the stage again") from error


def weights_digest(stage) -> str:
    """SHA-256 of the stage's hyperparameters and weights (names, shapes, dtypes and bytes): an
    identifier of exactly this model."""
    digest = hashlib.sha256(repr(sorted(dict(stage.hparams).items())).encode())
    for key, value in sorted(stage.state_dict().items()):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}{tuple(value.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
