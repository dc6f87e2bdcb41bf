"""Training each stage through the real entry point: fast_dev_run, W&B offline, resume, the Makefile."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from conftest import make_stages
from pipeline.config import load_experiment, stage_names
from pipeline.train import train_stage
from stages import STAGES
from wandb_records import finished_runs, history, records

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["first_slice", "size_spn", "depth_spn"])
def test_fast_dev_run_of_each_stage(stage, tmp_path):
    final = train_stage("smoke", stage, tmp_path, ["--trainer.fast_dev_run=true"])
    model = STAGES[stage].load_from_checkpoint(final, weights_only=True)
    assert model.hparams.subscale == 2 and model.hparams.high_bits == 2  # geometry linked from data
    assert not list(tmp_path.glob("checkpoints/*.partial"))


def test_wandb_offline_run_has_metrics_config_and_sample_grid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_stage("smoke", "size_spn", tmp_path, ["--trainer.max_steps=24"])
    assert "wandb sync" in capsys.readouterr().out  # tells how to upload later
    run_file = finished_runs(tmp_path)
    assert len(run_file) == 1
    rows = list(history(run_file[0]))
    keys = set().union(*rows)
    assert {"train/loss", "train/bpd", "val/bpd", "trainer/global_step"} <= keys
    assert any(k.startswith("lr-AdamW") for k in keys) and "train/device/samples_per_sec" in keys
    images = [row["val/samples/filenames"] for row in rows if "val/samples/filenames" in row]
    assert images and all((Path(run_file[0]).parent / "files" / f).exists() for f in images[-1])
    run = next(r.run for r in records(run_file[0]) if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type) == ("smoke", "size_spn")
    config = {u.key for r in records(run_file[0]) if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"trainer", "source", "subscale", "width", "lr"} <= config  # the full config: data, model, trainer


def run_pipeline(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


def wait_for_checkpoint(path: Path, proc, step: int, timeout: float = 300, stop: bool = False) -> int:
    """Wait until `path` holds a checkpoint of at least `step` steps; return its step. With `stop`,
    the process is left stopped (SIGSTOP) from the moment the checkpoint was seen, so that a short
    run cannot finish between the look and the caller's signal."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            if stop:
                proc.send_signal(signal.SIGSTOP)
            try:
                saved = torch.load(path, weights_only=True)["global_step"]
            except Exception:  # never expected: checkpoints appear whole (write, then rename)
                raise AssertionError(f"{path} is not a whole checkpoint")
            if saved >= step:
                return saved
            if stop:
                proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} in {path}")


def test_killed_training_resumes_exactly_where_it_was(tmp_path):
    """SIGKILL mid-epoch, then make the target again: the same weights as a run never interrupted
    (same step count, learning-rate schedule, data order and slice draws; no batch seen twice)."""
    args = ["train", "--exp", "smoke", "--stage", "size_spn", "--trainer.max_steps=14",
            "--trainer.val_check_interval=7"]
    plain = run_pipeline(*args, "--run-dir", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--run-dir", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "size_spn" / "last.ckpt"
    step = wait_for_checkpoint(last, proc, 4, stop=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "checkpoints" / "size_spn.ckpt").exists()  # written only when a stage finishes
    assert 4 <= step < 14
    resumed = run_pipeline(*args, "--run-dir", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming size_spn" in resumed.stdout and "not resumable" not in resumed.stderr
    a, b = (torch.load(run / "checkpoints" / "size_spn.ckpt", weights_only=True)
            for run in (tmp_path / "plain", killed))
    assert a["global_step"] == b["global_step"] == 14
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])


def test_ctrl_c_stops_training_with_one_line_and_it_resumes(tmp_path):
    args = ["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice"]
    # Ctrl+C as in a terminal: a suite started in the background (nohup, `cmd &` without job control)
    # hands its children SIGINT ignored, and a process that inherits that rightly ignores Ctrl+C
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--trainer.max_steps=100000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = tmp_path / "checkpoints" / "first_slice" / "last.ckpt"
    step = wait_for_checkpoint(last, proc, 2)
    proc.send_signal(signal.SIGINT)  # Ctrl+C
    _, err = proc.communicate(timeout=120)
    step = torch.load(last, weights_only=True)["global_step"]
    assert proc.returncode == 130, err[-2000:]
    assert f"make the same target again to resume from step {step} ({last})" in err, err[-2000:]
    resumed = run_pipeline(*args, f"--trainer.max_steps={step + 4}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming first_slice from {last}" in resumed.stdout
    assert torch.load(tmp_path / "checkpoints" / "first_slice.ckpt", weights_only=True)["global_step"] == step + 4


def test_ctrl_c_before_the_first_checkpoint_says_the_stage_starts_over(tmp_path):
    """No resumable checkpoint yet (checkpoint_every steps): the line says so instead of naming a
    last.ckpt that does not exist."""
    experiment = tmp_path / "rare_checkpoints.yaml"
    experiment.write_text((ROOT / "conf" / "experiments" / "smoke.yaml").read_text() + "checkpoint_every: 1000000\n")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--exp", str(experiment), "--run-dir",
                             str(tmp_path / "run"), "--stage", "first_slice", "--trainer.max_steps=100000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, proc.kill)  # a run that never says the line below fails, not hangs
    watchdog.start()
    for line in proc.stdout:  # said once the stage is sure to train, right before it does
        if line.startswith("W&B is offline"):
            break
    time.sleep(3)
    watchdog.cancel()
    proc.send_signal(signal.SIGINT)  # Ctrl+C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: first_slice stopped at step "), err[-2000:]
    assert "before its first checkpoint" in err and "starts it over" in err and "last.ckpt" not in err, err[-2000:]
    assert not (tmp_path / "run" / "checkpoints" / "first_slice" / "last.ckpt").exists()


def test_bad_experiment_is_one_clear_line(tmp_path):
    result = run_pipeline("train", "--exp", "nope", "--stage", "first_slice", "--run-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "no experiment 'nope'" in result.stderr and "EXP=" in result.stderr


def test_sampling_without_checkpoints_says_what_to_do(tmp_path):
    result = run_pipeline("sample", "--exp", "smoke", "--run-dir", str(tmp_path))
    assert result.returncode == 2 and "make train-all" in result.stderr
    assert not (tmp_path / "samples").exists()


def test_stage_list_follows_the_factorisation():
    assert stage_names(load_experiment("smoke")) == ["first_slice", "size_spn", "depth_spn"]
    experiment = load_experiment("smoke")
    experiment["data"].update(high_bits=4, subscale=1)
    assert stage_names(experiment) == ["first_slice"]


@pytest.mark.slow
def test_make_train_all_sample_evaluate_end_to_end(tmp_path):
    """`make train-all EXP=smoke`, then sample, then score those samples: the sampler's log_prob
    equals the evaluator's exact log-likelihood."""
    run_dir = tmp_path / "run"
    make = ["make", "-C", str(ROOT), "EXP=smoke", f"RUN_DIR={run_dir}"]
    done = subprocess.run([*make, "train-all"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("first_slice", "size_spn", "depth_spn"):
        assert (run_dir / "checkpoints" / f"{stage}.ckpt").exists()
    again = subprocess.run([*make, "train-all"], capture_output=True, text=True)
    assert "up to date" in again.stdout and "pipeline train" not in again.stdout  # nothing retrained
    twin = subprocess.run(["make", "-C", str(ROOT), "EXP=smoke", f"RUN_DIR={tmp_path / 'twin'}", "train-all"],
                          capture_output=True, text=True)  # the same config trained again: the same weights
    assert twin.returncode == 0, twin.stderr[-2000:]
    for stage in ("first_slice", "size_spn", "depth_spn"):
        a, b = (torch.load(run / "checkpoints" / f"{stage}.ckpt", weights_only=True)["state_dict"]
                for run in (run_dir, tmp_path / "twin"))
        assert all(torch.equal(a[key], b[key]) for key in a), stage

    for twice in range(2):  # the same seed and batch: the same images
        sampled = subprocess.run([*make, "sample", "N=6", "BATCH=4", "SEED=3"], capture_output=True, text=True)
        assert sampled.returncode == 0, sampled.stderr[-2000:]
        samples = np.load(run_dir / "samples" / "samples.npz")
        first = first if twice else samples["images"]
    assert np.array_equal(first, samples["images"])
    assert samples["images"].shape == (6, 8, 8, 1) and samples["images"].dtype == np.uint8
    for name in ("grid.png", "growth.png", "growth.gif"):
        assert (run_dir / "samples" / name).stat().st_size > 0

    scored = subprocess.run([*make, "evaluate", f"IMAGES={run_dir / 'samples' / 'samples.npz'}"],
                            capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["n_images"] == 6
    assert np.allclose(-np.array(report["nll"]), samples["log_prob"], atol=1e-3)
    assert report["bpd"] == pytest.approx(sum(report["stages"].values()))

    # super-resolution and bit-depth expansion of a PNG a user brings
    from PIL import Image

    image = samples["images"][0, :, :, 0]
    Image.fromarray(image[::2, ::2]).save(tmp_path / "low.png")  # its slice 0: 4 x 4
    Image.fromarray(image).save(tmp_path / "full.png")
    up = subprocess.run([*make, "upscale", f"INPUT={tmp_path / 'low.png'}", "N=3"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr[-2000:]
    upscaled = np.load(run_dir / "upscale" / "samples.npz")["images"]
    assert upscaled.shape == (3, 8, 8, 1) and (upscaled[:, ::2, ::2, 0] == image[::2, ::2]).all()
    deep = subprocess.run([*make, "deepen", f"INPUT={tmp_path / 'full.png'}", "N=3"], capture_output=True, text=True)
    assert deep.returncode == 0, deep.stderr[-2000:]
    deepened = np.load(run_dir / "deepen" / "samples.npz")["images"]
    assert (deepened[..., 0] >> 6 == image >> 6).all()  # 4-bit images, b = 2: the top 2 of 8 bits kept
    for job in ("upscale", "deepen"):  # their log_prob is log p(image) under the cascade, as for sample
        outputs = np.load(run_dir / job / "samples.npz")
        rescored = subprocess.run([*make, "evaluate", f"IMAGES={run_dir / job / 'samples.npz'}"],
                                  capture_output=True, text=True)
        assert rescored.returncode == 0, rescored.stderr[-2000:]
        nll = np.array(json.loads((run_dir / "eval.json").read_text())["nll"])
        assert np.allclose(-nll, outputs["log_prob"], atol=1e-3), job
        assert (outputs["log_prob_drawn"] > outputs["log_prob"]).all()  # a part of the image costs less

    # a wrong input: one line naming the expected shape, non-zero exit, earlier outputs intact
    before = (run_dir / "upscale" / "samples.npz").read_bytes()
    bad = run_pipeline("upscale", "--exp", "smoke", "--run-dir", str(run_dir), "--input", str(tmp_path / "full.png"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "expected (4, 4, 1)" in bad.stderr
    assert (run_dir / "upscale" / "samples.npz").read_bytes() == before


def test_a_negative_learning_rate_is_refused_in_one_line_before_the_run_folder_is_made(tmp_path):
    refused = run_pipeline("train", "--exp", "smoke", "--run-dir", str(tmp_path / "run"), "--stage", "first_slice",
                           "--model.lr=-1", "--trainer.max_steps=2")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == "error: lr=-1.0: the learning rate is a number of 0 or more, such as 4e-3"
    assert not (tmp_path / "run").exists()


def test_a_refused_start_is_its_one_line_also_when_logging_was_set_up_before_lightning(tmp_path):
    """A program that sets up `logging` first (root handler): Lightning then gives its loggers none of their
    own and passes their lines up, which must not show 'Seed set to 0' before the error either."""
    script = ("import logging, sys; logging.basicConfig(format='%(message)s', level=logging.INFO)\n"
              "from pipeline.train import train_stage\n"
              "try:\n"
              f"    train_stage('smoke', 'first_slice', {str(tmp_path)!r}, ['--model.lr=-1'])\n"
              "except ValueError as error:\n"
              "    print(f'error: {error}', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.stderr.strip() == "error: lr=-1.0: the learning rate is a number of 0 or more, such as 4e-3"


def test_the_divergence_error_names_the_given_learning_rate_at_any_step():
    # where a too-high rate first overflows (step 2 at the full rate, step 4 partway down the cosine)
    # depends on the CPU's float kernels: the error names the rate --model.lr gave, whichever step it is
    stage = make_stages()["size_spn"]
    stage.hparams.lr = 1e3
    for step, scheduled in [(2, 1e3), (4, 987.5)]:
        stage._trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": scheduled}])],
                                         global_step=step)
        error = str(stage.diverged("the weights hold NaN or infinity"))
        assert error.startswith(f"size_spn diverged at step {step} (learning rate 1e+03, ")
        assert f"{scheduled:.3g} at that step" in error and "\n" not in error
    stage._trainer = None


@pytest.mark.float_paths  # the step at which the rate overflows differs between CPU kernels
def test_diverging_training_stops_with_one_line_and_no_bad_checkpoint(tmp_path):
    args = ["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "size_spn"]
    diverged = run_pipeline(*args, "--model.lr=1e3", "--trainer.max_steps=30")
    assert diverged.returncode == 2
    error = diverged.stderr.strip().splitlines()[-1]
    assert error.startswith("error: size_spn diverged at step ") and "learning rate 1e+03" in error
    assert "lower the learning rate" in error and "Traceback" not in diverged.stderr
    for path in tmp_path.glob("checkpoints/**/*.ckpt"):  # whatever was saved before is finite
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    assert not (tmp_path / "checkpoints" / "size_spn.ckpt").exists()
    again = run_pipeline(*args, "--trainer.max_steps=4")  # a sane learning rate: trains
    assert again.returncode == 0, again.stderr[-2000:]


def test_changed_settings_set_the_old_checkpoint_aside(tmp_path):
    args = ["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "size_spn", "--trainer.max_steps=4"]
    assert run_pipeline(*args).returncode == 0
    (tmp_path / "checkpoints" / "size_spn.ckpt").unlink()  # as if the stage were to be trained again
    wider = run_pipeline(*args, "--model.width=24")
    assert wider.returncode == 0, wider.stderr[-2000:]
    notes = [line for line in wider.stdout.splitlines() if "set aside" in line]
    assert len(notes) == 1 and "width: 16 -> 24" in notes[0] and "training starts afresh" in notes[0]
    assert "resuming" not in wider.stdout
    assert list((tmp_path / "checkpoints" / "size_spn").glob("last.ckpt.set-aside-*"))
    model = STAGES["size_spn"].load_from_checkpoint(tmp_path / "checkpoints" / "size_spn.ckpt", weights_only=True)
    assert model.hparams.width == 24
    assert yaml.safe_load((tmp_path / "config" / "size_spn.yaml").read_text())["model"]["width"] == 24  # ARGS kept


def test_a_setting_of_both_the_model_and_the_data_is_named_once(tmp_path):
    """image_size is a model and a data setting: the set-aside line named its change twice."""
    from types import SimpleNamespace

    from pipeline.train import changed_settings
    torch.save({"hyper_parameters": {"image_size": 8, "width": 16}, "datamodule_hyper_parameters": {"image_size": 8}},
               tmp_path / "last.ckpt")
    now = SimpleNamespace(hparams={"image_size": 12, "width": 16}), SimpleNamespace(hparams={"image_size": 12})
    assert changed_settings(tmp_path / "last.ckpt", *now) == ["image_size: 8 -> 12"]


def test_a_stage_with_init_from_starts_from_the_trained_decoder_only_when_it_starts_afresh(tmp_path):
    """init_from: first_slice: a fresh size SPN takes the trained first-slice decoder's weights (at learning
    rate 0 they stay so); a resumed one keeps its own; without the first slice's checkpoint, one line."""
    run = ["train", "--exp", "smoke", "--run-dir", str(tmp_path)]
    start = [*run, "--stage", "size_spn", "--model.init_from=first_slice"]
    missing = run_pipeline(*start, "--trainer.max_steps=2")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: the size_spn starts from the trained first_slice decoder (init_from: first_slice), but "
        f"{tmp_path / 'checkpoints' / 'first_slice.ckpt'} does not exist: train the first_slice first "
        f"(make train-all), or remove init_from")
    assert not list(tmp_path.iterdir())  # refused: the run folder is as it was, no config or empty folder left
    assert run_pipeline(*run, "--stage", "first_slice", "--trainer.max_steps=4").returncode == 0
    fresh = run_pipeline(*start, "--trainer.max_steps=4", "--model.lr=0")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "size_spn: starts from the first_slice decoder" in fresh.stdout
    first, size = (torch.load(tmp_path / "checkpoints" / f"{name}.ckpt", weights_only=True)["state_dict"]
                   for name in ("first_slice", "size_spn"))
    copied = [key for key in first if key.startswith("decoder.")]
    assert copied and all(torch.equal(size[key], first[key]) for key in copied)
    (tmp_path / "checkpoints" / "size_spn.ckpt").unlink()  # train on: it resumes from its own last.ckpt
    resumed = run_pipeline(*start, "--trainer.max_steps=6", "--model.lr=0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming size_spn" in resumed.stdout and "starts from" not in resumed.stdout
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    refused = run_pipeline(*start, "--model.width=abc")  # a stage with a past: a refused retry touches none of it
    assert refused.returncode == 2 and 'Parser key "model.width"' in refused.stderr
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


def test_a_stage_of_another_geometry_than_the_runs_other_stages_is_refused_before_it_trains(tmp_path):
    """One run folder, one cascade: a stage set up for another geometry than a stage already trained there
    (an EXP that is not the run's, as `make sample RUN_DIR=... EXP=...` would train) is refused in one
    line, and the run folder is left as it was, whichever stage came first."""
    run = ["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--trainer.max_steps=2"]
    trained = run_pipeline(*run, "--stage", "first_slice")
    assert trained.returncode == 0 and "GPU available: False" in trained.stderr  # Lightning's lines, when it trains
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for stage in ("size_spn", "depth_spn"):
        refused = run_pipeline(*run, "--stage", stage, "--data.image_size=12")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.strip() == (  # the one line alone, without Lightning's 'Seed set to 0' before it
            f"error: the {stage} would be trained with image_size=(12, 12), but "
            f"{tmp_path / 'checkpoints' / 'first_slice.ckpt'} was trained with image_size=(8, 8): use the "
            f"experiment this run was trained with (EXP=...) or another RUN_DIR, or retrain the whole cascade "
            f"with the new settings (make clean train-all)")
        assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files
        assert not (tmp_path / "checkpoints" / stage).exists()
    (tmp_path / "checkpoints" / "first_slice.ckpt").rename(tmp_path / "first_slice.ckpt")
    assert run_pipeline(*run, "--stage", "depth_spn").returncode == 0  # a later stage first: the earlier one is checked too
    refused = run_pipeline(*run, "--stage", "first_slice", "--data.bits=5")
    assert refused.returncode == 2 and "depth_spn.ckpt was trained with bits=4" in refused.stderr
    (tmp_path / "checkpoints" / "depth_spn.ckpt").write_bytes(b"not a checkpoint")  # unreadable: one line too
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    refused = run_pipeline(*run, "--stage", "first_slice")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot read {tmp_path / 'checkpoints' / 'depth_spn.ckpt'} as a checkpoint of the depth_spn (")
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


def test_ids_and_names_that_look_like_numbers_stay_strings(tmp_path, monkeypatch):
    """A W&B run id such as 6e360127 (and an experiment of that name) must not come back as a float."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    experiment = tmp_path / "6e360127.yaml"
    experiment.write_text((ROOT / "conf" / "experiments" / "smoke.yaml").read_text())
    work = tmp_path / "run" / "checkpoints" / "first_slice"
    work.mkdir(parents=True)
    (work / "wandb_id").write_text("6e360127")  # as older versions wrote it
    for _ in range(2):  # train, then train again in the same run folder
        train_stage(str(experiment), "first_slice", tmp_path / "run", ["--trainer.max_steps=2"])
        (tmp_path / "run" / "checkpoints" / "first_slice.ckpt").unlink()
    run = next(r.run for r in records(finished_runs(tmp_path / "run")[0])
               if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.run_group) == ("6e360127", "6e360127")


VALIDATE = """
import sys
import lightning as L
from data.datamodule import SubscaleDataModule
from pipeline.config import load_experiment
from stages import STAGES

devices = int(sys.argv[2])
model = STAGES["size_spn"].load_from_checkpoint(sys.argv[1], weights_only=True)
data = SubscaleDataModule(**{**load_experiment("smoke")["data"], "val_subset": 37, "eval_batch_size": 8})
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
result = trainer.validate(model, datamodule=data, verbose=False)
if trainer.is_global_zero:
    print("VAL", repr(result[0]["val/bpd"]))
"""


@pytest.mark.slow
def test_two_processes_train_with_ddp_and_validate_like_one(tmp_path):
    """DDP on two CPU processes (gloo) trains a stage; validating on 37 images (not divisible by 2
    processes, nor by the batch of 8) gives the val/bpd of one process: no image counted twice."""
    trained = run_pipeline("train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "size_spn",
                           "--trainer.max_steps=4", "--trainer.accelerator=cpu", "--trainer.devices=2",
                           "--trainer.strategy=ddp", env={"WANDB_MODE": "disabled"}, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = tmp_path / "checkpoints" / "size_spn.ckpt"
    assert torch.load(final, weights_only=True)["global_step"] == 4
    script = tmp_path / "validate.py"
    script.write_text(VALIDATE)
    values = []
    for devices in (1, 2):
        done = subprocess.run([sys.executable, str(script), str(final), str(devices)], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        values.append(float(next(line for line in done.stdout.splitlines() if line.startswith("VAL")).split()[1]))
    assert values[0] == pytest.approx(values[1], abs=1e-5)  # float sums in another order: 1e-5 bits/dim


def test_a_streaming_source_trains(tmp_path):
    from test_data import parquet_shards

    config = yaml.safe_load((ROOT / "conf" / "experiments" / "smoke.yaml").read_text())
    config["data"]["source"] = {"kind": "parquet", "data_files": parquet_shards(tmp_path), "streaming": True}
    config["data"]["channels"] = 3
    path = tmp_path / "streaming.yaml"
    path.write_text(yaml.safe_dump(config))
    final = train_stage(str(path), "size_spn", tmp_path / "run", ["--trainer.max_steps=3"])
    assert torch.load(final, weights_only=True)["global_step"] == 3


def test_a_second_training_of_the_same_stage_is_refused_naming_the_first(tmp_path, capsys):
    from pipeline.__main__ import main as cli

    args = ["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice"]
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--trainer.max_steps=100000"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "WANDB_MODE": "disabled"})
    holder = tmp_path / "checkpoints" / "first_slice" / "training.pid"
    try:
        deadline = time.time() + 120
        while not holder.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert cli([*args, "--trainer.max_steps=2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: first_slice is being trained in {tmp_path} by another process (pid {first.pid}): "
                       f"wait for it to end, or stop it, and make the target again")
        assert not (tmp_path / "checkpoints" / "first_slice.ckpt").exists()
    finally:
        first.kill()  # kill -9: its turn ends with it
        first.wait()
    assert cli([*args, "--trainer.max_steps=2"]) == 0


def test_val_quality_logs_fid_and_kid_with_the_runs_feature_network(tmp_path, monkeypatch):
    """`val_quality: 8`: the feature network is trained once into the run folder (named by its hash)
    and every validation logs val/fid and val/kid to W&B."""
    from pipeline.inference import features

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(features, "STEPS", 20)
    experiment = tmp_path / "smoke_quality.yaml"
    experiment.write_text((ROOT / "conf" / "experiments" / "smoke.yaml").read_text() + "val_quality: 8\n")
    train_stage(str(experiment), "size_spn", tmp_path / "run", ["--trainer.max_steps=10"])
    assert len(list((tmp_path / "run").glob("features-*.pt"))) == 1
    run_file = finished_runs(tmp_path / "run")
    rows = [row for row in history(run_file[0]) if "val/fid" in row]
    assert len(rows) == 2 and all(row["val/fid"] >= 0 and "val/kid" in row for row in rows)  # steps 5 and 10


def test_the_learning_rate_anneals_by_max_time_when_that_comes_first():
    """A stage given --trainer.max_time decays its learning rate to 0 by then, not on the way to a
    max_steps it never reaches (the quality bench trains each model for its minutes this way)."""
    stage = make_stages(image_size=8, channels=1, bits=4, high_bits=4, subscale=2)["first_slice"].train()
    stage.hparams.warmup_steps = 2
    x = torch.randint(0, 16, (64, 8, 8, 1))
    batches = [{"image": x[i:i + 8], "msb": x[i:i + 8], "lsb": torch.zeros_like(x[i:i + 8])} for i in range(0, 64, 8)]
    trainer = L.Trainer(max_steps=10**6, max_time={"seconds": 3}, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=DataLoader(batches, batch_size=None))
    assert stage.hparams.warmup_steps < trainer.global_step < 10**6  # max_time ended it
    # near the cosine's end (the last step starts late in the 3 s even on a loaded machine); by steps: the full rate
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.2 * stage.hparams.lr
