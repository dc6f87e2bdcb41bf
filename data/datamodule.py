"""`SubscaleDataModule`: the one LightningDataModule that feeds every stage.

A batch is a dict of uint8 tensors:
    image (B, H, W, C)  the image quantised to `bits` bits (x)
    msb   (B, H, W, C)  its `high_bits` most significant bits (m)
    lsb   (B, H, W, C)  its `bits - high_bits` least significant bits (l)
Slicing into S*S sub-images happens in the stages, with `data.transforms.to_slices`.
"""
from __future__ import annotations

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.samplers import EpochSampler, ResumableLoader, ShardSampler
from data.sources import check_source, prepare, streamed
from data.transforms import check_settings, quantize, split_depth


class ImageArrays(Dataset):
    """Index a memory-mapped split; rows are read only when asked for."""

    def __init__(self, split: datasets.Dataset, limit: int | None = None):
        self.split = split.with_format("numpy", dtype=np.uint8)
        self.length = len(split) if limit is None else min(limit, len(split))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.split[int(index)]["image"]

    def __getitems__(self, indices: list[int]) -> np.ndarray:  # one Arrow read per batch
        return self.split[[int(i) for i in indices]]["image"]


class SubscaleDataModule(L.LightningDataModule):
    """The data of every stage: a source (see `data.sources`) prepared once into a memory-mapped
    cache, or read lazily with `source: {streaming: true, ...}` (hub and parquet sources).

    Geometry: `image_size` (H, or [H, W]), `channels` (1 grey, 3 RGB), `bits` n, `high_bits` b,
    `subscale` S; raises ValueError for settings that do not fit together. `background` is the
    colour transparent pixels are composited onto ('refuse' drops such images). Training batches
    come in a seeded order that a resumed run continues mid-epoch; validation and test batches
    hold every image once across processes.
    """

    def __init__(
        self,
        source: dict,
        image_size: int | list[int],
        channels: int = 1,
        bits: int = 8,
        high_bits: int = 8,
        subscale: int = 1,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: float = 0.05,
        val_subset: int | None = 1000,
        seed: int = 0,
        cache_dir: str = "data_cache",
        background: str = "white",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        check_settings(bits, high_bits, subscale, *self.image_size)
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size={batch_size}, eval_batch_size={eval_batch_size}: use 1 or more")
        check_source(source)
        self.streaming = bool(source.get("streaming"))
        if self.streaming and source.get("kind") not in ("hub", "parquet"):
            raise ValueError(f"streaming is for hub and parquet sources, not {source.get('kind')!r}: "
                             f"remove streaming: true")
        self.splits: datasets.DatasetDict | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.hparams.channels)

    def prepare_data(self) -> None:  # once per node, before setup; writes the cache
        if not self.streaming:
            self.cache_path()

    def cache_path(self):
        hp = self.hparams
        return prepare(hp.source, hp.channels, self.image_size, hp.val_size, hp.seed, hp.cache_dir, hp.background)

    def setup(self, stage: str | None = None) -> None:  # every process: memory-map the cache
        if self.splits is None and not self.streaming:
            self.splits = datasets.load_from_disk(str(self.cache_path()))
            got = tuple(self.splits["train"].features["image"].shape)
            if got != self.shape:
                raise ValueError(f"cached images have shape {got}, config says {self.shape}; fix data.image_size/channels")

    def collate(self, images: np.ndarray | list[np.ndarray]) -> dict[str, torch.Tensor]:
        """8-bit images (B, H, W, C) -> the batch: n-bit image, its MSB and LSB."""
        hp = self.hparams
        x = quantize(torch.from_numpy(np.stack(images)), hp.bits)  # (B, H, W, C) uint8
        msb, lsb = split_depth(x, hp.bits, hp.high_bits)
        return {"image": x, "msb": msb, "lsb": lsb}

    def processes(self) -> tuple[int, int]:
        """(rank, world size) of this process among those training together."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def progress(self) -> tuple[int, int]:
        """(epoch, batches trained in it) of the running fit, for a checkpoint of the data order."""
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def loader(self, split: str, train: bool, limit: int | None = None):
        """The DataLoader of `split` for this process (the first `limit` images of it, if given)."""
        hp = self.hparams
        rank, world = self.processes()
        options = dict(num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0, collate_fn=self.collate)
        if self.streaming:
            return DataLoader(streamed(hp.source, split, hp.channels, self.image_size, hp.background, rank, world,
                                       hp.seed, None if train else limit),
                              batch_size=hp.batch_size if train else hp.eval_batch_size or hp.batch_size, **options)
        self.setup()
        images = ImageArrays(self.splits[split], limit)
        if not train:
            return DataLoader(images, batch_size=hp.eval_batch_size or hp.batch_size,
                              sampler=ShardSampler(len(images), rank, world), **options)
        return ResumableLoader(images, batch_size=hp.batch_size, drop_last=True, progress=self.progress,
                               sampler=EpochSampler(len(images), hp.batch_size, hp.seed, rank, world), **options)

    def train_dataloader(self):
        return self.loader("train", train=True)

    def val_dataloader(self):  # a fixed, ordered subset: the exact NLL over all slices is costly
        return self.loader("val", train=False, limit=self.hparams.val_subset)

    def test_dataloader(self):
        return self.loader("test", train=False)
