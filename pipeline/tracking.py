"""Runs of the commands that are not training (sample, upscale, deepen, evaluate) in W&B: each joins
the experiment's group as a run of its own job_type, in the project and mode training uses."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import wandb_init_timeout, wandb_mode, wandb_project
from pipeline.interruption import held


def wandb_failure(error: BaseException) -> str:
    """Why W&B failed, in one short line (the first line of its error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def log_job(experiment: dict, job: str, folder: str | Path, metrics: dict, images: dict | None = None) -> None:
    """Log `metrics` ({key: number}) and `images` ({key: path of a picture}) as one W&B run of
    job_type `job`, its files kept under `folder`. Nothing happens with WANDB_MODE=disabled. The
    results are written before: when W&B cannot be reached (no login, no network, no server within
    `wandb_init_timeout()` seconds), this says so in one warning line on stderr and returns. Ctrl+C and
    SIGTERM wait for W&B to finish (`pipeline.interruption.held`); a second Ctrl+C stops it at once."""
    mode = wandb_mode()
    if mode == "disabled":
        return
    import wandb

    # a Ctrl+C that fell inside W&B or `logging` was swallowed there, and the process hung on a lock
    with held(f"logging the {job} run to W&B"):
        try:
            run = wandb.init(project=wandb_project(experiment), group=experiment["name"], job_type=job,
                             name=f"{experiment['name']}-{job}", dir=str(folder), mode=mode, reinit="finish_previous",
                             settings=wandb.Settings(init_timeout=wandb_init_timeout()))
            run.log({**metrics, **{key: wandb.Image(str(path)) for key, path in (images or {}).items()}})
            run.summary.update(metrics)
            run.finish()
        except Exception as error:  # noqa: BLE001 - W&B's errors are many; the results are safe whatever it is
            runs = Path(folder) / "wandb" / "offline-run-*"
            print(f"warning: could not log the {job} run to W&B ({wandb_failure(error)}); the results are saved: "
                  f"to log them, run it again with WANDB_MODE=offline, then `wandb sync {runs}`", file=sys.stderr)
