"""Runs of the commands that are not training (sample, upscale, deepen, evaluate) in W&B: each joins
the experiment's group as a run of its own job_type, in the project and mode training uses."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import wandb_mode, wandb_project


def log_job(experiment: dict, job: str, folder: str | Path, metrics: dict, images: dict | None = None) -> None:
    """Log `metrics` ({key: number}) and `images` ({key: path of a picture}) as one W&B run of
    job_type `job`, its files kept under `folder`. Nothing happens with WANDB_MODE=disabled."""
    mode = wandb_mode()
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=wandb_project(experiment), group=experiment["name"], job_type=job,
                     name=f"{experiment['name']}-{job}", dir=str(folder), mode=mode, reinit="finish_previous")
    run.log({**metrics, **{key: wandb.Image(str(path)) for key, path in (images or {}).items()}})
    run.summary.update(metrics)
    run.finish()
