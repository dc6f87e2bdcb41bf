"""On a GPU: training throughput with bf16 mixed precision and `torch.compile`, model FLOP
utilisation against the device's bf16 peak, and cascade sampling speed, at the paper's
settings shrunk to fit a few minutes (ImageNet 64 x 64 x 3 at S = 4, b = 3; CelebA-HQ
256 x 256 x 3 at 5 bits, S = 8, b = 3; width 256, 6 layers). Without a GPU it runs the same
code on the CPU in seconds with tiny networks (CI runs it so, to keep it working).

    python -m benchmarks.gpu [--out bench/gpu.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.throughput import matmul_peak
from pipeline.__main__ import OneLineParser
from pipeline.io import save_json
from pipeline.inference.cascade import Cascade
from stages import STAGES
from stages.plan import ORDER

# dense bf16 peak FLOP/s of the data-centre GPUs this is likely to meet (vendor figures)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
SETTINGS = {  # the paper's geometries; networks shrunk so that a few minutes suffice
    "imagenet64": dict(image_size=64, channels=3, bits=8, high_bits=3, subscale=4, batch=64),
    "celebahq256_5bit": dict(image_size=256, channels=3, bits=5, high_bits=3, subscale=8, batch=16),
}


def device_peak(device: str) -> tuple[str, float, str]:
    """(device name, bf16 peak FLOP/s, where the peak comes from)."""
    if device != "cuda":
        return "cpu", matmul_peak(1024, 4), "a float32 torch.matmul measured now"
    name = torch.cuda.get_device_name()
    for key, peak in BF16_PEAK.items():
        if key in name:
            return name, peak, "vendor's dense bf16 figure"
    return name, matmul_peak(8192, 20, "cuda", torch.bfloat16), "a bf16 torch.matmul measured now"


def timed_steps(stage, batch: dict, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 3):  # the first steps compile and warm up
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = stage.estimate(stage.sliced(batch), stage.random_slices(batch["image"].shape[0])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[3:])[len(times[3:]) // 2]


def run(smoke: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, peak, source = device_peak(device)
    net = dict(width=16, layers=1, heads=2, context_width=16, context_layers=1) if smoke else \
        dict(width=256, layers=6, heads=8, context_width=256, context_layers=4, context_attention_layers=2)
    results = {"device": name, "peak_flops": peak, "peak_source": source, "compile": not smoke, "rows": []}
    for setting, spec in SETTINGS.items():
        spec = dict(spec)
        batch_size = 2 if smoke else spec.pop("batch")
        spec.pop("batch", None)
        if smoke:
            spec.update(image_size=16, subscale=4)
        x = torch.randint(0, 2 ** spec["bits"], (batch_size, spec["image_size"], spec["image_size"], 3), device=device)
        low = spec["bits"] - spec["high_bits"]
        batch = {"image": x, "msb": x >> low, "lsb": x & ((1 << low) - 1)}
        stages = {}
        for stage_name in ORDER:
            torch.manual_seed(0)
            stage = STAGES[stage_name](**spec, **net).to(device)
            with FlopCounterMode(display=False) as counter:
                stage.estimate(stage.sliced(batch), stage.random_slices(batch_size)).mean().backward()
            flops = counter.get_total_flops()
            if not smoke:
                stage.decoder.compile()
                if stage.context_net is not None:
                    stage.context_net.compile()
            step = timed_steps(stage, batch, 2 if smoke else 20, device)
            results["rows"].append({"setting": setting, "stage": stage_name, "batch": batch_size, "step_s": step,
                                    "images_per_s": batch_size / step, "model_flops_utilisation": flops / step / peak})
            stages[stage_name] = stage.eval()
        cascade = Cascade(stages)
        n = 2 if smoke else 16
        start = time.perf_counter()
        cascade.sample(n, generator=torch.Generator(device).manual_seed(0))
        if device == "cuda":
            torch.cuda.synchronize()
        results["rows"].append({"setting": setting, "stage": "cascade sampling", "batch": n,
                                "s_per_image": (time.perf_counter() - start) / n})
        print(json.dumps(results["rows"][-4:]), flush=True)
    return results


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.gpu", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/gpu.json")
    parser.add_argument("--smoke", action="store_true", help="tiny networks: seconds on a CPU (what CI runs)")
    args = parser.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    results = run(smoke)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
