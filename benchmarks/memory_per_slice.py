"""Memory and time of one training step grow with the slice, not the image.

One stage (the depth SPN: it exists for every S) on 64 x 64 x 3 images, equal width and
depth, at S = 1, 2, 4: peak memory and step time of the paper's training step (one
random target slice per example). Each S runs in its own process so that peak memory is
its own (CPU: peak resident set size above the process's baseline; GPU: peak allocated).

    python benchmarks/memory_per_slice.py [--batch 4] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(subscale: int, batch: int, steps: int, width: int, layers: int) -> dict:
    import torch

    from stages import DepthSPN

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, 64, 64, 3), device=device)
    data = {"image": x, "msb": x >> 4, "lsb": x & 15}
    stage = DepthSPN(image_size=64, channels=3, bits=8, high_bits=4, subscale=subscale, width=width, layers=layers,
                     heads=4, context_width=width, context_layers=2, context_attention_layers=1).to(device)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = stage.estimate(stage.sliced(data), stage.random_slices(batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024)
    return {"S": subscale, "slice": f"{64 // subscale}x{64 // subscale}x3", "tokens": (64 // subscale) ** 2 * 3,
            "step_s": min(times[1:]), "peak_mib": peak, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure one S
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.steps, args.width, args.layers)))
        return
    rows = []
    for s in (1, 2, 4):
        out = subprocess.run([sys.executable, __file__, "--one", str(s), "--batch", str(args.batch), "--steps",
                              str(args.steps), "--width", str(args.width), "--layers", str(args.layers)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"depth SPN on 64x64x3, batch {args.batch}, width {args.width}, {args.layers} decoder layers, "
          f"device {base['device']}")
    print(f"{'S':>2} {'slice':>9} {'tokens':>7} {'step (s)':>9} {'peak (MiB)':>11} {'time vs S=1':>12} {'memory vs S=1':>14}")
    for r in rows:
        print(f"{r['S']:>2} {r['slice']:>9} {r['tokens']:>7} {r['step_s']:>9.3f} {r['peak_mib']:>11.0f} "
              f"{r['step_s'] / base['step_s']:>12.3f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):>14.3f}")


if __name__ == "__main__":
    main()
