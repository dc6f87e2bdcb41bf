"""Training each stage through the real entry point: fast_dev_run, W&B offline, resume, the Makefile."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_experiment, stage_names
from pipeline.train import train_stage
from stages import STAGES
from wandb_records import history, records

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
    run_file = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
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


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path):
    """Kill a stage mid-run; making it again continues from checkpoints/<stage>/last.ckpt."""
    args = ["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--trainer.max_steps=100000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "checkpoints" / "first_slice" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # Ctrl+C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "make the same target again to resume" in err
    assert not (tmp_path / "checkpoints" / "first_slice.ckpt").exists()  # written only when a stage finishes
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 2
    resumed = run_pipeline(*args, f"--trainer.max_steps={step + 4}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming first_slice from {last}" in resumed.stdout
    final = torch.load(tmp_path / "checkpoints" / "first_slice.ckpt", weights_only=True)
    assert final["global_step"] == step + 4


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
    equals the evaluator's exact log-likelihood (DESIGN.md 4.4)."""
    run_dir = tmp_path / "run"
    make = ["make", "-C", str(ROOT), "EXP=smoke", f"RUN_DIR={run_dir}"]
    done = subprocess.run([*make, "train-all"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("first_slice", "size_spn", "depth_spn"):
        assert (run_dir / "checkpoints" / f"{stage}.ckpt").exists()
    again = subprocess.run([*make, "train-all"], capture_output=True, text=True)
    assert "up to date" in again.stdout and "pipeline train" not in again.stdout  # nothing retrained

    sampled = subprocess.run([*make, "sample", "N=6", "BATCH=4", "SEED=3"], capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    samples = np.load(run_dir / "samples" / "samples.npz")
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
