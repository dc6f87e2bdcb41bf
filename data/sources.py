"""Image sources, all prepared into one on-disk `datasets` cache of uint8 arrays.

A source is a small dict from the experiment config (`data.source`):

    {kind: fashion_mnist}                              # Debian IDX files (installed when missing), else the hub
    {kind: photos, patch_size: 32}                     # scikit-image's photographs, cut into patches
    {kind: emoji, styles: [noto, openmoji]}            # colour emoji (data.emoji), installed when missing
    {kind: hub, name: user/dataset, image_column: image, config: null}
    {kind: imagefolder, path: some/folder}
    {kind: parquet, data_files: {train: a.parquet, test: b.parquet}}   # or kind: arrow
    {kind: disk, path: saved/dataset}                  # a DatasetDict written by save_to_disk

`prepare(...)` turns any of them into a DatasetDict with splits train/val/test and one
column `image` of fixed shape (H, W, C) uint8 (and `label`, int64, for the labelled built-in
sources: Fashion-MNIST's classes, the emoji's Unicode groups), written once under the cache folder and
memory-mapped by every later run and DataLoader worker. Every image is decoded by
`data.images` (orientation, bit depth, transparency, modes). The cache's name covers what
the data is (the source's settings and, for local files, their names, sizes and
modification times), and two processes preparing it at once wait for each other.
"""
from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections import Counter
from glob import glob
from pathlib import Path

import datasets
import numpy as np
import torch
from filelock import FileLock
from PIL import Image

from data.images import ImageError, as_array, decode, to_channels
from data.packages import install_packages

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
# photographs shipped inside scikit-image, split by photograph so no patch is in two splits
PHOTO_SPLITS = {
    "train": ("astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry"),
    "val": ("coffee",),
    "test": ("chelsea",),
}
SPLIT_ALIASES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
KINDS = ("fashion_mnist", "photos", "emoji", "hub", "imagefolder", "parquet", "arrow", "disk")
SOURCE_KEYS = {  # what each kind of source reads, besides `kind`
    "fashion_mnist": ("path", "install"),
    "photos": ("patch_size", "stride"),
    "emoji": ("styles", "install"),
    "hub": ("name", "config", "image_column", "streaming", "shuffle_buffer"),
    "imagefolder": ("path", "image_column"),
    "parquet": ("data_files", "image_column", "streaming", "shuffle_buffer"),
    "arrow": ("data_files", "image_column"),
    "disk": ("path", "image_column"),
}


def check_source(source) -> None:
    """Raise ValueError in one line for a source that is not a mapping, of an unknown kind, or with a key
    its kind does not read (a misspelled one would be ignored)."""
    if not isinstance(source, dict):
        raise ValueError(f"data.source must be a mapping such as {{kind: photos}}, not {source!r}")
    kind = source.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown data source kind {kind!r}: use one of {', '.join(KINDS)}")
    valid = ("kind", *SOURCE_KEYS[kind])
    for key in source:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            raise ValueError(f"unknown key {key!r} in data.source of kind {kind}"
                             f"{f' (did you mean {close[0]}?)' if close else ''}; its keys: {', '.join(valid)}")


class SourceUnavailable(ValueError):
    """Data that cannot be had here (no network, no package): the message says what to do instead."""


def image_features(height: int, width: int, channels: int, labels: bool = False) -> datasets.Features:
    features = {"image": datasets.Array3D((height, width, channels), "uint8")}
    return datasets.Features({**features, "label": datasets.Value("int64")} if labels else features)


# ---------------------------------------------------------------- built-in sources

def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) of uint8 images -> (N, rows, cols) array. Raises ValueError in one
    line for a file that is not one, or not whole."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
        images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, rows, cols) if magic == 0x803 else None
    except (EOFError, gzip.BadGzipFile, zlib.error, ValueError) as error:  # cut short, or not gzip at all
        raise ValueError(f"{path} is not a whole IDX image file ({type(error).__name__}: {error}); "
                         f"reinstall {FASHION_MNIST_PACKAGE}") from error
    if images is None:
        raise ValueError(f"{path} is not an IDX image file (magic {magic:#x}); reinstall {FASHION_MNIST_PACKAGE}")
    return images


def install_fashion_mnist() -> bool:
    """apt-get install the Debian package of Fashion-MNIST, as root or through `sudo -n`; True if it worked."""
    return install_packages([FASHION_MNIST_PACKAGE], "Fashion-MNIST")


def read_idx_labels(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) of uint8 labels -> (N,) int64; raises ValueError in one line for a
    file that is not one, or not whole."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        magic, count = np.frombuffer(raw[:8], dtype=">u4")
        labels = np.frombuffer(raw[8:], dtype=np.uint8)
    except (EOFError, gzip.BadGzipFile, zlib.error, ValueError) as error:
        raise ValueError(f"{path} is not a whole IDX label file ({type(error).__name__}: {error}); "
                         f"reinstall {FASHION_MNIST_PACKAGE}") from error
    if magic != 0x801 or len(labels) != count:
        raise ValueError(f"{path} is not a whole IDX label file; reinstall {FASHION_MNIST_PACKAGE}")
    return labels.astype(np.int64)


def fashion_mnist(path: str = FASHION_MNIST_DIR, install: bool = True) -> dict:
    """Fashion-MNIST as {split: {"image": (N, 28, 28, 1) uint8, "label": (N,) int64 class}} from the IDX
    files under `path` (without "label" where the label files are missing); installs the Debian
    package first when they are missing (and `install`), else falls back to the hub copy."""
    files = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    present = lambda: all((Path(path) / f).exists() for f in files.values())  # noqa: E731
    if not present() and install and path == FASHION_MNIST_DIR:
        install_fashion_mnist()
    if present():
        out = {split: {"image": read_idx(Path(path) / f)[..., None]} for split, f in files.items()}
        for split, f in files.items():
            labels = Path(path) / f.replace("images-idx3", "labels-idx1")
            if labels.exists():
                out[split]["label"] = read_idx_labels(labels)
        return out
    log.warning("Fashion-MNIST IDX files not found under %s; trying the hub copy %s", path, FASHION_MNIST_HUB)
    return {"hub": {"kind": "hub", "name": FASHION_MNIST_HUB, "image_column": "image"}}


def photo_patches(patch_size: int = 32, stride: int | None = None, channels: int = 3) -> dict:
    """Non-overlapping (by default) patches of scikit-image's photographs, {split: (N, P, P, C)}."""
    import skimage.data

    stride = stride or patch_size
    out = {}
    for split, names in PHOTO_SPLITS.items():
        patches = []
        for name in names:
            photo = as_array(to_channels(Image.fromarray(getattr(skimage.data, name)()), channels))
            h, w = photo.shape[:2]
            for top in range(0, h - patch_size + 1, stride):
                for left in range(0, w - patch_size + 1, stride):
                    patches.append(photo[top:top + patch_size, left:left + patch_size])
        out[split] = np.stack(patches)
    return out


# ---------------------------------------------------------------- generic sources

def fit(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Centre crop a mode L or RGB image to the aspect ratio of `size` (H, W), resize: (H, W, C) uint8."""
    height, width = size
    if image.size != (width, height):
        w, h = image.size
        crop_w, crop_h = min(w, round(h * width / height)), min(h, round(w * height / width))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    return as_array(image)


def load_generic(source: dict) -> datasets.DatasetDict:
    kind = source["kind"]
    if kind == "hub":
        try:
            return datasets.load_dataset(source["name"], source.get("config"))
        except (ConnectionError, OSError) as error:  # offline, unknown name, or the hub refused
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SourceUnavailable(f"cannot load {source['name']!r} from the Hugging Face hub ({first}); "
                                    f"check the name and the network, or use a local source "
                                    f"(data.source: {{kind: imagefolder, path: ...}})") from error
    if kind == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=source["path"])
    if kind in ("parquet", "arrow"):
        return datasets.load_dataset(kind, data_files=source["data_files"])
    if kind == "disk":
        loaded = datasets.load_from_disk(source["path"])
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    raise ValueError(f"unknown data source kind {kind!r}: use one of {', '.join(KINDS)}")


def decode_column(ds: datasets.Dataset, column: str, channels: int, size: tuple[int, int] | None,
                  name: str, background: str = "white") -> datasets.Dataset:
    """Decode, convert and (centre crop +) resize one split with `data.images`; images that cannot be
    used (unreadable, too large, multi-frame, transparent and refused) are dropped and counted in one warning,
    and so are the transparent ones composited onto the background."""
    if column not in ds.column_names:
        raise ValueError(f"source has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                         f"set data.source.image_column")
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decoded by data.images, not datasets
    if size is None:  # every image must then have the size of the first usable one
        for row in ds:
            try:
                size = decode(row[column], channels, background)[0].size[::-1]
                break
            except ImageError:
                continue
        else:
            raise ValueError(f"source {name!r} yields no readable image")

    def convert(batch):
        images, status = [], []
        for item in batch[column]:
            try:
                image, transparent = decode(item, channels, background)
                images.append(fit(image, size))
                status.append("transparent" if transparent else "ok")
            except ImageError as error:  # a multi-frame file too: skipped and counted like an unreadable one,
                # not cut to its first frame: INPUT and IMAGES= refuse the same file, and which frame (if any)
                # is the training image is not the reader's to guess
                images.append(np.zeros((*size, channels), np.uint8))
                status.append(error.reason)
        return {"image": np.stack(images), "_status": status}

    features = image_features(*size, channels)
    features["_status"] = datasets.Value("string")
    ds = ds.map(convert, batched=True, batch_size=256, remove_columns=ds.column_names, features=features,
                desc=f"decoding {name}")
    counts = Counter(ds["_status"])
    kept = ds.filter(lambda s: s in ("ok", "transparent"), input_columns="_status").remove_columns("_status")
    skipped = len(ds) - len(kept)
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items() if reason not in ("ok", "transparent"))
        log.warning("skipped %d unusable images of %d in %s (%s)", skipped, len(ds), name, reasons)
    if counts["transparent"]:
        log.warning("%d images of %d in %s have transparent pixels: composited onto %s (data.background)",
                    counts["transparent"], len(ds), name, background)
    return kept


# ---------------------------------------------------------------- streaming: no cache at all

class Streamed(torch.utils.data.IterableDataset):
    """Images of one split of a lazily read `datasets.IterableDataset`, decoded on the fly by
    `data.images` ((H, W, C) uint8 each); unusable images are skipped. `datasets` deals the
    shards out to DataLoader workers itself; a new shuffle order every epoch."""

    def __init__(self, ds, column: str, channels: int, size: tuple[int, int], background: str):
        self.ds, self.column, self.channels, self.size, self.background = ds, column, channels, size, background
        self.epoch = 0

    def __iter__(self):
        self.ds.set_epoch(self.epoch)
        self.epoch += 1
        for row in self.ds:
            try:
                yield fit(decode(row[self.column], self.channels, self.background)[0], self.size)
            except ImageError:
                continue


def streamed(source: dict, split: str, channels: int, size: tuple[int, int], background: str = "white",
             rank: int = 0, world: int = 1, seed: int = 0, limit: int | None = None) -> Streamed:
    """Split `split` (train, val or test) of a hub or parquet source, read shard by shard and never
    cached; this process's share of it (`datasets.distributed.split_dataset_by_node`). Training
    is shuffled within a buffer of `source.shuffle_buffer` images (default 1000); `limit` keeps
    the first images of the split (before sharding). Raises ValueError when the split is missing."""
    from datasets.distributed import split_dataset_by_node

    kind = source["kind"]
    if kind == "hub":
        try:
            raw = datasets.load_dataset(source["name"], source.get("config"), streaming=True)
        except (ConnectionError, OSError) as error:
            raise SourceUnavailable(f"cannot stream {source['name']!r} from the Hugging Face hub ({error}); "
                                    f"check the name and the network") from error
    else:
        raw = datasets.load_dataset("parquet", data_files=source["data_files"], streaming=True)
    names = {SPLIT_ALIASES[name]: name for name in raw if name in SPLIT_ALIASES}
    found = names.get(split) or (names.get("test") if split == "val" else None)
    if found is None:
        raise ValueError(f"streaming reads the source's own splits, and it has no {split!r} split "
                         f"(it has {', '.join(raw)}): add one, or prepare a cache without streaming")
    ds = raw[found]
    column = source.get("image_column", "image")
    if isinstance(ds.features, datasets.Features) and isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # decoded by data.images
    if split == "train":
        ds = ds.shuffle(seed=seed, buffer_size=source.get("shuffle_buffer", 1000))
    if limit:
        ds = ds.take(limit)
    return Streamed(split_dataset_by_node(ds, rank=rank, world_size=world), column, channels, size, background)


# ---------------------------------------------------------------- one cache for all

def standard_splits(splits: dict, val_size: float, seed: int) -> dict:
    """Rename splits to train/val/test; carve val (and test, if missing) from train, seeded."""
    named = {}
    for split, ds in splits.items():
        if split in SPLIT_ALIASES:
            named[SPLIT_ALIASES[split]] = ds
    if "train" not in named:
        raise ValueError(f"source has no train split (splits: {', '.join(splits)}); name one 'train'")
    for missing in ("test", "val"):
        if missing not in named:
            parts = named["train"].train_test_split(test_size=val_size, seed=seed, shuffle=True)
            named["train"], named[missing] = parts["train"], parts["test"]
    return named


def local_files(source: dict) -> list[tuple[str, int, int]]:
    """(path, size in bytes, modification time in ns) of every local file the source reads, sorted."""
    paths = []
    if source.get("kind") in ("imagefolder", "disk") and source.get("path"):
        paths.append(source["path"])
    files = source.get("data_files")
    for value in (files.values() if isinstance(files, dict) else [files] if files else []):
        paths.extend(value if isinstance(value, list) else [value])
    found = []
    for pattern in paths:
        for path in glob(str(pattern), recursive=True) or [str(pattern)]:
            walk = sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]
            found += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in walk if p.is_file()]
    return sorted(found)


def cache_key(**settings) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build(source: dict, channels: int, image_size: tuple[int, int] | None, val_size: float, seed: int,
          background: str) -> datasets.DatasetDict:
    """Read and decode the whole source into train/val/test splits of (H, W, C) uint8 images."""
    kind = source["kind"]
    if kind == "fashion_mnist":
        arrays = fashion_mnist(source.get("path", FASHION_MNIST_DIR), source.get("install", True))
    elif kind == "photos":
        arrays = photo_patches(source.get("patch_size", 32), source.get("stride"), channels)
    elif kind == "emoji":
        from data.emoji import STYLES, emoji

        if image_size and image_size[0] != image_size[1]:
            raise ValueError(f"emoji are square: use one image_size, not {list(image_size)}")
        arrays = emoji(image_size[0] if image_size else 64, source.get("styles", STYLES), source.get("install", True))
        for columns in arrays.values():
            del columns["base"]  # which emoji it is: for the split, not for the cache
    else:
        arrays = {"hub": source}
    if "hub" in arrays:  # a generic source (or Fashion-MNIST's hub fallback)
        generic = arrays["hub"]
        column = generic.get("image_column", "image")
        try:
            raw = load_generic(generic)
        except SourceUnavailable as error:
            if kind == "fashion_mnist":
                raise SourceUnavailable(
                    f"Fashion-MNIST is not installed and the hub cannot be reached: install it with "
                    f"`sudo apt-get install {FASHION_MNIST_PACKAGE}`, or use the offline data (EXP=photos32)") from error
            raise
        splits = {split: decode_column(ds, column, channels, image_size, f"{kind}/{split}", background)
                  for split, ds in raw.items()}
    else:
        splits = {}
        for split, columns in arrays.items():
            columns = columns if isinstance(columns, dict) else {"image": columns}
            images = columns["image"]
            if images.shape[-1] != channels or (image_size and tuple(images.shape[1:3]) != tuple(image_size)):
                images = np.stack([fit(decode(im, channels)[0], image_size or im.shape[:2]) for im in images])
            splits[split] = datasets.Dataset.from_dict({**columns, "image": images},
                                                       features=image_features(*images.shape[1:], "label" in columns))
    for split, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"source {kind!r} yields no usable image in split {split!r}; check the path or files")
    return datasets.DatasetDict(standard_splits(splits, val_size, seed))


def prepare(source: dict, channels: int, image_size: tuple[int, int] | None, val_size: float = 0.05,
            seed: int = 0, cache_dir: str = "data_cache", background: str = "white") -> Path:
    """Build the cache of `source` once; return its folder (a DatasetDict with train/val/test).

    The folder's name is a hash of the settings and of the local files' names, sizes and
    modification times, so edited data is prepared anew. A lock file serialises processes
    that prepare the same cache; the cache appears at its final path complete or not at all.
    Raises ValueError (a SourceUnavailable when the data cannot be had here).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported: use 1 (grey) or 3 (RGB)")
    check_source(source)
    kind = source["kind"]
    # format: 3 since the labelled sources carry a `label` column (emoji: groups without Component)
    settings = dict(format=3, source=source, channels=channels, image_size=image_size, val_size=val_size, seed=seed,
                    background=background, files=local_files(source))
    target = Path(cache_dir) / f"{source.get('name', kind).replace('/', '_')}-{cache_key(**settings)}"
    if (target / "dataset_dict.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "dataset_dict.json").exists():  # another process built it while we waited
            return target
        for stale in target.parent.glob(target.name + ".partial-*"):  # left by a process that died
            shutil.rmtree(stale, ignore_errors=True)
        dataset = build(source, channels, image_size, val_size, seed, background)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        dataset.save_to_disk(str(partial))
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder without dataset_dict.json
        os.replace(partial, target)  # never a half-written cache at the final path
    return target
