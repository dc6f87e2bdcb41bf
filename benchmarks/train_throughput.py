"""Training throughput (images per second) of each stage of an experiment, side by side.

Runs the stages' real training step (Monte-Carlo estimator, AdamW) on real batches from
the experiment's DataModule, without Lightning's loop, so that the figures compare the
networks alone.

    python benchmarks/train_throughput.py [--exp fashion_mnist] [--steps 20]
"""
from __future__ import annotations

import argparse
import time

import torch

from data.datamodule import SubscaleDataModule
from pipeline.config import load_experiment, stage_names
from pipeline.train import GEOMETRY
from stages import STAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    experiment = load_experiment(args.exp)
    data = SubscaleDataModule(**{**experiment["data"], "num_workers": 0})
    data.prepare_data()
    batch = next(iter(data.train_dataloader()))
    geometry = {k: experiment["data"][k] for k in GEOMETRY}
    size = batch["image"].shape[0]
    print(f"{args.exp}: batch {size}, {torch.get_num_threads()} threads")
    for name in stage_names(experiment):
        torch.manual_seed(0)
        stage = STAGES[name](**geometry, **experiment["stages"][name].get("model", {}))
        optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
        times = []
        for _ in range(args.steps + 2):
            start = time.perf_counter()
            loss = stage.estimate(stage.sliced(batch), stage.random_slices(size)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        step = sorted(times[2:])[len(times[2:]) // 2]  # median
        params = sum(p.numel() for p in stage.parameters()) / 1e6
        print(f"  {name:<12} {params:5.2f}M parameters  {step * 1000:7.1f} ms/step  {size / step:7.0f} images/s")


if __name__ == "__main__":
    main()
