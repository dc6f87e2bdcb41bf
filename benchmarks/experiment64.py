"""The 64 x 64 experiment's costs (`emoji64`): a training step of its size SPN at its S beside S = 1
(the full-image transformer of the same width and depth), in time and peak memory, under the budgets
of `benchmarks.memory`; each stage's training step at the experiment's settings; and sampling
seconds per image of the whole cascade (random weights: speed does not depend on them) with the
default sampler."""
from __future__ import annotations

import time

import torch

from benchmarks import memory, throughput
from benchmarks.sampling import cascade_of
from pipeline.__main__ import OneLineParser
from pipeline.io import atomic_write, save_json
from pipeline.config import load_experiment

EXPERIMENT = "emoji64"


def run(quick: bool = False) -> dict:
    config = load_experiment(EXPERIMENT)
    data, size_spn = config["data"], config["stages"]["size_spn"]["model"]
    budget_mb, seconds = (4000, 90) if quick else (8000, 240)
    steps = [memory.measure(data["image_size"], s, data["batch_size"], size_spn["width"], size_spn["layers"], 2,
                            budget_mb, seconds) for s in (data["subscale"], 1)]
    stages = throughput.measure_stages(EXPERIMENT, 5 if quick else 20)
    cascade = cascade_of(EXPERIMENT)
    n = 4 if quick else 16
    cascade.sample(2, generator=torch.Generator().manual_seed(0))  # builds and warms the sampler
    start = time.perf_counter()
    cascade.sample(n, generator=torch.Generator().manual_seed(1))
    per_image = (time.perf_counter() - start) / n
    return {"experiment": EXPERIMENT, "batch": data["batch_size"], "width": size_spn["width"],
            "layers": size_spn["layers"], "memory_budget_mb": budget_mb, "size_spn_step": steps,
            "stages": [{k: r[k] for k in ("stage", "batch", "step_s", "images_per_s")} for r in stages],
            "sampling": {"images": n, "s_per_image": per_image,
                         "subpixels_per_s": cascade.dims / per_image}}


def markdown(r: dict) -> list[str]:
    from benchmarks.report import table

    out = [f"\n## The 64 x 64 experiment (`{r['experiment']}`)\n\nA training step of its size SPN (width {r['width']}, "
           f"{r['layers']} layers, batch {r['batch']}, 8-bit random images) at its S beside S = 1, budget "
           f"{r['memory_budget_mb']} MB:\n"]
    out.append(table(["S", "slice", "peak MB", "step s", "status"],
                     [[row["S"], row["slice"], row["peak_mb"], row["step_s"], row["status"]] for row in r["size_spn_step"]]))
    out.append("\nEach stage's training step at the experiment's settings (real data):\n")
    out.append(table(["stage", "batch", "step s", "images/s"],
                     [[row["stage"], row["batch"], row["step_s"], row["images_per_s"]] for row in r["stages"]]))
    s = r["sampling"]
    out.append(f"\nSampling the whole cascade (default sampler, {s['images']} images): **{s['s_per_image']:.3g} s per "
               f"image** ({s['subpixels_per_s']:,.0f} sub-pixels/s).")
    return out


def main() -> None:
    """`python -m benchmarks.experiment64 [--quick]`: this part of `make bench` alone, into
    bench/experiment64.json and bench/experiment64.md."""
    import json
    from pathlib import Path

    from benchmarks.report import machine

    parser = OneLineParser(prog="python -m benchmarks.experiment64", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    results = {**run(args.quick), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    save_json(out / "experiment64.json", results)
    command = "python -m benchmarks.experiment64" + (" --quick" if args.quick else "")
    atomic_write(out / "experiment64.md", (f"`{command}` on {results['machine']['cpu']} ({results['machine']['threads']} "
                                           f"threads), {results['date']}.\n" + "\n".join(markdown(results)) + "\n").encode())
    print(f"wrote {out / 'experiment64.json'} and {out / 'experiment64.md'}")


if __name__ == "__main__":
    main()
