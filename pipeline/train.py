"""Train one stage of the cascade: `python -m pipeline train --exp EXP --stage STAGE [LightningCLI overrides]`.

Writes `$(RUN_DIR)/checkpoints/<stage>.ckpt` only when the stage finishes (write, then
rename); while training, `checkpoints/<stage>/last.ckpt` is kept every
`checkpoint_every` steps and a later call resumes from it, in the same W&B run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from filelock import FileLock, Timeout
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from data.datamodule import SubscaleDataModule
from pipeline import Terminated
from pipeline.callbacks import PlainProgress, SampleGrid, ValidationQuality
from pipeline.checkpoints import AtomicCheckpointIO, load_stage, save_stage
from pipeline.config import ConfigError, lightning_config, load_experiment, wandb_init_timeout
from pipeline.inference.cascade import differences
from pipeline.io import atomic_write
from pipeline.interruption import CTRL_C, held
from pipeline.tracking import wandb_failure
from stages import GEOMETRY, STAGES, geometry
from stages.plan import cascade_stages

# the models report no FLOPs; images per second is what ThroughputMonitor is here for
warnings.filterwarnings("ignore", message=".*define a `flops_per_batch`.*")
# the CLI composes LightningCLI's arguments itself; Lightning's internal deprecations are not the user's
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning vs a newer torch
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage())  # an advertisement, not the run's news


def batch_size(batch: dict) -> int:
    return batch["image"].shape[0]


class LogConfigToLogger(SaveConfigCallback):
    """Log the full composed config (model, data, trainer) as the W&B run's config."""

    def save_config(self, trainer, pl_module, stage) -> None:
        if trainer.logger is not None:  # not the path of the file it was read from, which is gone by then
            config = self.config.as_dict()
            trainer.logger.log_hyperparams({key: value for key, value in config.items() if key != "config"})


class StageCLI(LightningCLI):
    """LightningCLI of one stage; the data section's geometry is linked into the model's."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in GEOMETRY:  # the data module owns the geometry; every stage inherits it
            parser.link_arguments(f"data.{key}", f"model.{key}")


class QuotedDumper(yaml.SafeDumper):
    """Every string quoted: nothing written into a config can be read back as another type
    (an unquoted W&B id such as 6e360127 reads back as the float inf)."""


QuotedDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text,
                                                                             style='"'))


def wandb_run_id(folder: Path) -> str:
    """One W&B run per stage, kept across resumptions (in the file `wandb_id`, never in a config).
    Ids start with a letter, so that no reader takes one for a number."""
    path = folder / "wandb_id"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(f"r{uuid.uuid4().hex[:10]}")
    return path.read_text().strip()


# settings that may change between a checkpoint and its resumption (they do not change what is learnt)
FREE_TO_CHANGE = {"_instantiator", "compile", "num_workers", "eval_batch_size", "cache_dir", "val_subset"}


def changed_settings(last: Path, model, data) -> list[str]:
    """'key: saved -> now' for each model or data setting in which `last` differs from this run."""
    saved = torch.load(last, map_location="cpu", weights_only=True)
    changes = []
    for what, now in (("hyper_parameters", model.hparams), ("datamodule_hyper_parameters", data.hparams)):
        before = saved.get(what, {})
        for key in sorted((set(before) | set(now)) - FREE_TO_CHANGE):
            change = f"{key}: {before.get(key)} -> {now.get(key)}"
            if before.get(key) != now.get(key) and change not in changes:  # image_size is in both sections
                changes.append(change)
    return changes


def set_aside_if_stale(last: Path, model, data, stage: str) -> bool:
    """A resumable checkpoint saved with other settings is renamed, and the stage starts afresh
    (in a new W&B run); returns whether that happened."""
    if not last.exists():
        return False
    try:
        changes = changed_settings(last, model, data)
    except Exception as error:  # unreadable: a file from elsewhere, or from a crash of an older version
        changes = [f"unreadable ({type(error).__name__})"]
    if changes:
        aside = last.with_name(f"last.ckpt.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(last, aside)
        (last.parent / "wandb_id").unlink(missing_ok=True)  # a new W&B run for the new settings
        print(f"{stage}: {last} was saved with other settings ({'; '.join(changes)}): set aside as {aside.name}; "
              f"training starts afresh")
    return bool(changes)


def start_wandb_run(logger) -> None:
    """Start the stage's online W&B run now, before any training: W&B out of reach (no login, no
    network) then stops the command at once with ConfigError, and no training is lost."""
    try:
        logger.experiment  # noqa: B018 - WandbLogger starts its run when first asked for it
    except Exception as error:  # noqa: BLE001 - W&B's errors are many; all mean the same here
        raise ConfigError(f"cannot start the W&B run online ({wandb_failure(error)}): log in with `wandb login` "
                          f"(or check WANDB_BASE_URL and the network), or train with WANDB_MODE=offline and "
                          f"upload the run later with `wandb sync`") from error


class StageBusy(ValueError):
    """Another process is training the same stage in the same run folder."""


@contextmanager
def alone(work: Path, stage: str, run_dir: Path):
    """Have the stage of `run_dir` to this process while the block runs (a lock file in `work`, which
    the system releases when the process dies, however it dies); raise StageBusy naming the process
    that has it. Only the first process of a run on several (global rank 0 of node 0) takes it; the
    block gets whether this process made `work` (False on the others)."""
    if rank_zero_only.rank != 0 or os.environ.get("NODE_RANK", "0") != "0":
        yield False
        return
    made = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(work / "training.lock"), work / "training.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = holder.read_text().strip() if holder.exists() else "?"
        raise StageBusy(f"{stage} is being trained in {run_dir} by another process (pid {pid}): wait for it "
                        f"to end, or stop it, and make the target again") from None
    try:
        holder.write_text(str(os.getpid()))
        yield made
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


# what a stage's checkpoint folder holds before it trains: the lock, its holder and the W&B run id
BOOKKEEPING = ("training.lock", "training.pid", "wandb_id")


def undo_start(work: Path, made: list[Path]) -> None:
    """Remove what a start refused before training wrote: the bookkeeping in `work`, which this process
    made and still holds the lock of, then `work` and the folders in `made` that are empty. Folders
    that hold anything else stay, and so does everything in them."""
    try:
        if {path.name for path in work.iterdir()} - set(BOOKKEEPING):
            return
        for name in BOOKKEEPING:
            (work / name).unlink(missing_ok=True)
        for folder in (work, *made):
            folder.rmdir()
    except OSError:  # a folder something else lives in now: it stays, and the error that stopped us is the news
        pass


def warm_start(model, source: Path) -> None:
    """Start a fresh stage from the trained decoder of the earlier stage its `init_from` names
    (`SubscaleStage.start_from`), read from that stage's final checkpoint `source`. Raises
    FileNotFoundError when the checkpoint is missing, ValueError when it is unreadable or its decoder
    does not fit this stage's."""
    name = model.hparams.init_from
    if not source.exists():
        raise FileNotFoundError(f"the {model.stage} starts from the trained {name} decoder (init_from: {name}), but "
                                f"{source} does not exist: train the {name} first (make train-all), or remove init_from")
    model.start_from(load_stage(name, source))
    print(f"{model.stage}: starts from the {name} decoder of {source}")


def check_run_geometry(model, run_dir: Path) -> None:
    """Raise ConfigError when a final checkpoint in `run_dir` of another stage of the cascade `model`
    belongs to was trained for another geometry (image size, channels, bits, high bits, S) than `model`
    is set up for: one run folder holds one cascade, so such a stage would be trained only for sampling
    and evaluation to refuse it (an EXP that is not the run's, or changed settings). Reads only the
    checkpoints' hyperparameters; ValueError in one line when one is unreadable."""
    hp = model.hparams
    for name in cascade_stages(hp.subscale, hp.bits, hp.high_bits):
        path = run_dir / "checkpoints" / f"{name}.ckpt"
        if name == model.stage or not path.exists():
            continue
        try:
            trained = geometry(torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"])
        except Exception as error:  # truncated, foreign or unsafe files all land here, as in load_stage
            raise ValueError(f"cannot read {path} as a checkpoint of the {name} ({type(error).__name__}); remove it "
                             f"and train the stage again") from error  # torch's own text would suggest unsafe loading
        ours, theirs = differences(geometry(hp), trained)
        if ours:
            raise ConfigError(f"the {model.stage} would be trained with {ours}, but {path} was trained with "
                              f"{theirs}: use the experiment this run was trained with (EXP=...) or another "
                              f"RUN_DIR, or retrain the whole cascade with the new settings (make clean train-all)")


@contextmanager
def startup_lines_kept():
    """Keep Lightning's lines of a stage's start ('Seed set to 0', 'GPU available: ...') until the block
    ends, and show them only if it ends without an error: a start refused shows its one line alone."""
    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record)

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]  # Lightning's own
    before = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:  # nor passed up: with logging set up before Lightning, its loggers have no handler
        logger.handlers, logger.propagate = [Keep()], False
    try:
        yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, before):
            logger.handlers, logger.propagate = handlers, propagate
    for record in kept:
        logging.getLogger(record.name).handle(record)


def train_stage(exp: str | None, stage: str, run_dir: str | Path, overrides: list[str] = ()) -> Path:
    """Train (or resume) one stage of experiment `exp` in `run_dir`; return the final checkpoint path.
    `overrides` are LightningCLI arguments. Raises ConfigError (a ValueError) for bad settings,
    StageBusy (a ValueError) when another process trains the stage in `run_dir`, TrainingDiverged
    when the loss or the weights stop being finite, KeyboardInterrupt on Ctrl+C. A fresh stage refused
    before it trains (a bad setting, a missing checkpoint to start from) leaves the run folder as it
    found it. `$(RUN_DIR)/config/<stage>.yaml` is written when training starts: the stage's config as
    LightningCLI parsed it, overrides included."""
    experiment = load_experiment(exp)
    run_dir = Path(run_dir)
    config = lightning_config(experiment, stage, run_dir)
    work = run_dir / "checkpoints" / stage  # resumable state of an unfinished stage
    made = [folder for folder in (work.parent, run_dir) if not folder.exists()]
    with alone(work, stage, run_dir) as fresh:
        try:
            with startup_lines_kept():
                cli = prepare_stage(exp, experiment, stage, run_dir, config, overrides)
        except (ValueError, OSError, SystemExit):  # SystemExit: LightningCLI's --print_config, done
            if fresh:
                undo_start(work, made)
            raise
        return fit_stage(cli, stage, run_dir)


def prepare_stage(exp: str | None, experiment: dict, stage: str, run_dir: Path, config: dict, overrides):
    """Everything of `train_stage` before training, once this process has the stage to itself: the
    LightningCLI of the stage (`config` is its config before the overrides), its callbacks, a stale
    checkpoint set aside, the warm start, the online W&B run. Writes nothing but the stage's W&B id.
    Raises ConfigError right after the CLI is built, before the rest, when the run's other stages were
    trained for another geometry (`check_run_geometry`)."""
    work = run_dir / "checkpoints" / stage
    last = work / "last.ckpt"

    def build():
        config["trainer"]["logger"]["init_args"].update(id=wandb_run_id(work), resume="allow")
        composed = work / f"composed.{os.getpid()}.yaml"  # the config before the overrides, while it is parsed
        composed.write_text(yaml.dump(config, Dumper=QuotedDumper, sort_keys=False))
        try:
            return StageCLI(
                STAGES[stage], SubscaleDataModule, run=False,
                args=["--config", str(composed), *overrides],
                save_config_callback=LogConfigToLogger, save_config_kwargs={"save_to_log_dir": False},
                trainer_defaults={"callbacks": callbacks},
                parser_kwargs={"exit_on_error": False, "allow_abbrev": False},  # a misspelt flag is an error, not a guess
            )
        except argparse.ArgumentError as error:  # a bad override in ARGS: one line, not a page of usage
            raise ConfigError(f"{' '.join(str(error).split())}; see python -m pipeline train --exp {exp or ''} "
                              f"--stage {stage} --print_config, which lists every setting") from error
        except MisconfigurationException as error:  # e.g. --trainer.devices=4 on a machine with fewer
            raise ConfigError(f"{' '.join(str(error).split())} (check ARGS and the trainer section of "
                              f"the experiment)") from error
        finally:
            composed.unlink(missing_ok=True)

    checkpoint = ModelCheckpoint(dirpath=work, save_last=True, save_top_k=0,
                                 every_n_train_steps=experiment.get("checkpoint_every", 200))
    callbacks = [checkpoint, LearningRateMonitor("step"), ThroughputMonitor(batch_size_fn=batch_size, window_size=10),
                 SampleGrid(experiment.get("sample_grid", 8))]
    if not sys.stdout.isatty():  # a log file: a plain line now and then instead of a redrawn bar
        callbacks.append(PlainProgress())
        overrides = ["--trainer.enable_progress_bar=false", *overrides]
    cli = build()
    check_run_geometry(cli.model, run_dir)
    if set_aside_if_stale(last, cli.model, cli.datamodule, stage):
        cli = build()  # with a new W&B run id
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if experiment.get("val_quality", 0):  # FID/KID of this many validation images at each validation
        from pipeline.inference.quality import run_features

        settings = {key: value for key, value in data.hparams.items() if not key.startswith("_")}  # ARGS overrides too
        net = run_features(run_dir, {"data": settings}, data.hparams.bits)[0]
        trainer.callbacks.append(ValidationQuality(net, experiment["val_quality"]))
    if last.exists():
        print(f"resuming {stage} from {last}")
    elif model.hparams.init_from:  # before the online W&B run: a missing checkpoint starts no empty run
        warm_start(model, run_dir / "checkpoints" / f"{model.hparams.init_from}.ckpt")
    if config["trainer"]["logger"]["init_args"]["mode"] == "online":
        os.environ["WANDB_INIT_TIMEOUT"] = str(wandb_init_timeout())  # WandbLogger's wandb.init reads it
        start_wandb_run(trainer.logger)
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if config["trainer"]["logger"]["init_args"]["mode"] == "offline":  # said once the stage is sure to train
        print(f"W&B is offline: runs are kept in {run_dir / 'wandb'}; upload them later with "
              f"`wandb sync {run_dir / 'wandb'}/offline-run-*` (or `wandb login` first to log online)")
    return cli


def interruption(stage: str, step: int, last: Path) -> str:
    """What a Ctrl+C at training step `step` leaves: the step that the stage's resumable checkpoint
    `last` holds, which making the target again resumes from, or, before the first one (every
    `checkpoint_every` steps), that the stage starts over."""
    if not last.exists():
        return (f"{stage} stopped at step {step}, before its first checkpoint (every checkpoint_every steps "
                f"of the experiment): making the same target again starts it over")
    saved = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    return f"{stage} stopped at step {step}; make the same target again to resume from step {saved} ({last})"


def fit_stage(cli, stage: str, run_dir: Path) -> Path:
    """Train the stage `prepare_stage` made ready, resuming from its last.ckpt if there is one, and
    write its final checkpoint."""
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    last = run_dir / "checkpoints" / stage / "last.ckpt"
    final = run_dir / "checkpoints" / f"{stage}.ckpt"
    if trainer.is_global_zero:
        atomic_write(run_dir / "config" / f"{stage}.yaml", cli.parser.dump(cli.config, skip_none=False).encode())
    trained = False
    try:
        try:
            trainer.fit(model, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
        except SystemExit:  # Lightning's answer to Ctrl+C, after its graceful shutdown
            if not trainer.interrupted:
                raise
        except Exception as error:  # a Ctrl+C that C code (pyarrow, reading the data) turned into its own error
            if not CTRL_C:
                raise
            raise KeyboardInterrupt(interruption(stage, trainer.global_step, last)) from error
        if trainer.interrupted:
            raise KeyboardInterrupt(interruption(stage, trainer.global_step, last))
        interval = trainer.val_check_interval  # in steps (an int) when validation does not follow epochs
        if isinstance(interval, int) and interval > 0 and trainer.global_step % interval:
            trainer.validate(model, datamodule=data, verbose=False)  # val/bpd at the final weights
        if trainer.is_global_zero:
            save_stage(model, final, trainer.global_step)  # weights and hyperparameters only, written atomically
        trained = True
    finally:
        import wandb

        try:
            with held(f"closing the {stage}'s W&B run"):  # a Ctrl+C inside W&B was swallowed there, then hung
                wandb.finish()  # also after an error: a later stage in this process must not log into this run
        except (KeyboardInterrupt, Terminated) as stop:  # held until W&B was done: after the stage was written?
            if str(stop) or not trained:
                raise
            if isinstance(stop, Terminated):
                raise Terminated(f"terminated (SIGTERM) after {stage} had written {final} (complete): make the "
                                 f"same target again to go on") from None
            raise KeyboardInterrupt(f"{stage} stopped by Ctrl+C after it had written {final} (complete): make the "
                                    f"same target again to go on") from None
    if trainer.is_global_zero:
        print(f"{stage}: wrote {final}")
    return final


def main(args) -> None:
    train_stage(args.exp, args.stage, args.run_dir, args.overrides)
