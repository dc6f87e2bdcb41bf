"""The feature network of FID and KID: a small classifier trained on the experiment's own training
images, a file of the run named by a hash of its data and weights.

Inception-v3 features (the usual FID) describe natural 299 x 299 photographs; on 28 x 28 clothes
or 64 x 64 emoji they are both costly and far from the data. As for the FID of MNIST-like data in
the literature, the features here are the penultimate layer of a classifier of the data itself:

    Fashion-MNIST   its 10 classes (the IDX label files)
    emoji           their 9 Unicode emoji groups (data.emoji; the Component group is left out)
    anything else   which of 4 rotations (0, 90, 180, 270 degrees) was applied: a self-supervised
                    task that needs no labels (Gidaris et al., ICLR 2018)

The classifier sees the images as the cascade draws them: quantised to the experiment's n bits and
shown as 8-bit values. A figure is comparable only with figures of the same feature network:
`FeatureNetwork.name` (12 hex digits of a SHA-256 of the data's cache name, the bits and the
weights) goes with every FID and KID written or logged.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.transforms import quantize
from pipeline.inference.pictures import to_8bit

FEATURES = 128  # the width of the feature vector (the classifier's penultimate layer)
STEPS = 1000  # training steps of the classifier
BATCH = 64
ROTATIONS = 4


class FeatureNetwork(nn.Module):
    """A four-layer convolutional classifier (3 x 3 convolutions, three of stride 2, ReLU, global average
    pooling); `forward` returns its penultimate features.

    forward(images): uint8 (N, C, H, W) 8-bit values (torchmetrics' layout) -> (N, FEATURES) float32.
    logits(images): the same images -> (N, classes) float32. `num_features` is read by torchmetrics.
    """

    def __init__(self, channels: int, classes: int, task: str):
        super().__init__()
        self.channels, self.classes, self.task = channels, classes, task
        self.num_features = FEATURES
        layers = ((channels, 32, 2), (32, 64, 2), (64, 64, 1), (64, FEATURES, 2))  # (in, out, stride)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=stride, padding=1) for a, b, stride in layers)
        self.head = nn.Linear(FEATURES, classes)
        self.name = ""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images.float() / 127.5 - 1.0
        for conv in self.convs:
            h = F.relu(conv(h))
        return h.mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))


def task_of(split: datasets.Dataset) -> tuple[str, int]:
    """('labels', classes) when the split has a label column, else ('rotation', 4)."""
    if "label" in split.column_names:
        return "labels", int(max(split["label"])) + 1
    return "rotation", ROTATIONS


def as_shown(images: np.ndarray | torch.Tensor, bits: int) -> torch.Tensor:
    """8-bit images (N, H, W, C) -> quantised to `bits` and back to 8-bit values, (N, C, H, W) uint8:
    what the cascade's samples look like."""
    x = quantize(torch.as_tensor(np.asarray(images)), bits)
    return to_8bit(x, bits).permute(0, 3, 1, 2).contiguous()


def rotated(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (N, C, H, W) turned by a random multiple of 90 degrees, and that multiple (N,)."""
    turns = torch.randint(ROTATIONS, (len(images),), generator=generator)
    return torch.stack([torch.rot90(im, int(k), (1, 2)) for im, k in zip(images, turns)]), turns


def train_network(split: datasets.Dataset, bits: int, steps: int | None = None, seed: int = 0,
                  log=print) -> FeatureNetwork:
    """Train the classifier on the images of `split` (a cache split with `image`, and `label` if any)
    for `steps` (default STEPS) with Adam at 1e-3, batch BATCH, seeded; returns it in eval mode."""
    steps = steps or STEPS
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        task, classes = task_of(split)
        rows = split.with_format("numpy")
        first = rows[0]["image"]
        torch.manual_seed(seed)
        net = FeatureNetwork(first.shape[-1], classes, task)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        for step in range(steps):
            index = torch.randint(len(split), (BATCH,), generator=generator).tolist()
            batch = rows[index]
            images = as_shown(batch["image"], bits)
            labels = torch.as_tensor(batch["label"]) if task == "labels" else None
            if task == "rotation":
                images, labels = rotated(images, generator)
            loss = F.cross_entropy(net.logits(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % 500 == 0:
                log(f"feature network step {step + 1}/{steps}: cross-entropy {loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def accuracy(net: FeatureNetwork, split: datasets.Dataset, bits: int) -> float:
    """The classifier's accuracy on a split (rotation: on each image turned by 0, 90, 180 and 270 degrees)."""
    rows = split.with_format("numpy")
    right = total = 0
    for start in range(0, len(split), 256):
        batch = rows[start:start + 256]
        images = as_shown(batch["image"], bits)
        if net.task == "labels":
            labels = torch.as_tensor(batch["label"])
        else:
            images = torch.cat([torch.rot90(images, k, (2, 3)) for k in range(ROTATIONS)])
            labels = torch.arange(ROTATIONS).repeat_interleave(len(batch["image"]))
        right += int((net.logits(images).argmax(1) == labels).sum())
        total += len(labels)
    return right / total


def digest(net: FeatureNetwork, data_name: str, bits: int) -> str:
    """12 hex digits of SHA-256 over the data's cache name, the bits and the weights (in order)."""
    h = hashlib.sha256(f"{data_name}|{bits}|{net.task}|{net.classes}".encode())
    for key, value in net.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def save(net: FeatureNetwork, folder: Path, data_name: str, bits: int, test_accuracy: float) -> Path:
    """Write `folder/features-<name>.pt` (written whole, then renamed into place); returns its path."""
    net.name = digest(net, data_name, bits)
    path = Path(folder) / f"features-{net.name}.pt"
    buffer = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "channels": net.channels, "classes": net.classes, "task": net.task,
                "data": data_name, "bits": bits, "name": net.name, "test_accuracy": test_accuracy}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    partial.write_bytes(buffer.getvalue())
    os.replace(partial, path)
    return path


def load(path: Path) -> tuple[FeatureNetwork, dict]:
    """A feature network file -> (network in eval mode, its record); raises ValueError when the weights
    do not match the name the file carries (a file edited or cut short)."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureNetwork(record["channels"], record["classes"], record["task"])
        net.load_state_dict(record["state_dict"])
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a whole feature network file ({type(error).__name__}); delete it and "
                         f"run again to train a new one") from error
    net.name = digest(net, record["data"], record["bits"])
    if net.name != record["name"]:
        raise ValueError(f"{path}: its weights do not hash to its name {record['name']}; delete it and run again")
    return net.eval(), record


def feature_network(run_dir: str | Path, splits: datasets.DatasetDict, data_name: str, bits: int,
                    log=print) -> tuple[FeatureNetwork, dict]:
    """The run's feature network for this data and these bits: the file `run_dir/features-*.pt` made
    for them, else one trained now (on the train split, accuracy measured on the test split) and
    saved. Returns (network, record with 'name', 'task', 'test_accuracy', ...)."""
    for path in sorted(Path(run_dir).glob("features-*.pt")):  # not the .partial-<pid> of a writer
        net, record = load(path)
        if record["data"] == data_name and record["bits"] == bits:
            return net, record
    log(f"training the feature network of FID/KID on {data_name} ({STEPS} steps)")
    net = train_network(splits["train"], bits, log=log)
    test_accuracy = accuracy(net, splits["test"], bits)
    path = save(net, Path(run_dir), data_name, bits, test_accuracy)
    log(f"feature network {net.name}: test accuracy {test_accuracy:.3f} ({net.task}); wrote {path}")
    return load(path)
