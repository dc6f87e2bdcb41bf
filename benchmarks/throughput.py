"""Training throughput of each stage and the fraction of this machine's matrix-multiply peak
that its training step reaches.

Each stage's real training step (Monte-Carlo estimator, AdamW) on a real batch of the
experiment's DataModule, without Lightning's loop. The step's floating-point operations are
counted by `torch.utils.flop_counter.FlopCounterMode` (forward and backward; matrix products
and attention, which is nearly all of it); the peak is a large float32 `torch.matmul`
measured in the same run.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from data.datamodule import SubscaleDataModule
from pipeline.config import data_geometry, load_experiment, stage_names
from stages import STAGES


def matmul_peak(size: int = 2048, repeat: int = 8, device: str = "cpu", dtype=torch.float32) -> float:
    """FLOP/s of a large square matrix product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeat / (time.perf_counter() - start)


def training_step(stage, optimizer, batch: dict) -> None:
    known = stage.sliced(batch)
    loss = stage.estimate(known, stage.random_slices(batch["image"].shape[0])).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def step_flops(stage, batch: dict) -> int:
    """Floating-point operations of one training step (forward and backward)."""
    optimizer = torch.optim.SGD(stage.parameters(), lr=0.0)
    with FlopCounterMode(display=False) as counter:
        training_step(stage, optimizer, batch)
    return counter.get_total_flops()


def measure_stages(experiment: str, steps: int, batch_size: int | None = None, shrink: bool = False) -> list[dict]:
    config = load_experiment(experiment)
    data_settings = {**config["data"], "num_workers": 0, **({"batch_size": batch_size} if batch_size else {})}
    data = SubscaleDataModule(**data_settings)
    data.prepare_data()
    batch = next(iter(data.train_dataloader()))
    geometry = data_geometry(config)
    size = batch["image"].shape[0]
    rows = []
    for name in stage_names(config):
        torch.manual_seed(0)
        model = dict(config["stages"][name].get("model", {}))
        if shrink:
            model.update(width=16, layers=1, heads=2, context_width=16, context_layers=1)
        stage = STAGES[name](**geometry, **model)
        optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            training_step(stage, optimizer, batch)
            times.append(time.perf_counter() - start)
        step = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up steps
        flops = step_flops(stage, batch)
        rows.append({"stage": name, "parameters": sum(p.numel() for p in stage.parameters()), "batch": size,
                     "step_s": step, "images_per_s": size / step, "flops_per_step": flops,
                     "flops_per_s": flops / step})
    return rows


def run(experiment: str = "fashion_mnist", quick: bool = False, smoke: bool = False) -> dict:
    peak = matmul_peak(512 if smoke else 2048, 2 if smoke else 8)
    rows = measure_stages(experiment, 2 if smoke else 10 if quick else 30, batch_size=8 if smoke else None,
                          shrink=smoke)
    for row in rows:
        row["utilisation"] = row["flops_per_s"] / peak
    return {"experiment": experiment, "matmul_peak_flops": peak, "threads": torch.get_num_threads(), "stages": rows}
