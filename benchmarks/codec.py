"""The cascade as a codec: real compressed size against the model's -log2 p(x), and encode and
decode seconds per image, on the cascade the quality benchmark trained.

`pipeline.codec.coder` codes CHUNK images at a time with the pinned arithmetic of `stages.canonical`,
whatever the caller's batch (so that both sides compute bit-identical probabilities on any
machine); that fixed chunk is the batch here. The chunks are coded in processes side by side
(one per torch thread), and in one process for comparison.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.codec.coder import CHUNK, compress, decompress
from pipeline.config import load_experiment, stage_names
from pipeline.inference.cascade import Cascade
from pipeline.inference.processes import worker_count


def run(experiment_file: Path, run_dir: Path, images_file: Path, count: int) -> dict:
    """Compress and decompress the first `count` images of `images_file` (8-bit, (N, H, W, C)).

    Returns bits/dim of the file and of the model, overhead in percent, seconds per image each way.
    """
    config = load_experiment(str(experiment_file))
    cascade = Cascade.load(run_dir, stage_names(config), device="cpu", expected=config["data"])
    images = torch.from_numpy(np.load(images_file)["images"][:count]).long() >> (8 - cascade.bits)
    with torch.no_grad():
        nats = -sum(float(lp.double().sum()) for lp in cascade.log_prob(images).values())
    seconds, files = {}, {}
    for workers in (1, None):  # one process, then the default
        start = time.perf_counter()
        files[workers] = data = compress(cascade, images, workers=workers)
        middle = time.perf_counter()
        decoded, _ = decompress(cascade, data, workers=workers)
        seconds[workers] = (middle - start, time.perf_counter() - middle)
    (encode_s, decode_s), (encode_one_s, decode_one_s) = seconds[None], seconds[1]
    dims = images.numel()
    model_bpd = nats / dims / np.log(2)
    file_bpd = 8 * len(data) / dims
    return {"images": len(images), "chunk": CHUNK, "file_bpd": file_bpd, "model_bpd": model_bpd,
            "overhead_percent": 100 * (file_bpd / model_bpd - 1), "bytes": len(data),
            "encode_s_per_image": encode_s / len(images), "decode_s_per_image": decode_s / len(images),
            "processes": worker_count(-(-len(images) // CHUNK), "cpu"),
            "encode_s_per_image_one_process": encode_one_s / len(images),
            "decode_s_per_image_one_process": decode_one_s / len(images),
            "identical": bool(torch.equal(decoded, images)) and files[1] == files[None]}
