"""`make evaluate`: exact bits/dim of the cascade, and of each stage, on the test split (or on
IMAGES=file.npz|folder), beside the real size of those images compressed by the cascade
(`make compress`) and what PNG, lossless WebP and lossless JPEG-XL spend on them.

Writes `$(RUN_DIR)/eval.json`:
    {"bpd", "stages": {share of each of the cascade's stages}, "n_images", "split",
     "slices": [{"stage", "part", "k", "bpd" (its share of the image's bits/dim),
                 "bits_per_subpixel" (bits per sub-pixel of that slice)}, in the cascade's order],
     "compressed_bpd" (the real file of `make compress`, header included),
     "codecs": {png, webp, jxl, png_mosaic, webp_mosaic, jxl_mosaic} ({} with --skip-codecs),
     "nll": [nats per image] (with IMAGES only)}
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from data.datamodule import SubscaleDataModule
from pipeline.codec.coder import compress
from pipeline.codec.reference import CodecSizes
from pipeline.inference.cascade import stage_sums
from pipeline.inference.sample import load_cascade
from pipeline.io import check_shape, read_images, save_json
from pipeline.progress import progress_bar
from pipeline.tracking import log_job
from stages.canonical import CanonicalUnavailable
from stages.plan import ORDER

CODEC_NAMES = {"png": "PNG, one per file", "webp": "WebP lossless", "jxl": "JPEG-XL lossless",
               "png_mosaic": "PNG, one mosaic", "webp_mosaic": "WebP, one mosaic", "jxl_mosaic": "JPEG-XL, one mosaic"}


def batches(args, experiment, cascade):
    """Yield n-bit image batches (B, H, W, C) of the test split or of the user's images."""
    if args.images:
        images = read_images(args.images, cascade.C, experiment["data"].get("background", "white"))
        check_shape(images, cascade.shape, f"IMAGES {args.images}")
        x = torch.from_numpy(images)
        x >>= 8 - cascade.bits  # quantized in place (the array is this command's own): one copy
        for start in range(0, len(x), args.batch):
            yield x[start:start + args.batch]
        return
    data = SubscaleDataModule(**{**experiment["data"], "eval_batch_size": args.batch})
    data.prepare_data()
    for batch in data.test_dataloader():
        yield batch["image"]


def real_file(cascade, images: torch.Tensor) -> bytes | None:
    """The bytes of `make compress` for these images, or None after a note where the codec cannot run
    (no C++ compiler for its pinned arithmetic): the likelihoods do not need it."""
    try:
        return compress(cascade, images, progress=True)
    except CanonicalUnavailable as error:
        print(f"note: the real compressed size is left out: {error}", file=sys.stderr)
        return None


def main(args) -> None:
    experiment, cascade = load_cascade(args)
    split = str(args.images) if args.images else "test"
    nats = {name: 0.0 for name in cascade.stages}
    slice_nats = {step: 0.0 for step in cascade.plan()}
    per_image, stored = [], []
    codecs = None if args.skip_codecs else CodecSizes()
    bar = progress_bar(desc=f"evaluating {split}", unit="image")
    for x in batches(args, experiment, cascade):
        slices = cascade.slice_log_prob(x)
        for step, lp in slices.items():
            slice_nats[step] -= float(lp.double().sum())
        log_prob = stage_sums(slices)
        for name, lp in log_prob.items():
            nats[name] -= float(lp.double().sum())
        per_image.append(-sum(lp.double() for lp in log_prob.values()).cpu())
        stored.append(x.to(torch.uint8))  # the n-bit values the model scores, as 8-bit numbers
        if codecs is not None:
            codecs.add(stored[-1].numpy())
        bar.update(len(x))
    bar.close()
    if not stored:
        raise ValueError(f"no images to evaluate in {split}")
    images = torch.cat(stored) if len(stored) > 1 else stored[0]
    del stored  # the images are in memory once, as uint8, from here on
    count, dims = len(images), images.numel()
    # the cascade's own stages only: a two-stage cascade (b = n) has no depth share at all
    shares = {name: cascade.bpd(nats[name] / count) for name in ORDER if name in nats}
    subpixels = cascade.h * cascade.w * cascade.C  # of one slice
    slices = [{"stage": step.stage, "part": step.part, "k": step.k, "bpd": cascade.bpd(total / count),
               "bits_per_subpixel": cascade.bpd(total / count) * dims / count / subpixels}
              for step, total in slice_nats.items()]
    compressed = None if args.skip_compress else real_file(cascade, images)
    result = {
        "bpd": sum(shares.values()),
        "stages": shares,
        "n_images": count,
        "split": split,
        "slices": slices,
        "compressed_bpd": None if compressed is None else 8 * len(compressed) / dims,
        "codecs": codecs.bits_per_dim(images.numpy()) if codecs is not None else {},
    }
    if args.images:
        result["nll"] = torch.cat(per_image).tolist()  # nats per image, in the order given
    out = Path(args.run_dir) / "eval.json"
    save_json(out, result)
    print(f"{'':<28}bits/dim   ({count} images of {split})")
    for name, share in shares.items():
        print(f"  {name:<26}{share:8.4f}")
    print(f"  {'cascade (total)':<26}{result['bpd']:8.4f}")
    for name in shares:
        own = [row for row in slices if row["stage"] == name]
        if len(own) > 1:
            cheap, dear = min(own, key=lambda row: row["bpd"]), max(own, key=lambda row: row["bpd"])
            print(f"  {name}'s {len(own)} slices: costliest {dear['part']} k={dear['k']} {dear['bpd']:.4f} "
                  f"({dear['bits_per_subpixel']:.3f} bits/sub-pixel), cheapest k={cheap['k']} {cheap['bpd']:.4f} "
                  f"({cheap['bits_per_subpixel']:.3f})")
    if compressed is not None:
        print(f"  {'make compress (real file)':<26}{result['compressed_bpd']:8.4f}")
    for name, value in result["codecs"].items():
        print(f"  {CODEC_NAMES.get(name, name):<26}{value:8.4f}")
    print(f"wrote {out}")
    metrics = {"bpd": result["bpd"], **({"compressed_bpd": result["compressed_bpd"]} if compressed else {}),
               **{f"bpd_{name}": share for name, share in shares.items()},
               **{f"bpd_{name}": value for name, value in result["codecs"].items()}}
    log_job(experiment, "evaluate", Path(args.run_dir),
            {f"{'test' if split == 'test' else 'images'}/{key}": value for key, value in metrics.items()})
