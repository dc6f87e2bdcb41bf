"""The command line and the Makefile as a user meets them: one-line errors, the plan of each
target, W&B runs of the non-training commands, plain logs, the README's own code and tables."""
import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_stages, save_cascade
from pipeline.__main__ import main as cli
from test_evaluate import experiment_file, images_file
from wandb_records import finished_runs, history, run_info

ROOT = Path(__file__).resolve().parents[1]
SMOKE = dict(image_size=8, channels=1, bits=4, high_bits=2, subscale=2)


def make(*args):
    return subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", *args], capture_output=True, text=True)


def one_line_error(stderr: str) -> str:
    """The one error line (Lightning may say 'Seed set to 0' before it); never a traceback."""
    lines = [line for line in stderr.strip().splitlines() if line != "Seed set to 0"]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_make_refuses_an_experiment_that_does_not_exist():
    planned = make("-n", "train-all", "EXP=nope")
    assert planned.returncode != 0 and "pipeline train" not in planned.stdout
    assert "no experiment 'nope'" in one_line_error(planned.stderr) and "EXP=" in planned.stderr


def test_an_experiment_given_as_a_path_runs_in_a_folder_named_after_it(tmp_path):
    config = tmp_path / "my_experiment.yaml"
    config.write_text((ROOT / "conf" / "experiments" / "smoke.yaml").read_text())
    planned = make("-n", "train-first", f"EXP={config}")
    assert planned.returncode == 0, planned.stderr
    assert "--run-dir runs/my_experiment " in planned.stdout


def test_deepen_without_a_depth_stage_trains_nothing_and_says_so(tmp_path):
    """b = n (the default): make deepen does not train the cascade first only to refuse; the command
    refuses before it looks for checkpoints."""
    planned = make("-n", "deepen", "EXP=fashion_mnist", f"RUN_DIR={tmp_path}", "INPUT=x.png")
    assert "pipeline deepen" in planned.stdout and "pipeline train" not in planned.stdout
    assert "pipeline train" in make("-n", "deepen", "EXP=smoke", f"RUN_DIR={tmp_path}", "INPUT=x.png").stdout
    done = subprocess.run([sys.executable, "-m", "pipeline", "deepen", "--exp", "fashion_mnist", "--run-dir",
                           str(tmp_path / "run"), "--input", "x.png"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert one_line_error(done.stderr) == "error: experiment 'fashion_mnist' has no depth stage (b = n): nothing to deepen"


def test_upscale_without_a_size_spn_trains_nothing_and_says_so(tmp_path):
    """S = 1: make upscale does not train the cascade first only to refuse."""
    config = tmp_path / "whole.yaml"
    config.write_text((ROOT / "conf" / "experiments" / "smoke.yaml").read_text().replace("subscale: 2", "subscale: 1"))
    planned = make("-n", "upscale", f"EXP={config}", f"RUN_DIR={tmp_path}", "INPUT=x.png")
    assert "pipeline upscale" in planned.stdout and "pipeline train" not in planned.stdout
    done = subprocess.run([sys.executable, "-m", "pipeline", "upscale", "--exp", str(config), "--run-dir",
                           str(tmp_path / "run"), "--input", "x.png"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert one_line_error(done.stderr) == "error: experiment 'whole' has S = 1: there is nothing to upscale"


@pytest.mark.parametrize("target", ["upscale", "deepen", "sample"])
def test_sampling_targets_pass_batch_on(target, tmp_path):
    planned = make("-n", target, "EXP=smoke", f"RUN_DIR={tmp_path}", "INPUT=x.png", "BATCH=3")
    assert f"pipeline {target} " in planned.stdout and "--batch 3" in planned.stdout


@pytest.mark.parametrize("arguments, message", [
    (["sample", "--batch", "0"], "--batch: 0 is not a positive number"),
    (["evaluate", "--batch", "0"], "--batch: 0 is not a positive number"),
    (["sample", "--n", "-2"], "--n: -2 is not a positive number"),
    (["sample", "--n", "abc"], "--n: 'abc' is not a whole number"),
    (["sample", "--temperature", "nan"], "TEMPERATURE=nan is invalid"),
    (["sample", "--temperature", "inf"], "TEMPERATURE=inf is invalid"),
    (["upscale", "--temperature", "0", "--input", "x.png"], "TEMPERATURE=0.0 is invalid"),
    (["deepen", "--temperature", "nan", "--input", "x.png"], "TEMPERATURE=nan is invalid"),
    (["sample", "--exp", "nope"], "no experiment 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--exp", "smoke", "--stage", "first_slice", "--model.lr=abc"], 'Parser key "model.lr"'),
    (["train", "--exp", "smoke", "--stage", "first_slice", "--model.nope=1"], "unrecognized arguments"),
    # a misspelt flag that begins another's name is refused, not read as that one
    (["train", "--exp", "smoke", "--stage", "first_slice", "--trainer.max_step=3"],
     "unrecognized arguments: --trainer.max_step=3"),
    (["train", "--exp", "smoke", "--stage", "first_slice", "--data.batch_size=0"], "batch_size=0"),
    (["train", "--exp", "smoke", "--stage", "first_slice", "--trainer.accelerator=cuda"], "accelerator"),
    (["sample", "--exp", "tests/broken.yaml"], "is not valid YAML"),
])
def test_bad_arguments_are_one_line_and_exit_2(arguments, message, tmp_path):
    (tmp_path / "broken.yaml").write_text("data: {image_size: 8\nstages: [")
    arguments = [str(tmp_path / "broken.yaml") if a == "tests/broken.yaml" else a for a in arguments]
    done = subprocess.run([sys.executable, "-m", "pipeline", *arguments, "--run-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert message in one_line_error(done.stderr)
    assert [path.name for path in tmp_path.iterdir()] == ["broken.yaml"]  # the run folder is left as it was
    assert "W&B is offline" not in done.stdout  # no news of a run that will not be


def test_a_bad_override_points_to_print_config_which_lists_every_setting_and_writes_nothing(tmp_path):
    train = [sys.executable, "-m", "pipeline", "train", "--exp", "smoke", "--run-dir", str(tmp_path / "run"),
             "--stage", "first_slice"]
    typo = subprocess.run([*train, "--trainer.max_step=3"], cwd=ROOT, capture_output=True, text=True)
    assert one_line_error(typo.stderr).endswith("--stage first_slice --print_config, which lists every setting")
    listed = subprocess.run([*train, "--print_config"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and "max_steps:" in listed.stdout and "width:" in listed.stdout
    assert not (tmp_path / "run").exists()  # no lock, W&B id or folder left by a command that trained nothing


def test_project_code_checks_with_exceptions_not_asserts():
    """`assert` vanishes under python -O and shows users a traceback: project code raises instead."""
    for path in [*ROOT.glob("data/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("pipeline/*.py")]:
        asserts = [node.lineno for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
        assert not asserts, f"{path.name}: assert on lines {asserts}"


def wandb_run(folder: Path, job: str = "sample"):
    """The one offline run file of `job` in folder/wandb, once W&B's service has finished writing it."""
    paths = finished_runs(folder)
    infos = [run_info(path) for path in paths]
    files = [path for path, info in zip(paths, infos) if info.job_type == job]
    assert len(files) == 1, files
    return files[0]


def test_sample_and_evaluate_join_the_experiment_in_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    exp = experiment_file(tmp_path, SMOKE, name="tiny")
    assert cli(["sample", "--exp", str(exp), "--run-dir", str(run_dir), "--n", "2"]) == 0
    sample_run = run_info(wandb_run(run_dir))
    assert (sample_run.project, sample_run.run_group, sample_run.job_type) == ("my-project", "tiny", "sample")
    assert cli(["evaluate", "--exp", str(exp), "--run-dir", str(run_dir),
                "--images", str(images_file(tmp_path, SMOKE))]) == 0
    path = wandb_run(run_dir, "evaluate")
    evaluate_run = run_info(path)
    assert (evaluate_run.project, evaluate_run.run_group, evaluate_run.job_type) == ("my-project", "tiny", "evaluate")
    logged = {key for row in history(path) for key in row}
    assert {"images/bpd", "images/bpd_first_slice", "images/bpd_size_spn", "images/bpd_depth_spn"} <= logged


def test_training_log_is_a_few_plain_lines_when_not_a_terminal(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--exp", "smoke", "--run-dir", str(tmp_path),
                           "--stage", "first_slice", "--trainer.max_steps=40", "--trainer.val_check_interval=20"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "\r" not in log  # no redrawn progress bar
    progress = [line for line in log.splitlines() if line.startswith("first_slice step ")]
    assert 20 <= len(progress) <= 24  # every 2nd of 40 steps, and a validation line twice
    assert any("val/bpd" in line for line in progress) and any("train/bpd" in line for line in progress)
    assert len(log.splitlines()) < 120, log


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    from test_data import HAVE_FASHION_MNIST

    if not HAVE_FASHION_MNIST:
        pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)")
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert snippets
    monkeypatch.chdir(tmp_path)  # its data cache goes here
    for code in snippets:
        lines = code.splitlines()
        namespace = {}
        exec("\n".join(lines), namespace)  # noqa: S102 - the README's own example
        last = lines[-1].split("#")[0].strip()
        shown = re.search(r"#\s*(torch.Size\(.*?\))", lines[-1])
        if shown:  # the value the README says the last line shows
            assert str(eval(last, namespace)) == shown.group(1)  # noqa: S307


def test_readme_experiment_table_agrees_with_the_configs():
    rows = re.findall(r"^\| `(\w+)`[^|]*\|[^|]*\| (\d+), (\d+), (\d+) \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 5
    for name, s, n, b in rows:
        data = yaml.safe_load((ROOT / "conf" / "experiments" / f"{name}.yaml").read_text())["data"]
        assert (data["subscale"], data["bits"], data["high_bits"]) == (int(s), int(n), int(b)), name


def test_sampling_in_batches_names_each_batch_on_its_progress_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    exp = str(experiment_file(tmp_path, SMOKE))
    assert cli(["sample", "--exp", exp, "--run-dir", str(run_dir), "--n", "3", "--batch", "2"]) == 0
    bars = [line.split(":")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("sampling")]
    assert bars == ["sampling images 1-2 of 3", "sampling image 3 of 3"]  # not two bars that both look final


def test_interrupted_sampling_leaves_the_previous_outputs_whole(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    exp = str(experiment_file(tmp_path, SMOKE))
    assert cli(["sample", "--exp", exp, "--run-dir", str(run_dir), "--n", "2"]) == 0
    before = {p.name: p.read_bytes() for p in (run_dir / "samples").iterdir()}
    import pipeline.inference.sample

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.inference.sample, "save_gif", interrupted)  # Ctrl+C while the outputs are written
    assert cli(["sample", "--exp", exp, "--run-dir", str(run_dir), "--n", "3", "--seed", "1"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted: sample stopped by Ctrl+C; what it wrote before is as it was")
    assert {p.name: p.read_bytes() for p in (run_dir / "samples").iterdir()} == before
    left = sorted(p.name for p in run_dir.iterdir() if p.name != ".samples.lock")  # the writers' lock stays
    assert left == ["checkpoints", "samples", "wandb"] or left == ["checkpoints", "samples"]


def test_a_data_section_may_leave_the_geometry_to_the_data_modules_defaults(tmp_path):
    """Training takes SubscaleDataModule's defaults; sampling and evaluation must see the same ones."""
    from pipeline.config import data_geometry, load_experiment

    (tmp_path / "short.yaml").write_text(yaml.safe_dump(
        {"data": {"source": {"kind": "fashion_mnist"}, "image_size": 28}, "stages": {"first_slice": {}}}))
    data = data_geometry(load_experiment(str(tmp_path / "short.yaml")))
    assert {k: data[k] for k in ("channels", "bits", "high_bits", "subscale")} == dict(
        channels=1, bits=8, high_bits=8, subscale=1)


@pytest.mark.parametrize("command", ["sample", "upscale"])
def test_n_and_batch_far_beyond_memory_are_refused_before_sampling(tmp_path, monkeypatch, capsys, command):
    import pipeline.inference.sample
    from PIL import Image

    monkeypatch.setattr(pipeline.inference.sample, "available_memory", lambda: 8 * 2**30)  # 8 GiB here, whatever the machine
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    Image.new("L", (4, 4), 100).save(tmp_path / "low.png")
    given = ["--input", str(tmp_path / "low.png")] if command == "upscale" else []
    code = cli([command, "--exp", str(experiment_file(tmp_path, SMOKE)), "--run-dir", str(run_dir), *given,
                "--n", "100000000", "--batch", "100000000"])
    err = one_line_error(capsys.readouterr().err)
    assert code == 2 and err.startswith("error: N=100000000 images of 8 x 8 x 1 drawn BATCH=100000000 at a time")
    assert "GiB of memory, and 8.0 GiB are available: lower N" in err
    assert not (run_dir / command).exists() and not (run_dir / "samples").exists()


CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 627200000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("command, failing, error, message", [
    ("sample", "pipeline.inference.sample.Cascade.sample", RuntimeError(CPU_ALLOCATOR),
     "error: out of memory (584.1 GiB asked for): lower BATCH (and N)"),
    ("evaluate", "pipeline.inference.cascade.Cascade.slice_log_prob", "cuda",
     "error: out of memory (20.00 GiB asked for): lower BATCH (make evaluate BATCH=..., 250 by default)"),
    ("compress", "pipeline.codec.compress.compress", MemoryError("Unable to allocate 728. TiB for an array"),
     "error: out of memory (728. TiB asked for): compress the images in parts"),
])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, monkeypatch, capsys, command, failing,
                                                                error, message):
    import torch

    if error == "cuda":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                       "capacity of 79.19 GiB of which 3.12 GiB is free.")

    def allocation_fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(failing, allocation_fails)
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    images = str(images_file(tmp_path, SMOKE))
    given = {"sample": [], "evaluate": ["--images", images],
             "compress": ["--input", images, "--out", str(tmp_path / "x.spn")]}
    code = cli([command, "--exp", str(experiment_file(tmp_path, SMOKE)), "--run-dir", str(run_dir), *given[command]])
    assert code == 1 and one_line_error(capsys.readouterr().err).startswith(message)


def test_make_evaluate_passes_batch_on_when_given(tmp_path):
    assert "--batch 50" in make("-n", "evaluate", "EXP=smoke", f"RUN_DIR={tmp_path}", "BATCH=50").stdout
    assert "--batch" not in make("-n", "evaluate", "EXP=smoke", f"RUN_DIR={tmp_path}").stdout  # its own 250


@pytest.mark.parametrize("command, edit, message", [
    (["data"], lambda c: c["data"].update(batch_sise=8),
     "unknown key 'batch_sise' in data (did you mean batch_size?); the valid keys: source, image_size, channels"),
    (["train", "--stage", "size_spn"], lambda c: c["stages"]["size_spn"]["model"].update(widht=8),
     "unknown key 'widht' in stages.size_spn.model (the geometry is data's) (did you mean width?); the valid keys: "
     "width, layers"),
    (["sample"], lambda c: c["stages"]["first_slice"]["model"].update(subscale=4), "unknown key 'subscale' in "
     "stages.first_slice.model"),
    (["train", "--stage", "first_slice"], lambda c: c["trainer"].update(max_stepz=3),
     "unknown key 'max_stepz' in trainer (did you mean max_steps?)"),
    (["train", "--stage", "depth_spn"], lambda c: c["stages"]["depth_spn"].update(trainer={"val_check_intervl": 3}),
     "unknown key 'val_check_intervl' in stages.depth_spn.trainer (did you mean val_check_interval?)"),
])
def test_a_misspelled_key_is_one_line_naming_it_the_file_and_the_valid_keys(tmp_path, capsys, command, edit, message):
    config = yaml.safe_load((ROOT / "conf" / "experiments" / "smoke.yaml").read_text())
    edit(config)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli([*command, "--exp", str(path), "--run-dir", str(tmp_path / "run")])
    err = one_line_error(capsys.readouterr().err)
    assert code == 2 and err.startswith(f"error: {path}: {message}"), err
    assert not (tmp_path / "run").exists()


def test_every_experiment_under_conf_loads():
    from pipeline.config import load_experiment

    for path in sorted(ROOT.glob("conf/experiments/**/*.yaml")):
        load_experiment(str(path))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(trainr=c.pop("trainer")), "unknown key 'trainr' in the top level (did you mean trainer?); "
     "the valid keys: data, trainer, stages, name, seed, checkpoint_every, sample_grid, val_quality, wandb"),
    (lambda c: c["stages"].update(size_snp=c["stages"].pop("size_spn")), "unknown key 'size_snp' in stages "
     "(did you mean size_spn?); the valid keys: first_slice, size_spn, depth_spn"),
    (lambda c: c["stages"]["depth_spn"].update(trainr={"max_steps": 3}), "unknown key 'trainr' in stages.depth_spn "
     "(did you mean trainer?); the valid keys: model, trainer"),
    (lambda c: c["stages"]["depth_spn"].update(model=[1, 2]), "stages.depth_spn.model must be a mapping"),
    (lambda c: c.update(wandb={"projet": "x"}), "unknown key 'projet' in wandb (did you mean project?)"),
])
def test_a_misspelled_section_is_refused_not_ignored(tmp_path, capsys, edit, message):
    config = yaml.safe_load((ROOT / "conf" / "experiments" / "smoke.yaml").read_text())
    edit(config)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    stages = subprocess.run([sys.executable, "-m", "pipeline", "stages", "--exp", str(path)], cwd=ROOT,
                            capture_output=True, text=True)  # what every make call runs first
    assert stages.returncode == 2 and one_line_error(stages.stderr).startswith(f"error: {path}: {message}")
    assert cli(["data", "--exp", str(path)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"error: {path}: {message}")


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (one just given up by this process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def wandb_out_of_reach(tmp_path, monkeypatch):
    """WANDB_MODE=online with a key and a server that cannot be reached; nothing leaves 127.0.0.1."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # 40 characters, as a real key
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings of this machine
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))


@pytest.mark.parametrize("logged_in", [True, False])
def test_wandb_out_of_reach_after_evaluate_is_a_warning_and_the_results_stay(tmp_path, capsys, monkeypatch,
                                                                             wandb_out_of_reach, logged_in):
    if not logged_in:
        monkeypatch.delenv("WANDB_API_KEY")
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    code = cli(["evaluate", "--exp", str(experiment_file(tmp_path, SMOKE)), "--run-dir", str(run_dir),
                "--images", str(images_file(tmp_path, SMOKE))])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and "Traceback" not in err and len(warnings) == 1, err
    assert "could not log the evaluate run to W&B" in warnings[0] and "WANDB_MODE=offline" in warnings[0]
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in warnings[0]
    assert json.loads((run_dir / "eval.json").read_text())["n_images"] == 6


def test_wandb_out_of_reach_stops_training_before_it_starts(tmp_path, wandb_out_of_reach):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--exp", "smoke", "--stage", "first_slice",
                           "--run-dir", str(run_dir), "--trainer.max_steps=2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # a process of its own: W&B reads its settings once per process
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]  # beside W&B's own notes
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    err = errors[0]
    assert err.startswith("error: cannot start the W&B run online (")
    assert "WANDB_MODE=offline" in err and not list(run_dir.glob("checkpoints/**/*.ckpt"))


@pytest.mark.parametrize("setting, message", [
    ("RUN_DIR=runs/my run", "RUN_DIR='runs/my run' has spaces, and make cannot name files with spaces: use a folder "
                            "without them, e.g. RUN_DIR=runs/my_run"),
    ("EXP=my exp", "EXP='my exp' has spaces, and make cannot name files with spaces"),
    ("RUN_DIR=", "RUN_DIR is empty: name the folder of the run"),
])
@pytest.mark.parametrize("target", ["sample", "train-all", "clean"])
def test_make_refuses_a_run_dir_or_exp_with_spaces_in_one_line(target, setting, message):
    planned = make("-n", target, "EXP=smoke", setting)
    assert planned.returncode != 0 and "pipeline" not in planned.stdout and "rm " not in planned.stdout
    assert message in one_line_error(planned.stderr)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["data"].update(source={"kind": "photos", "patch_sise": 16}),
     "unknown key 'patch_sise' in data.source of kind photos (did you mean patch_size?); its keys: kind, patch_size"),
    (lambda c: c["data"].pop("image_size"), "data has no 'image_size', which it needs (data needs source, image_size)"),
])
def test_a_data_source_or_a_needed_data_key_that_is_wrong_is_one_line(tmp_path, capsys, edit, message):
    config = yaml.safe_load((ROOT / "conf" / "experiments" / "smoke.yaml").read_text())
    edit(config)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["data", "--exp", str(path)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"error: {path}: {message}")


@pytest.mark.parametrize("value", ['"64"', "true", "1", "-5"])
def test_val_quality_that_is_not_a_number_of_images_is_one_line(tmp_path, value):
    from pipeline.config import load_experiment

    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "conf" / "experiments" / "smoke.yaml").read_text() + f"val_quality: {value}\n")
    with pytest.raises(ValueError, match="val_quality must be a number of images, 2 or more"):
        load_experiment(str(config))


def test_a_ctrl_c_that_c_code_turns_into_another_error_is_still_an_interruption(tmp_path, monkeypatch, capsys, ctrl_c):
    """pyarrow (inside `datasets`) catches the KeyboardInterrupt of a Ctrl+C and raises ArrowInvalid, a
    ValueError, in its place: the command still says it was interrupted (exit 130, the resume hint for
    train), not that the user made a mistake (exit 2)."""
    import signal
    import time

    def train_hit_by_ctrl_c(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise ValueError("Schema at index 2 was different")  # what pyarrow made of one

    monkeypatch.setattr("pipeline.train.main", train_hit_by_ctrl_c)
    assert cli(["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice"]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted: train stopped by Ctrl+C; make the same target again "
                                               "to resume")
    monkeypatch.setattr("pipeline.inference.sample.main", train_hit_by_ctrl_c)  # another command: no resume hint
    assert cli(["sample", "--exp", "smoke", "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: sample stopped by Ctrl+C; what it wrote before is as it was"
    monkeypatch.setattr("pipeline.train.main", lambda args: (_ for _ in ()).throw(ValueError("a real mistake")))
    assert cli(["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice"]) == 2  # no Ctrl+C
    assert capsys.readouterr().err.strip() == "error: a real mistake"


def test_make_keeps_a_written_checkpoint_when_stopped():
    """A Ctrl+C or SIGTERM just after a stage's checkpoint was written (whole, by a rename) made make delete
    it (.DELETE_ON_ERROR: the target was newer): the trained stage was lost."""
    database = make("-pn", "EXP=smoke", "RUN_DIR=runs/precious", "train-all").stdout
    precious = next(line for line in database.splitlines() if line.startswith(".PRECIOUS:")).split()[1:]
    stages = ("first_slice", "size_spn", "depth_spn")
    assert {f"runs/precious/checkpoints/{stage}.ckpt" for stage in stages} <= set(precious)
