"""`make evaluate`: exact bits/dim of the cascade, and of each stage, on the test split
(or on IMAGES=file.npz|folder), beside what PNG and lossless WebP spend on the same images.

Writes `$(RUN_DIR)/eval.json`:
    {"bpd", "stages": {first_slice, size_spn, depth_spn}, "n_images", "split", "codecs": {png, webp},
     "nll": [nats per image] (with IMAGES only)}
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.datamodule import SubscaleDataModule
from data.transforms import quantize
from pipeline.cascade import STAGE_NAMES
from pipeline.io import check_shape, read_images, save_json
from pipeline.progress import progress_bar
from pipeline.sample import load_cascade
from pipeline.tracking import log_job


def codec_bits(images: np.ndarray, codec: str) -> int:
    """Bits that PNG or lossless WebP spend on the images, one image per file."""
    total = 0
    for image in images:
        buffer = io.BytesIO()
        picture = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
        if codec == "png":
            picture.save(buffer, format="PNG", optimize=True)
        else:
            picture.save(buffer, format="WEBP", lossless=True, quality=100, method=6)
        total += 8 * buffer.tell()
    return total


def batches(args, experiment, cascade):
    """Yield n-bit image batches (B, H, W, C) of the test split or of the user's images."""
    if args.images:
        images = read_images(args.images, cascade.C, experiment["data"].get("background", "white"))
        check_shape(images, cascade.shape, f"IMAGES {args.images}")
        x = quantize(torch.from_numpy(images), cascade.bits)
        for start in range(0, len(x), args.batch):
            yield x[start:start + args.batch]
        return
    data = SubscaleDataModule(**{**experiment["data"], "eval_batch_size": args.batch})
    data.prepare_data()
    for batch in data.test_dataloader():
        yield batch["image"]


def main(args) -> None:
    experiment, cascade = load_cascade(args)
    split = str(args.images) if args.images else "test"
    nats = {name: 0.0 for name in cascade.stages}
    per_image, codec = [], {"png": 0, "webp": 0}
    count = 0
    bar = progress_bar(desc=f"evaluating {split}", unit="image")
    for x in batches(args, experiment, cascade):
        log_prob = cascade.log_prob(x)
        for name, lp in log_prob.items():
            nats[name] -= float(lp.double().sum())
        per_image.append(-sum(lp.double() for lp in log_prob.values()).cpu())
        stored = x.to(torch.uint8).numpy()  # the n-bit values the model scores, as 8-bit pixels
        for name in codec:
            codec[name] += codec_bits(stored, name)
        count += len(x)
        bar.update(len(x))
    bar.close()
    if count == 0:
        raise ValueError(f"no images to evaluate in {split}")
    shares = {name: cascade.bpd(nats[name] / count) if name in nats else 0.0 for name in STAGE_NAMES}
    dims = count * cascade.dims
    result = {
        "bpd": sum(shares.values()),
        "stages": shares,
        "n_images": count,
        "split": split,
        "codecs": {name: bits / dims for name, bits in codec.items()},
    }
    if args.images:
        result["nll"] = torch.cat(per_image).tolist()  # nats per image, in the order given
    out = Path(args.run_dir) / "eval.json"
    save_json(out, result)
    print(f"{'':<22}bits/dim   ({count} images of {split})")
    for name in STAGE_NAMES:
        print(f"  {name:<20}{shares[name]:8.4f}")
    print(f"  {'cascade (total)':<20}{result['bpd']:8.4f}")
    print(f"  {'PNG, one per file':<20}{result['codecs']['png']:8.4f}")
    print(f"  {'WebP lossless':<20}{result['codecs']['webp']:8.4f}")
    print(f"wrote {out}")
    log_job(experiment, "evaluate", Path(args.run_dir), {
        f"{'test' if split == 'test' else 'images'}/{key}": value
        for key, value in {"bpd": result["bpd"], **{f"bpd_{name}": share for name, share in shares.items()},
                           **{f"bpd_{name}": bpd for name, bpd in result["codecs"].items()}}.items()})
