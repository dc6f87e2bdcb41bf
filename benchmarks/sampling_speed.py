"""Sampling speed: cached (key/value) decoding against recomputing the whole prefix.

1. One decoder over a 28 x 28 slice sequence (784 sub-pixels, the default experiment's
   decoder size), batch 16: both ways from the same seed, side by side in one run; the
   samples must be identical.
2. If the experiment's checkpoints exist: seconds per image and sub-pixels per second of
   the whole cascade, as `make sample` runs it (batch 16).

    python benchmarks/sampling_speed.py [--exp fashion_mnist] [--run-dir runs/fashion_mnist]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.cascade import Cascade
from pipeline.config import load_experiment, stage_names
from stages import FirstSliceDecoder


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="fashion_mnist")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    experiment = load_experiment(args.exp)
    run_dir = Path(args.run_dir or f"runs/{args.exp}")
    net = experiment["stages"]["first_slice"]["model"]

    torch.manual_seed(0)
    stage = FirstSliceDecoder(image_size=28, channels=1, bits=8, high_bits=8, subscale=1,
                              width=net.get("width", 128), layers=net.get("layers", 4), heads=net.get("heads", 4)).eval()
    decoder, n = stage.decoder, args.batch
    (cached, lp_cached), t_cached = timed(lambda: decoder.sample(n, generator=torch.Generator().manual_seed(0)))
    (full, lp_full), t_full = timed(lambda: decoder.sample(n, generator=torch.Generator().manual_seed(0), cached=False))
    tokens = n * decoder.cfg.length
    print(f"decoder width {decoder.cfg.width}, {decoder.cfg.layers} layers, 28x28 sequence (784 sub-pixels), batch {n}")
    print(f"  cached:     {t_cached:7.2f} s  {tokens / t_cached:9.0f} sub-pixels/s")
    print(f"  recomputed: {t_full:7.2f} s  {tokens / t_full:9.0f} sub-pixels/s")
    print(f"  speed-up {t_full / t_cached:.1f}x; same samples: {torch.equal(cached, full)}; "
          f"max log-prob difference {float((lp_cached - lp_full).abs().max()):.2e} nats")

    names = stage_names(experiment)
    if all((run_dir / "checkpoints" / f"{s}.ckpt").exists() for s in names):
        cascade = Cascade.load(run_dir, names, device="cpu")
        subpixels = len(cascade.plan()) * cascade.h * cascade.w * cascade.C * n
        threads = torch.get_num_threads()
        for count in sorted({1, threads}):  # small cached steps may not profit from more threads
            torch.set_num_threads(count)
            _, seconds = timed(lambda: cascade.sample(n, generator=torch.Generator().manual_seed(0)))
            print(f"cascade of {run_dir} ({', '.join(names)}), batch {n}, {count} thread(s): {seconds:.2f} s, "
                  f"{seconds / n:.3f} s per image, {subpixels / seconds:.0f} sub-pixels/s")
        torch.set_num_threads(threads)
    else:
        print(f"(no trained cascade in {run_dir}: run `make train-all EXP={args.exp}` for the cascade figures)")


if __name__ == "__main__":
    main()
