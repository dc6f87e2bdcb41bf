"""Quality at equal compute: test bits/dim after the same minutes of training on this machine.

* the experiment's cascade, its minutes divided among its stages as its config divides them
  (each stage's configured steps times its measured seconds per step);
* a single full-image causal transformer of the size SPN's width, depth and heads: the
  project's own first-slice decoder at S = 1 and b = n (the Image-Transformer-like model the
  paper improves on).

Each stage trains through the real command (`python -m pipeline train`) for as many steps
as fit in its minutes at its measured speed (so that its learning-rate schedule completes),
with Lightning's `max_time` as the hard limit and validation only at the end. Both are
then scored by `python -m pipeline evaluate` on the same test images, which also reports
PNG, lossless WebP and JPEG-XL, one image per file and as one mosaic.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.throughput import measure_stages
from data.datamodule import SubscaleDataModule
from pipeline.config import load_experiment, stage_names


def pipeline(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    if done.returncode != 0:
        raise RuntimeError(f"python -m pipeline {' '.join(args)} failed: {done.stderr.strip()[-800:]}")


def transformer_experiment(config: dict) -> dict:
    """The same data at S = 1, b = n: one first-slice decoder over the whole image."""
    size_spn = config["stages"].get("size_spn", config["stages"]["first_slice"]).get("model", {})
    model = {key: size_spn[key] for key in ("width", "layers", "heads", "lr", "warmup_steps") if key in size_spn}
    data = {**config["data"], "subscale": 1, "high_bits": config["data"]["bits"]}
    return {"data": data, "trainer": config.get("trainer", {}), "checkpoint_every": 10**9,
            "stages": {"first_slice": {"model": model}}}


def clock(seconds: float) -> str:
    """Lightning's max_time as DD:HH:MM:SS."""
    s = int(seconds)
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(experiment_file: Path, run_dir: Path, seconds_per_step: dict, budget: dict, name: str) -> dict:
    """Train every stage of the experiment for its budget (seconds); return steps and minutes."""
    report = {}
    for stage, seconds in budget.items():
        steps = max(int(seconds / seconds_per_step[stage]), 4)
        start = time.perf_counter()
        warmup = min(200, steps // 5)
        pipeline("train", "--exp", str(experiment_file), "--run-dir", str(run_dir), "--stage", stage,
                 f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
                 f"--trainer.max_time={clock(seconds * 1.15 + 5)}", f"--model.warmup_steps={warmup}")
        report[stage] = {"steps": steps, "minutes_with_start_and_final_validation": (time.perf_counter() - start) / 60}
        print(f"  quality: {name} {stage}: {steps} steps, {report[stage]}", flush=True)
    return report


def run(experiment: str = "fashion_mnist", minutes: float = 15.0, test_images: int | None = None,
        folder: Path = Path("bench/runs")) -> dict:
    config = load_experiment(experiment)
    folder.mkdir(parents=True, exist_ok=True)
    runs = {"cascade": ({**config, "checkpoint_every": 10**9}, folder / "cascade.yaml"),
            "single_transformer": (transformer_experiment(config), folder / "single_transformer.yaml")}
    for name, (spec, path) in runs.items():
        path.write_text(yaml.safe_dump({**spec, "name": f"bench-{name}"}, sort_keys=False))

    # the test images both are scored on
    data = SubscaleDataModule(**{**config["data"], "eval_batch_size": 500})
    data.prepare_data()
    images = np.concatenate([batch["image"].numpy() << (8 - config["data"]["bits"])
                             for batch in data.test_dataloader()])[:test_images]
    np.savez(folder / "test_images.npz", images=images)

    results = {"minutes": minutes, "experiment": experiment, "test_images": len(images)}
    for name, (spec, path) in runs.items():
        speeds = {row["stage"]: row["step_s"] for row in measure_stages(str(path), steps=6)}
        configured = {stage: spec["stages"][stage].get("trainer", {}).get("max_steps", 1000) * speeds[stage]
                      for stage in stage_names(spec)}
        budget = {stage: 60 * minutes * share / sum(configured.values()) for stage, share in configured.items()}
        run_dir = folder / name
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        training = train(path, run_dir, speeds, budget, name)
        extra = [] if name == "cascade" else ["--skip-compress"]
        pipeline("evaluate", "--exp", str(path), "--run-dir", str(run_dir), "--images", str(folder / "test_images.npz"),
                 *extra)
        report = json.loads((run_dir / "eval.json").read_text())
        results[name] = {"bpd": report["bpd"], "stages": report["stages"],
                         "training": training, "compressed_bpd": report.get("compressed_bpd")}
        results["codecs"] = report["codecs"]
        print(f"  quality: {name}: {results[name]}", flush=True)
    results["cascade_bpd"] = results["cascade"]["bpd"]
    results["single_transformer_bpd"] = results["single_transformer"]["bpd"]
    return results
