"""Memory and time of one training step against image size and S: a step costs one slice.

The size SPN (S >= 2) and, for S = 1, the full-image causal transformer (the first-slice
decoder over the whole image: what the paper improves on), at equal width and depth, on
random 3-channel 8-bit images. Each case runs in its own process so that its peak memory is
its own (CPU: the peak resident set during the steps above the resident set before them; GPU:
peak allocated), under a memory budget (the process's data segment is capped) and a time
budget. A case over either is reported as such, not dropped: that is the point of the
comparison.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

CASE = """
import json, resource, sys, time
import torch
from stages import FirstSliceDecoder, SizeSPN

size, subscale, batch, width, layers, steps = map(int, sys.argv[1:7])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
x = torch.randint(0, 256, (batch, size, size, 3), device=device)
data = {"image": x, "msb": x, "lsb": torch.zeros_like(x)}
net = dict(width=width, layers=layers, heads=4, context_width=width, context_layers=2, context_attention_layers=1)
cls = SizeSPN if subscale > 1 else FirstSliceDecoder
stage = cls(image_size=size, channels=3, bits=8, high_bits=8, subscale=subscale, **net).to(device)
optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
def kib(field):  # VmRSS (now) or VmHWM (peak since the last reset) of this process, KiB; None off Linux
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
try:  # Linux: reset the peak to now, so that an earlier peak (building the model) does not hide the step's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = kib("VmRSS")
except OSError:
    baseline = None
if baseline is None:
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
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
        else ((kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - baseline) / 1024)
print(json.dumps({"peak_mb": peak, "step_s": min(times[1:]), "device": device}))
"""


def measure(size: int, subscale: int, batch: int, width: int, layers: int, steps: int, memory_mb: int,
            seconds: float) -> dict:
    """One case in a fresh process capped at `memory_mb` of data and `seconds` of time."""
    def cap() -> None:
        limit = memory_mb * 2**20 + 3 * 2**30  # the budget above what importing torch takes
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    row = {"image": size, "S": subscale, "slice": f"{size // subscale}x{size // subscale}x3",
           "subpixels_per_slice": (size // subscale) ** 2 * 3, "peak_mb": None, "step_s": None}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", CASE, *map(str, (size, subscale, batch, width, layers, steps))],
                              capture_output=True, text=True, timeout=seconds, preexec_fn=cap,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    except subprocess.TimeoutExpired:
        return {**row, "status": f"over the time budget ({seconds:.0f} s for {steps + 1} steps)"}
    if done.returncode != 0:
        memory = "memory" in done.stderr.lower() or "alloc" in done.stderr.lower() or done.returncode < 0
        status = f"over the memory budget ({memory_mb} MB)" if memory else "failed: " + done.stderr.strip()[-200:]
        return {**row, "status": status}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**row, **result, "status": "ok", "wall_s": round(time.perf_counter() - start, 1)}


def run(quick: bool = False, smoke: bool = False) -> dict:
    sizes = [16] if smoke else [32, 64] if quick else [32, 64, 128]
    batch, width, layers, steps = (2, 16, 1, 1) if smoke else (4, 64, 2, 2)
    memory_mb, seconds = (2000, 120) if smoke else (4000, 90) if quick else (8000, 240)
    rows = []
    for size in sizes:
        for subscale in (1, 2, 4, 8):
            if size % subscale == 0 and size // subscale >= 2 and not (smoke and subscale in (2, 8)):
                rows.append(measure(size, subscale, batch, width, layers, steps, memory_mb, seconds))
                print("  memory:", json.dumps(rows[-1]), flush=True)
    for row in rows:  # ratios against S = 1 of the same size, beside the ideal 1/S^2
        base = next(r for r in rows if r["image"] == row["image"] and r["S"] == 1)
        row["ideal"] = 1 / row["S"] ** 2
        for key in ("peak_mb", "step_s"):
            ok = row[key] is not None and base[key] is not None and base[key] > 0
            row[f"{key}_vs_S1"] = row[key] / base[key] if ok else None
    return {"settings": dict(batch=batch, width=width, decoder_layers=layers, context_layers=2, channels=3,
                             memory_budget_mb=memory_mb, time_budget_s=seconds),
            "rows": rows}
