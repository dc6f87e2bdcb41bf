"""`make compress INPUT=<folder | .npz> OUT=<file>` and `make decompress INPUT=<file> OUT=<folder | .npz>`:
the trained cascade as a lossless codec (`pipeline.codec.coder`). The n-bit values the experiment
models are restored bit for bit: for 8-bit experiments, the exact pixels."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from data.transforms import quantize
from pipeline.codec.coder import compress, decompress
from pipeline.inference.pictures import to_8bit
from pipeline.inference.sample import load_cascade
from pipeline.io import atomic_write, check_shape, folder_at_once, image_files, read_images, save_npz, save_png


def compress_command(args) -> None:
    if not args.input:
        raise ValueError("no input given: INPUT=<an image, a folder of images, or an .npz with 'images'>")
    if not args.out:
        raise ValueError("give OUT=<file> to write the compressed images to")
    if Path(args.out).exists():
        raise ValueError(f"OUT={args.out} exists: give a new file name (nothing is overwritten)")
    experiment, cascade = load_cascade(args)
    images8 = read_images(args.input, cascade.C, experiment["data"].get("background", "white"))
    check_shape(images8, cascade.shape, f"INPUT {args.input}")
    if not len(images8):
        raise ValueError(f"INPUT {args.input} holds no images")
    names = [f.stem for f in image_files(args.input)] if Path(args.input).is_dir() else []
    images = quantize(torch.from_numpy(images8), cascade.bits).long()
    data = compress(cascade, images, names, progress=True)
    atomic_write(args.out, data)
    dims = images.numel()
    nats = -sum(float(sum(cascade.log_prob(images[i:i + 250]).values()).double().sum())
                for i in range(0, len(images), 250))
    model_bpd = nats / math.log(2) / dims
    real_bpd = 8 * len(data) / dims
    print(f"compressed {len(images)} images ({' x '.join(map(str, cascade.shape))}, {cascade.bits} bits) into "
          f"{args.out}: {len(data):,} bytes, {real_bpd:.4f} bits/dim (the model's -log2 p: {model_bpd:.4f}, "
          f"{100 * (real_bpd / model_bpd - 1):+.2f}% with the header)")


def decompress_command(args) -> None:
    if not args.input:
        raise ValueError("no input given: INPUT=<a file written by make compress>")
    path = Path(args.input)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give INPUT=<a file written by make compress>")
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}: give INPUT=<a file written by make compress>")
    if not args.out:
        raise ValueError("give OUT=<folder or .npz> to write the images to")
    out = Path(args.out)
    if out.exists() and (out.suffix == ".npz" or not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT={out} exists: give a new file or folder name (nothing is overwritten)")
    _, cascade = load_cascade(args)
    try:
        images, names = decompress(cascade, path.read_bytes(), progress=True)
    except ValueError as error:
        raise ValueError(f"cannot decompress {path}: {error}") from error
    pixels = to_8bit(images, cascade.bits).numpy()
    if out.suffix == ".npz":
        save_npz(out, images=pixels)
    else:
        names = names if len(names) == len(pixels) and len(set(names)) == len(names) else \
            [f"image-{i:05d}" for i in range(len(pixels))]
        with folder_at_once(out) as folder:
            for name, image in zip(names, pixels):
                save_png(folder / f"{name}.png", image)
    print(f"decompressed {len(pixels)} images into {out}")
