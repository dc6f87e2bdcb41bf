"""Image sources, all prepared into one on-disk `datasets` cache of uint8 arrays.

A source is a small dict from the experiment config (`data.source`):

    {kind: fashion_mnist}                              # Debian IDX files, else the hub copy
    {kind: photos, patch_size: 32}                     # scikit-image's photographs, cut into patches
    {kind: hub, name: user/dataset, image_column: image, config: null}
    {kind: imagefolder, path: some/folder}
    {kind: parquet, data_files: {train: a.parquet, test: b.parquet}}   # or kind: arrow
    {kind: disk, path: saved/dataset}                  # a DatasetDict written by save_to_disk

`prepare(...)` turns any of them into a DatasetDict with splits train/val/test and one
column `image` of fixed shape (H, W, C) uint8, written once under the cache folder and
memory-mapped by every later run and DataLoader worker.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
# photographs shipped inside scikit-image, split by photograph so no patch is in two splits
PHOTO_SPLITS = {
    "train": ("astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry"),
    "val": ("coffee",),
    "test": ("chelsea",),
}
SPLIT_ALIASES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
KINDS = ("fashion_mnist", "photos", "hub", "imagefolder", "parquet", "arrow", "disk")


def image_features(height: int, width: int, channels: int) -> datasets.Features:
    return datasets.Features({"image": datasets.Array3D((height, width, channels), "uint8")})


# ---------------------------------------------------------------- built-in sources

def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) of uint8 images -> (N, rows, cols) array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 0x803:
        raise ValueError(f"{path} is not an IDX image file (magic {magic:#x}); reinstall dataset-fashion-mnist")
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, rows, cols)


def fashion_mnist(path: str = FASHION_MNIST_DIR) -> dict:
    """Fashion-MNIST as {split: (N, 28, 28, 1) uint8}, from Debian's IDX files or the hub."""
    files = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
    if all((Path(path) / f).exists() for f in files.values()):
        return {split: read_idx(Path(path) / f)[..., None] for split, f in files.items()}
    log.warning("Fashion-MNIST IDX files not found under %s (apt-get install dataset-fashion-mnist); "
                "trying the hub copy %s", path, FASHION_MNIST_HUB)
    return {"hub": {"kind": "hub", "name": FASHION_MNIST_HUB, "image_column": "image"}}


def photo_patches(patch_size: int = 32, stride: int | None = None, channels: int = 3) -> dict:
    """Non-overlapping (by default) patches of scikit-image's photographs, {split: (N, P, P, C)}."""
    import skimage.data

    stride = stride or patch_size
    out = {}
    for split, names in PHOTO_SPLITS.items():
        patches = []
        for name in names:
            photo = to_channels(Image.fromarray(getattr(skimage.data, name)()), channels)
            h, w = photo.shape[:2]
            for top in range(0, h - patch_size + 1, stride):
                for left in range(0, w - patch_size + 1, stride):
                    patches.append(photo[top:top + patch_size, left:left + patch_size])
        out[split] = np.stack(patches)
    return out


# ---------------------------------------------------------------- generic sources

def to_channels(image: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> (H, W, C) uint8 with C = 1 (mode L) or 3 (RGB)."""
    mode = {1: "L", 3: "RGB"}[channels]
    return np.asarray(image.convert(mode), dtype=np.uint8).reshape(image.height, image.width, channels)


def fit(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Centre crop to the aspect ratio of `size` (H, W), resize, convert: (H, W, C) uint8."""
    height, width = size
    if image.size != (width, height):
        w, h = image.size
        crop_w, crop_h = min(w, round(h * width / height)), min(h, round(w * height / width))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    return to_channels(image, channels)


def load_generic(source: dict) -> datasets.DatasetDict:
    kind = source["kind"]
    if kind == "hub":
        return datasets.load_dataset(source["name"], source.get("config"))
    if kind == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=source["path"])
    if kind in ("parquet", "arrow"):
        return datasets.load_dataset(kind, data_files=source["data_files"])
    if kind == "disk":
        loaded = datasets.load_from_disk(source["path"])
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    raise ValueError(f"unknown data source kind {kind!r}: use one of {', '.join(KINDS)}")


def decode_column(ds: datasets.Dataset, column: str, channels: int, size: tuple[int, int] | None,
                  name: str) -> datasets.Dataset:
    """Decode, convert and (centre crop +) resize one split; unreadable images are dropped and counted."""
    if column not in ds.column_names:
        raise ValueError(f"source has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                         f"set data.source.image_column")
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    if size is None:  # every image must then have the size of the first readable one
        for row in ds:
            try:
                size = as_pil(row[column]).size[::-1]
                break
            except Exception:
                continue
        else:
            raise ValueError(f"source {name!r} yields no readable image")

    def convert(batch):
        images, ok = [], []
        for item in batch[column]:
            try:
                images.append(fit(as_pil(item), channels, size))
                ok.append(True)
            except Exception:
                images.append(np.zeros((*size, channels), np.uint8))
                ok.append(False)
        return {"image": np.stack(images), "_ok": ok}

    features = image_features(*size, channels)
    features["_ok"] = datasets.Value("bool")
    ds = ds.map(convert, batched=True, batch_size=256, remove_columns=ds.column_names, features=features,
                desc=f"decoding {name}")
    kept = ds.filter(lambda ok: ok, input_columns="_ok").remove_columns("_ok")
    skipped = len(ds) - len(kept)
    if skipped:
        log.warning("skipped %d unreadable images of %d in %s", skipped, len(ds), name)
    return kept


def as_pil(item) -> Image.Image:
    """An image cell (PIL image, {'bytes','path'} dict or array) -> a loaded PIL image."""
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, dict):
        image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
    else:
        image = Image.fromarray(np.asarray(item, dtype=np.uint8).squeeze())
    image.load()
    return image


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


def cache_key(**settings) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prepare(source: dict, channels: int, image_size: tuple[int, int] | None, val_size: float = 0.05,
            seed: int = 0, cache_dir: str = "data_cache") -> Path:
    """Build the cache of `source` once; return its folder (a DatasetDict with train/val/test)."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported: use 1 (grey) or 3 (RGB)")
    kind = source.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown data source kind {kind!r}: use one of {', '.join(KINDS)}")
    settings = dict(source=source, channels=channels, image_size=image_size, val_size=val_size, seed=seed)
    target = Path(cache_dir) / f"{source.get('name', kind).replace('/', '_')}-{cache_key(**settings)}"
    if (target / "dataset_dict.json").exists():
        return target

    if kind == "fashion_mnist":
        arrays = fashion_mnist(source.get("path", FASHION_MNIST_DIR))
    elif kind == "photos":
        arrays = photo_patches(source.get("patch_size", 32), source.get("stride"), channels)
    else:
        arrays = {"hub": source}
    if "hub" in arrays:  # a generic source (or Fashion-MNIST's hub fallback)
        generic = arrays["hub"]
        column = generic.get("image_column", "image")
        raw = load_generic(generic)
        splits = {split: decode_column(ds, column, channels, image_size, f"{kind}/{split}")
                  for split, ds in raw.items()}
    else:
        splits = {}
        for split, images in arrays.items():
            if images.shape[-1] != channels or (image_size and tuple(images.shape[1:3]) != tuple(image_size)):
                images = np.stack([fit(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im),
                                       channels, image_size or im.shape[:2]) for im in images])
            splits[split] = datasets.Dataset.from_dict({"image": images}, features=image_features(*images.shape[1:]))
    for split, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"source {kind!r} yields no usable image in split {split!r}; check the path or files")
    dataset = datasets.DatasetDict(standard_splits(splits, val_size, seed))

    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    dataset.save_to_disk(str(partial))
    os.replace(partial, target)  # never leave a half-written cache at the final path
    return target
