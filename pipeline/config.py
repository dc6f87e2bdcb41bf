"""Experiment configs: `conf/trainer.yaml` (shared defaults) + `conf/experiments/<name>.yaml`.

An experiment file has three parts:

    data:    arguments of SubscaleDataModule, shared by every stage (geometry: S, bits, b, ...)
    trainer: Trainer arguments for every stage (optional)
    stages:  {first_slice|size_spn|depth_spn: {model: <stage arguments>, trainer: <overrides>}}

and optional settings: name (the W&B group; the file's name by default), seed, checkpoint_every,
sample_grid, val_quality, wandb: {project: ...}. Any other key, in these sections or at the top, is refused in
one line (`load_experiment`), never ignored.

`lightning_config` composes them into the LightningCLI config of one stage, which
`pipeline.train` hands to LightningCLI and keeps, as parsed, in `$(RUN_DIR)/config/<stage>.yaml`.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import os
from pathlib import Path

import yaml

from stages.plan import ORDER, cascade_stages

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_EXPERIMENT = "fashion_mnist"
# what an experiment file (and conf/trainer.yaml) may hold: its sections and settings, and those of a stage
SECTIONS = ("data", "trainer", "stages", "name", "seed", "checkpoint_every", "sample_grid", "val_quality", "wandb")
STAGE_SECTIONS = ("model", "trainer")


class ConfigError(ValueError):
    """A user-facing configuration mistake: the message says what is wrong and what to do."""


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; values of `override` win."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiments").glob("*.yaml"))


def check_keys(section: dict, valid, where: str, path) -> None:
    """Raise ConfigError naming the first key of `section` that is not one of `valid`, where it is, the
    file and the valid keys (and the closest of them, when one is close)."""
    valid = list(valid)
    for key in section:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in {where}{hint}; the valid keys: {', '.join(valid)}")


def parameters(cls, leave_out=()) -> list[str]:
    """The names of the arguments of `cls` (its __init__), but self and `leave_out`."""
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", *leave_out)]


def check_sections(experiment: dict, path) -> None:
    """Raise ConfigError for a section the experiment may not have (at the top, in `stages:`, in a stage
    or in `wandb:`), or one that is not a mapping, so that a misspelled one is never ignored."""
    check_keys(experiment, SECTIONS, "the top level", path)
    for key in ("data", "stages"):
        if not isinstance(experiment.get(key), dict):
            raise ConfigError(f"experiment {path} has no '{key}' section; see conf/experiments/smoke.yaml")
    check_keys(experiment["stages"], ORDER, "stages", path)
    sections = {"trainer": experiment.get("trainer"), "wandb": experiment.get("wandb")}
    for stage, spec in experiment["stages"].items():
        sections[f"stages.{stage}"] = spec
        if isinstance(spec, dict):
            check_keys(spec, STAGE_SECTIONS, f"stages.{stage}", path)
            sections.update({f"stages.{stage}.{key}": spec.get(key) for key in STAGE_SECTIONS})
    for where, section in sections.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{path}: {where} must be a mapping of settings, not {section!r}; "
                              f"see conf/experiments/smoke.yaml")
    check_keys(experiment.get("wandb") or {}, ("project",), "wandb", path)
    quality = experiment.get("val_quality", 0)
    if type(quality) is not int or quality == 1 or quality < 0:
        raise ConfigError(f"{path}: val_quality must be a number of images, 2 or more (0: none), not {quality!r}")


def check_arguments(experiment: dict, path) -> None:
    """Raise ConfigError for a key of the data section that SubscaleDataModule does not take (or one it
    needs and does not find), a data source key its kind does not read, or a key of a stage's model
    section that the stage's class does not take (the geometry comes from data), or a trainer key that
    Lightning's Trainer does not take. (Imports the data module, the stages and Lightning.)"""
    from data.datamodule import SubscaleDataModule
    from data.sources import check_source
    from stages import GEOMETRY, STAGES

    check_keys(experiment["data"], parameters(SubscaleDataModule), "data", path)
    required = [name for name, parameter in inspect.signature(SubscaleDataModule.__init__).parameters.items()
                if parameter.default is inspect.Parameter.empty and name != "self"]
    for key in required:
        if key not in experiment["data"]:
            raise ConfigError(f"{path}: data has no {key!r}, which it needs (data needs {', '.join(required)}); "
                              f"see conf/experiments/smoke.yaml")
    try:
        check_source(experiment["data"]["source"])
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from error
    from lightning import Trainer

    check_keys(experiment.get("trainer") or {}, parameters(Trainer), "trainer", path)
    for stage, spec in experiment["stages"].items():
        if stage in STAGES:
            check_keys((spec or {}).get("model") or {}, parameters(STAGES[stage], GEOMETRY),
                       f"stages.{stage}.model (the geometry is data's)", path)
            check_keys((spec or {}).get("trainer") or {}, parameters(Trainer), f"stages.{stage}.trainer", path)


def load_experiment(name: str | None = None, arguments: bool = True) -> dict:
    """The experiment `name` (or a path to a YAML file) merged over conf/trainer.yaml. Raises ConfigError
    in one line for a file that is missing or not a valid experiment, and, with `arguments` (which
    imports the data module and the stages), for a data or model key that is not an argument; an unknown
    section (or setting at the top) is refused too, never ignored."""
    name = name or DEFAULT_EXPERIMENT
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "experiments" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no experiment {name!r}: {path} does not exist; "
                          f"use EXP=<one of {', '.join(experiment_names())}>")
    try:
        with open(path) as f:
            experiment = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(error).split())}); "
                          f"see conf/experiments/smoke.yaml") from error
    with open(CONF_DIR / "trainer.yaml") as f:
        defaults = yaml.safe_load(f)
    if not isinstance(experiment, dict):
        raise ConfigError(f"{path} is not a mapping of sections; see conf/experiments/smoke.yaml")
    experiment = merge(defaults, experiment)
    experiment.setdefault("name", path.stem)
    check_sections(experiment, path)
    if arguments:
        check_arguments(experiment, path)
    return experiment


def data_geometry(experiment: dict) -> dict:
    """The geometry the stages are trained with (image_size, channels, bits, high_bits, S): the data
    section's, with SubscaleDataModule's defaults for what it leaves out, as training sees it.
    (Imports the data module: not for `load_experiment`, which every `make` call runs at start-up.)"""
    from data.datamodule import SubscaleDataModule
    from stages import GEOMETRY

    parameters = inspect.signature(SubscaleDataModule.__init__).parameters
    data = experiment["data"]
    return {key: data[key] if key in data else parameters[key].default for key in GEOMETRY}


def stage_names(experiment: dict) -> list[str]:
    """The stages this experiment's cascade has (`stages.plan.cascade_stages`): no size SPN when S = 1,
    no depth SPN when b = n."""
    data = experiment["data"]
    return cascade_stages(data.get("subscale", 1), data.get("bits", 8), data.get("high_bits", 8))


def resolve_precision(precision) -> str:
    """'auto': bf16 mixed precision on GPUs that support it, full precision elsewhere."""
    if precision != "auto":
        return precision
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def wandb_project(experiment: dict) -> str:
    """$WANDB_PROJECT, else the experiment's `wandb: {project: ...}`, else subscale-pixel-networks."""
    return os.environ.get("WANDB_PROJECT") or experiment.get("wandb", {}).get("project", "subscale-pixel-networks")


def wandb_mode() -> str:
    """online when asked for or logged in; disabled when asked for; offline otherwise."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    if mode == "dryrun":
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def wandb_init_timeout() -> float:
    """Seconds W&B may take to start a run online before it counts as out of reach: $WANDB_INIT_TIMEOUT,
    else 30 (W&B's own default is 90)."""
    return float(os.environ.get("WANDB_INIT_TIMEOUT") or 30)


def lightning_config(experiment: dict, stage: str, run_dir: str | Path) -> dict:
    """The LightningCLI config (model, data, trainer) of one stage of the experiment."""
    if stage not in ORDER:
        raise ConfigError(f"unknown stage {stage!r}: use one of {', '.join(ORDER)}")
    if stage not in stage_names(experiment):
        raise ConfigError(f"experiment {experiment['name']!r} has no {stage} stage "
                          f"(its stages: {', '.join(stage_names(experiment))})")
    spec = experiment["stages"].get(stage) or {}
    trainer = merge(experiment.get("trainer", {}), spec.get("trainer", {}))
    trainer["precision"] = resolve_precision(trainer.get("precision", "auto"))
    trainer["default_root_dir"] = str(run_dir)
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {
            "project": wandb_project(experiment),
            "group": experiment["name"],
            "job_type": stage,
            "name": f"{experiment['name']}-{stage}",
            "save_dir": str(run_dir),
            "mode": wandb_mode(),
        },
    }
    return {
        "seed_everything": experiment.get("seed", 0),
        "model": spec.get("model", {}),
        "data": experiment["data"],
        "trainer": trainer,
    }
