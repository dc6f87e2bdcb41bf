"""Quality at equal compute: test bits/dim after the same minutes of training on this machine, for
three models side by side in one run:

* the experiment's cascade, its minutes divided among its stages as its config divides them
  (each stage's configured steps times its measured seconds per step);
* a single full-image causal transformer: the experiment's own first-slice decoder at S = 1 and
  b = n (the Image-Transformer-like model the paper improves on);
* PixelCNN++ (`benchmarks.pixelcnnpp`: 32 filters, 1 gated resnet per stage, 10 logistics,
  Adam, batch 32), trained here in this process until its minutes are up.

Each model first gets the same small learning-rate sweep: its configured rate times 0.5, 1, 2 and 4,
each trained for a fifth of the minutes and scored on validation images; the best one trains for
the full minutes, at every point (MINUTES, and a second, longer point in the full bench); a run
given an earlier run's rates (`--lr-from`) skips the sweep and says whose rates it trained at. The
cascade's and the transformer's stages train through the real command (`python -m pipeline
train`) for exactly their minutes of the training loop (Lightning's `max_time`, which their
learning-rate schedule anneals by, however fast the machine runs that hour), validated once after
them, as PixelCNN++ trains for its minutes from its first step; they are scored by `python -m pipeline
evaluate` on the same test images; the first point's cascade also reports PNG, lossless WebP and
JPEG-XL on them, one image per file and as one mosaic (measured once: the same images).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.pixelcnnpp import PixelCNNpp
from benchmarks.throughput import measure_stages
from data.datamodule import SubscaleDataModule
from pipeline.config import load_experiment, stage_names


def pipeline(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    if done.returncode != 0:
        raise RuntimeError(f"python -m pipeline {' '.join(args)} failed: {done.stderr.strip()[-800:]}")


def transformer_experiment(config: dict) -> dict:
    """The same data at S = 1, b = n: the experiment's first-slice decoder over the whole image."""
    first = config["stages"]["first_slice"].get("model", {})
    model = {key: first[key] for key in ("width", "layers", "heads", "lr", "warmup_steps") if key in first}
    data = {**config["data"], "subscale": 1, "high_bits": config["data"]["bits"]}
    return {"data": data, "trainer": config.get("trainer", {}), "checkpoint_every": 10**9,
            "stages": {"first_slice": {"model": model}}}


def clock(seconds: float) -> str:
    """Lightning's max_time as DD:HH:MM:SS (at least a second)."""
    s = max(int(seconds), 1)
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


SWEEP = (0.5, 1.0, 2.0, 4.0)  # learning-rate factors every model is tried at
SPEED_STEPS = 20  # timed training steps that divide the minutes among stages and set their warm-up
PILOT = 0.2  # the share of the minutes each try of the sweep trains
CEILING = 2  # max_steps over the steps the measured speed fits: max_time, not max_steps, ends a stage
PIXELCNNPP = dict(filters=32, blocks=1, mixtures=10, lr=1e-3, batch=32)
MODELS = ("cascade", "single_transformer", "pixelcnnpp")


def train(experiment_file: Path, run_dir: Path, seconds_per_step: dict, budget: dict, name: str,
          overrides: tuple = ()) -> dict:
    """Train every stage of the experiment for its budget (seconds) of Lightning's training loop
    (`max_time`, which the stage's learning-rate schedule ends at); the steps its measured speed
    fits in the budget set the warm-up and, CEILING times over, `max_steps`. Returns, per stage, the
    steps trained and planned and the minutes with the process's start and the final validation."""
    report = {}
    for stage, seconds in budget.items():
        planned = max(int(seconds / seconds_per_step[stage]), 4)
        ceiling = CEILING * planned
        start = time.perf_counter()
        pipeline("train", "--exp", str(experiment_file), "--run-dir", str(run_dir), "--stage", stage,
                 f"--trainer.max_steps={ceiling}", f"--trainer.val_check_interval={ceiling}",
                 f"--trainer.max_time={clock(seconds)}", f"--model.warmup_steps={min(200, planned // 5)}", *overrides)
        trained = torch.load(run_dir / "checkpoints" / f"{stage}.ckpt", map_location="cpu", weights_only=True)
        report[stage] = {"steps": trained["global_step"], "planned_steps": planned,
                         "measured_step_s": seconds_per_step[stage],
                         "minutes_with_start_and_final_validation": (time.perf_counter() - start) / 60}
        print(f"  quality: {name} {stage}: {report[stage]}", flush=True)
    return report


def base_lr(spec: dict) -> float:
    """The learning rate the config gives the model's stages (the size SPN's, else the first slice's)."""
    stages = spec["stages"]
    return stages.get("size_spn", stages["first_slice"]).get("model", {}).get("lr", 3e-4)


def train_cascade(spec: dict, path: Path, run_dir: Path, minutes: float, lr: float, images: Path,
                  name: str, compress: bool) -> dict:
    """Train a cascade (or the single transformer) for `minutes` at learning rate `lr` (every stage),
    then score `images` (and, with `compress`, compress them and measure the ordinary codecs on them, which
    take minutes at their highest effort: once per bench): {"bpd", "stages", "training", "compressed_bpd",
    "codecs"}. The minutes are divided among the stages as their configured steps at
    their speed, measured right before, divide them; each stage then trains for its minutes (`train`),
    since a machine shared with other guests can change speed within the hour."""
    speeds = {row["stage"]: row["step_s"] for row in measure_stages(str(path), steps=SPEED_STEPS)}
    configured = {stage: spec["stages"][stage].get("trainer", {}).get("max_steps", 1000) * speeds[stage]
                  for stage in stage_names(spec)}
    budget = {stage: 60 * minutes * share / sum(configured.values()) for stage, share in configured.items()}
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    training = train(path, run_dir, speeds, budget, name, (f"--model.lr={lr}",))
    extra = [] if compress else ["--skip-compress", "--skip-codecs"]  # the same images: measured once
    pipeline("evaluate", "--exp", str(path), "--run-dir", str(run_dir), "--images", str(images), *extra)
    report = json.loads((run_dir / "eval.json").read_text())
    return {"bpd": report["bpd"], "stages": report["stages"], "slices": report["slices"], "training": training,
            "compressed_bpd": report.get("compressed_bpd"), "codecs": report["codecs"]}


def train_pixelcnnpp(config: dict, minutes: float, lr: float, images: Path, seed: int = 0) -> dict:
    """PixelCNN++ trained on the experiment's training images for `minutes` of this process at
    learning rate `lr` (Adam, constant), scored exactly on `images`: {"bpd", "steps", "parameters"}."""
    data_settings = {**config["data"], "batch_size": PIXELCNNPP["batch"], "num_workers": 0}
    data = SubscaleDataModule(**data_settings)
    data.prepare_data()
    torch.manual_seed(seed)
    model = PixelCNNpp(config["data"]["channels"], config["data"]["bits"], PIXELCNNPP["filters"],
                       PIXELCNNPP["blocks"], PIXELCNNPP["mixtures"])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    deadline, steps = time.perf_counter() + 60 * minutes, 0
    while time.perf_counter() < deadline:
        for batch in data.train_dataloader():
            loss = model.nll(batch["image"].long()).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() >= deadline:
                break
    model.eval()
    x = torch.from_numpy(np.load(images)["images"]).long() >> (8 - config["data"]["bits"])
    with torch.no_grad():
        nats = sum(float(model.nll(x[i:i + 250]).double().sum()) for i in range(0, len(x), 250))
    return {"bpd": float(nats / (x.numel() * np.log(2))), "steps": steps,
            "parameters": sum(p.numel() for p in model.parameters())}


def split_images(config: dict, split: str, count: int | None, path: Path) -> Path:
    """Write the first `count` images of a split, 8-bit values of the n-bit images, to `path`."""
    data = SubscaleDataModule(**{**config["data"], "eval_batch_size": 500})
    data.prepare_data()
    loader = data.test_dataloader() if split == "test" else data.loader("val", train=False, limit=count)
    images = np.concatenate([batch["image"].numpy() << (8 - config["data"]["bits"]) for batch in loader])[:count]
    np.savez(path, images=images)
    return path


def earlier_rates(path: Path, experiment: str) -> dict:
    """The learning rates an earlier quality run chose (its results.json), with its sweep and where it
    came from: {"lr", "sweep", "from": {"file", "command", "date", "machine", "val_images"}}.

    Raises ValueError (one line) when the file is missing, not JSON, holds no quality run of every
    model, one of another experiment, or a rate that is not a positive number."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    quality = results.get("quality") if isinstance(results, dict) else None
    if not isinstance(quality, dict) or not set(MODELS) <= set(quality.get("lr", {})) or "sweep" not in quality:
        raise ValueError(f"{path} holds no learning rates of {', '.join(MODELS)}: give the results.json of an "
                         f"earlier quality run (make bench, or python -m benchmarks.run --parts quality)")
    if quality.get("experiment") != experiment:
        raise ValueError(f"{path} is a run of {quality.get('experiment')!r}, not {experiment!r}")
    bad = [m for m in MODELS if isinstance(quality["lr"][m], bool) or not isinstance(quality["lr"][m], (int, float))
           or not quality["lr"][m] > 0]
    if bad:
        raise ValueError(f"{path}: the learning rate of {', '.join(bad)} is not a positive number")
    machine = results.get("machine")
    return {"lr": {m: float(quality["lr"][m]) for m in MODELS}, "sweep": quality["sweep"],
            "from": {"file": str(path), "command": results.get("command"), "date": results.get("date"),
                     "machine": machine.get("cpu") if isinstance(machine, dict) else None,
                     "val_images": quality.get("val_images")}}


def run(experiment: str = "fashion_mnist", minutes: float = 15.0, test_images: int | None = None,
        folder: Path = Path("bench/runs"), longer: float | None = None, val_images: int = 1000,
        rates: dict | None = None) -> dict:
    """The three models at `minutes` (and at `longer` minutes, when given), each at the best learning
    rate of the sweep, or at `rates` (`earlier_rates`) without one; the cascade of the first point
    stays in `folder/cascade` (the codec part measures it)."""
    config = load_experiment(experiment)
    folder.mkdir(parents=True, exist_ok=True)
    runs = {"cascade": ({**config, "checkpoint_every": 10**9, "val_quality": 0}, folder / "cascade.yaml"),
            "single_transformer": (transformer_experiment(config), folder / "single_transformer.yaml")}
    for name, (spec, path) in runs.items():
        path.write_text(yaml.safe_dump({**spec, "name": f"bench-{name}"}, sort_keys=False))
    test = split_images(config, "test", test_images, folder / "test_images.npz")
    val = split_images(config, "val", val_images, folder / "val_images.npz")
    lrs = {name: base_lr(spec) for name, (spec, _) in runs.items()} | {"pixelcnnpp": PIXELCNNPP["lr"]}

    def fit(name: str, minutes_: float, lr: float, images: Path, run_dir: Path, compress: bool = False) -> dict:
        if name == "pixelcnnpp":
            return train_pixelcnnpp(config, minutes_, lr, images)
        spec, path = runs[name]
        return train_cascade(spec, path, run_dir, minutes_, lr, images, name, compress)

    results = {"minutes": minutes, "experiment": experiment, "test_images": int(len(np.load(test)["images"])),
               "val_images": int(len(np.load(val)["images"])), "sweep": {}, "lr": {}, "points": []}
    pilot = max(minutes * PILOT, 0.1)
    if rates:  # an earlier run's sweep chose them
        results.update(sweep=rates["sweep"], lr=rates["lr"], lr_from=rates["from"])
    for name in MODELS if not rates else ():  # the same small sweep for every model, on validation images
        tried = {f"{factor:g}": fit(name, pilot, lrs[name] * factor, val, folder / f"sweep_{name}")["bpd"]
                 for factor in SWEEP}
        best = min(tried, key=tried.get)
        results["sweep"][name] = {"pilot_minutes": pilot, "base_lr": lrs[name], "val_bpd": tried}
        results["lr"][name] = lrs[name] * float(best)
        print(f"  quality: sweep {name}: {tried} -> lr {results['lr'][name]:g}", flush=True)
    for point in [minutes] + ([longer] if longer else []):
        row = {"minutes": point}
        for name in MODELS:
            run_dir = folder / name if point == minutes else folder / f"{name}_{point:g}"
            row[name] = fit(name, point, results["lr"][name], test, run_dir, name == "cascade" and point == minutes)
            print(f"  quality: {point:g} min {name}: {row[name]}", flush=True)
        row["cascade_lead"] = row["pixelcnnpp"]["bpd"] - row["cascade"]["bpd"]
        results["points"].append(row)
    first = results["points"][0]
    results["codecs"] = first["cascade"]["codecs"]
    results["cascade"], results["single_transformer"], results["pixelcnnpp"] = (first[m] for m in MODELS)
    results["cascade_bpd"], results["single_transformer_bpd"] = first["cascade"]["bpd"], first["single_transformer"]["bpd"]
    results["pixelcnnpp_bpd"] = first["pixelcnnpp"]["bpd"]
    return results
