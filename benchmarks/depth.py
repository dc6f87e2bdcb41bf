"""RQ2 of the paper, measured: does depth upscaling make samples better at equal training minutes?

    python -m benchmarks.depth [--exp emoji64] [--minutes 10] [--n 500] [--out bench]

Three cascades on the same images (emoji64: 64 x 64 emoji), each trained for the same minutes on this machine
(`benchmarks.quality.train`: each stage's steps are its share of the minutes at its measured
speed, so the learning-rate schedule completes):

    depth upscaling   n = 5, b = 3: first-slice decoder, size SPN, depth SPN (the experiment)
    no depth stage    n = 5, b = 5: first-slice decoder, size SPN
    8 bits            n = 8, b = 8: first-slice decoder, size SPN

Each is scored on the test split: exact bits/dim (comparable at the same n only) and FID/KID of
the same number of samples at temperature 1 (`pipeline.inference.quality`). All FID/KID here are in one
feature network, the 5-bit experiment's (`pipeline.inference.features`), and the 8-bit samples are shown at
5 bits for it, as the test images are: the figures compare what the images show at the same
depth. Writes bench/depth.json and bench/depth.md, and each cascade's sample grid beside them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.quality import pipeline, train
from benchmarks.report import machine, table
from benchmarks.throughput import measure_stages
from pipeline.__main__ import OneLineParser
from pipeline.io import atomic_write, save_json
from pipeline.config import load_experiment, stage_names
from pipeline.inference.features import as_shown
from pipeline.inference.pictures import image_grid
from pipeline.inference.quality import fid_kid, run_features, split_images
from pipeline.io import save_png


def variants(data: dict) -> dict:
    """{name: change of the data section}: the experiment (with a depth stage), b = n, and 8 bits."""
    n, b = data["bits"], data.get("high_bits", data["bits"])
    if b >= n:
        raise ValueError(f"the experiment has no depth stage (b = {b}, n = {n}): RQ2 compares one with b < n")
    out = {f"depth upscaling (n = {n}, b = {b})": {}, f"no depth stage (n = {n}, b = {n})": {"high_bits": n}}
    if n != 8:
        out["8 bits (n = 8, b = 8)"] = {"bits": 8, "high_bits": 8}
    return out

GRID = 32  # samples shown per cascade


def variant(config: dict, change: dict) -> dict:
    """The experiment with other bits; a stage its cascade no longer has is dropped."""
    data = {"high_bits": config["data"]["bits"], **config["data"], **change}
    spec = {**config, "data": data, "checkpoint_every": 10**9, "val_quality": 0}
    if data["high_bits"] == data["bits"]:
        spec["stages"] = {k: v for k, v in config["stages"].items() if k != "depth_spn"}
    return spec


def run(experiment: str, minutes: float, n: int, folder: Path, test_images: int | None = None) -> dict:
    config = load_experiment(experiment)
    if n < 2:
        raise ValueError(f"--n {n}: FID and KID need at least 2 samples")
    cascades = variants(config["data"])  # before any training
    folder.mkdir(parents=True, exist_ok=True)
    runs = folder / "depth_runs"
    net, record, splits = run_features(runs / "features", config, config["data"]["bits"])
    real = split_images(splits["test"], config["data"]["bits"])
    scored = runs / "test_images.npz"  # the test images bits/dim is measured on (the first `test_images`)
    np.savez(scored, images=splits["test"].with_format("numpy", dtype=np.uint8)[:test_images]["image"])  # 8-bit
    results = {"experiment": experiment, "minutes": minutes, "n_samples": n, "n_real": len(real),
               "bpd_images": len(real[:test_images]),
               "features": record["name"], "feature_task": record["task"],
               "feature_test_accuracy": record["test_accuracy"], "rows": []}
    results["bits"] = config["data"]["bits"]
    for name, change in cascades.items():
        spec = variant(config, change)
        slug = "_".join(f"{k}{v}" for k, v in sorted(spec["data"].items()) if k in ("bits", "high_bits"))
        path, run_dir = runs / f"{slug}.yaml", runs / slug
        path.write_text(yaml.safe_dump({**spec, "name": f"bench-depth-{slug}"}, sort_keys=False))
        speeds = {row["stage"]: row["step_s"] for row in measure_stages(str(path), steps=6)}
        configured = {stage: spec["stages"][stage].get("trainer", {}).get("max_steps", 1000) * speeds[stage]
                      for stage in stage_names(spec)}
        budget = {stage: 60 * minutes * share / sum(configured.values()) for stage, share in configured.items()}
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        training = train(path, run_dir, speeds, budget, name)
        pipeline("evaluate", "--exp", str(path), "--run-dir", str(run_dir), "--skip-compress", "--images", str(scored))
        bpd = json.loads((run_dir / "eval.json").read_text())
        pipeline("sample", "--exp", str(path), "--run-dir", str(run_dir), "--n", str(n), "--batch", "64")
        drawn = np.load(run_dir / "samples" / "samples.npz")["images"]  # 8-bit values of n-bit images
        fake = as_shown(drawn, results["bits"])  # at the experiment's bits, as the test images
        scores = fid_kid(net, real, fake)
        grid = folder / f"depth_{slug}.png"
        save_png(grid, image_grid(torch.from_numpy(fake[:GRID].permute(0, 2, 3, 1).numpy()), columns=8))
        results["rows"].append({"cascade": name, "bits": spec["data"]["bits"], "high_bits": spec["data"]["high_bits"],
                                "stages": list(stage_names(spec)), "bpd": bpd["bpd"], "stage_bpd": bpd["stages"],
                                **scores, "training": training, "grid": grid.name,
                                "minutes_with_scoring": (time.perf_counter() - start) / 60})
        print(f"  depth: {name}: {json.dumps(results['rows'][-1])}", flush=True)
    return results


def markdown(results: dict, command: str) -> str:
    r = results
    out = [f"# Depth upscaling at equal training minutes (RQ2)\n\n`{command}` on {r['machine']['cpu']} "
           f"({r['machine']['threads']} threads, torch {r['machine']['torch']}), {r['date']}: "
           f"`{r['experiment']}`, {r['minutes']:g} training minutes per cascade; FID and KID of "
           f"{r['n_samples']} samples against the {r['n_real']} test images in feature network `{r['features']}` "
           f"({r['feature_task']}, test accuracy {r['feature_test_accuracy']:.3f}), all shown at {r['bits']} bits.\n"]
    out.append(f"Bits/dim on the first {r['bpd_images']} test images.\n")
    out.append(table(["cascade", "stages", "test bits/dim (at its n)", "FID", "KID", "KID std", "samples"],
                     [[row["cascade"], ", ".join(f"{k} {v:.3f}" for k, v in row["stage_bpd"].items()), row["bpd"],
                       row["fid"], row["kid"], row["kid_std"], f"![]({row['grid']})"] for row in r["rows"]]))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.depth", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="emoji64")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--n", type=int, default=500, help="samples per cascade for FID/KID")
    parser.add_argument("--test-images", type=int, default=None, help="bits/dim on the first so many test images")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    results = run(args.exp, args.minutes, args.n, Path(args.out), args.test_images)
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    command = (f"python -m benchmarks.depth --exp {args.exp} --minutes {args.minutes:g} --n {args.n}"
               + (f" --test-images {args.test_images}" if args.test_images else ""))
    save_json(Path(args.out) / "depth.json", results)
    atomic_write(Path(args.out) / "depth.md", markdown(results, command).encode())
    print(f"wrote {Path(args.out) / 'depth.json'} and {Path(args.out) / 'depth.md'}")


if __name__ == "__main__":
    main()
