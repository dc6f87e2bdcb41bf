"""Ctrl+C and SIGTERM (pipeline.interruption): a stop never lands between the renames that put an
output in place or inside W&B, and the line that reports it says what the command had written."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_stages, save_cascade
from pipeline import Terminated
from pipeline.__main__ import main as cli
from pipeline.interruption import WRITTEN, held, interrupt, reset, terminate
from pipeline.io import folder_at_once
from test_cli import SMOKE
from test_evaluate import experiment_file
from wandb_records import finished_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def handlers():
    """The command line's handlers, as under `python -m pipeline`."""
    reset()
    before = signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGTERM, terminate)
    yield
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])
    reset()


def press_ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs here, or raises here


def hit_by_ctrl_c(function):
    """`function`, with a Ctrl+C arriving as it starts."""
    def hit(*args, **kwargs):
        press_ctrl_c()
        return function(*args, **kwargs)
    return hit


def test_a_stop_inside_a_held_step_waits_for_its_end_and_a_second_ctrl_c_does_not(handlers, capfd):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with held("logging to W&B"):
            press_ctrl_c()
            done.append("the step went on")
    assert done == ["the step went on"]
    assert "Ctrl+C: stopping once logging to W&B is done (Ctrl+C again stops at once)" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with held("logging to W&B"):
            press_ctrl_c()
            press_ctrl_c()  # the user insists: W&B may hang
            done.append("not reached")
    assert done == ["the step went on"]
    with pytest.raises(KeyboardInterrupt):
        with held("putting samples in place", firm=True):
            press_ctrl_c()
            press_ctrl_c()  # a rename's instant: not even a second Ctrl+C cuts it
            done.append("firm")
    assert done[-1] == "firm"
    with pytest.raises(Terminated):
        with held("writing grid.png"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append("SIGTERM waits too")
    assert done[-1] == "SIGTERM waits too"
    signal.signal(signal.SIGTERM, terminate)  # (a SIGTERM ignores SIGTERM for a second: the same stop sent twice)
    with pytest.raises(Terminated):  # not the step's own error: the command says it was terminated (143)
        with held("logging to W&B"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            raise ValueError("W&B failed meanwhile")
    with held("writing grid.png"):
        pass  # nothing left over from the stops above
    with pytest.raises(KeyboardInterrupt, match="already on its way"):
        try:
            raise KeyboardInterrupt("already on its way")
        finally:  # a Ctrl+C in the clean-up of a stop: the first stop's message is kept
            with held("closing the W&B run"):
                press_ctrl_c()


SENT_TWICE = """
import ctypes, os, signal, sys, threading, time
from pipeline import Terminated, interruption

interruption.SAME_STOP_S = 0.5
signal.signal(signal.SIGTERM, interruption.terminate)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
except Terminated:
    print("stopping", flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # make's copy of the same stop
time.sleep(0.05)
print("clean-up went on", flush=True)
time.sleep(1.0)
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the user's, to end a stuck command
mutex = ctypes.create_string_buffer(64)  # a default pthread mutex, locked twice by this thread: stuck in C
libc = ctypes.CDLL(None)
libc.pthread_mutex_lock(mutex)
libc.pthread_mutex_lock(mutex)
"""


def test_sigterm_sent_twice_at_once_is_one_stop_and_a_later_one_ends_a_stuck_command(tmp_path):
    """make passes on the SIGTERM that a group kill also sent to the command: the second one ended the
    command at once, in its clean-up, with no line. A SIGTERM a second later still ends a command stuck in
    C code, where no Python handler runs."""
    script = tmp_path / "sent_twice.py"
    script.write_text(SENT_TWICE)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (proc.returncode, proc.stdout.split()) == (-signal.SIGTERM, ["stopping", "clean-up", "went", "on"]), \
        proc.stderr[-2000:]


def test_a_ctrl_c_between_the_renames_of_an_output_folder_leaves_the_new_folder_whole(tmp_path, handlers,
                                                                                      monkeypatch):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "grid.png").write_text("old")
    rename = os.replace

    def rename_then_ctrl_c(source, target):
        rename(source, target)
        press_ctrl_c()  # after the old folder moved aside, before the new one takes its place; twice

    def stderr_gone(fd, data):  # `make sample 2>&1 | tee log`: the Ctrl+C ended tee too
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(os, "replace", rename_then_ctrl_c)
    monkeypatch.setattr(os, "write", stderr_gone)
    with pytest.raises(KeyboardInterrupt):
        with folder_at_once(out) as folder:
            (folder / "grid.png").write_text("new")
    monkeypatch.undo()
    assert (out / "grid.png").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".samples.lock", "samples"]  # nothing .old or .partial
    assert WRITTEN == [out]


FORK_HIT = []  # armed: the next fork's first hook is hit by a Ctrl+C
os.register_at_fork(before=lambda: FORK_HIT and (FORK_HIT.clear(), press_ctrl_c()))


def test_a_ctrl_c_while_worker_processes_start_stops_the_command(handlers):
    """It fell inside fork's hooks (`logging`'s among them): swallowed there, with `logging`'s lock left
    taken, so the command wrote new outputs after the Ctrl+C and then hung in W&B."""
    from pipeline.inference.processes import in_processes
    from pipeline.progress import PlainBar

    FORK_HIT.append(True)
    with pytest.raises(KeyboardInterrupt):
        in_processes(lambda items, counter: torch.zeros(1), range(3), PlainBar(3, stream=io.StringIO()), workers=3)


def test_a_ctrl_c_while_sample_logs_to_wandb_is_reported_after_the_outputs_it_wrote(tmp_path, monkeypatch, capsys,
                                                                                   ctrl_c):
    """It fell inside W&B or `logging`: swallowed there (the process then hung on a lock) or reported as
    'what it wrote before is as it was' though the new samples were in place."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    save_cascade(make_stages(**SMOKE), run_dir)
    monkeypatch.setattr(wandb, "init", hit_by_ctrl_c(wandb.init))
    assert cli(["sample", "--exp", str(experiment_file(tmp_path, SMOKE)), "--run-dir", str(run_dir), "--n", "2"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: sample stopped by Ctrl+C after it had written {run_dir / 'samples'} (complete)")
    assert sorted(path.name for path in (run_dir / "samples").iterdir()) == [
        "grid.png", "growth.gif", "growth.png", "samples.npz"]
    assert len(finished_runs(run_dir)) == 1  # the W&B run was finished, not cut off


def test_a_sigterm_after_the_outputs_were_in_place_names_them_as_ctrl_c_does(tmp_path, monkeypatch, capsys,
                                                                             ctrl_c):
    """It said only 'terminated (SIGTERM)', though the new samples were complete."""
    import wandb

    def terminated_as_it_starts(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return init(*args, **kwargs)

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, init = tmp_path / "run", wandb.init
    save_cascade(make_stages(**SMOKE), run_dir)
    monkeypatch.setattr(wandb, "init", terminated_as_it_starts)
    assert cli(["sample", "--exp", str(experiment_file(tmp_path, SMOKE)), "--run-dir", str(run_dir), "--n", "2"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"terminated (SIGTERM) after sample had written {run_dir / 'samples'} (complete)")
    assert (run_dir / "samples" / "samples.npz").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_training_closes_its_wandb_run_says_the_stage_was_written(tmp_path, monkeypatch, capsys,
                                                                              ctrl_c, signum):
    """Not 'make the same target again to resume': the stage's checkpoint was already written."""
    import wandb

    def stopped_as_it_starts():
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        return finish()

    monkeypatch.setenv("WANDB_MODE", "offline")
    finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", stopped_as_it_starts)
    status = cli(["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice",
                  "--trainer.max_steps=2"])
    final = tmp_path / "checkpoints" / "first_slice.ckpt"
    stop = ("interrupted: first_slice stopped by Ctrl+C" if signum == signal.SIGINT else
            "terminated (SIGTERM) after first_slice had written")
    assert (status, capsys.readouterr().err.strip().splitlines()[-1]) == (
        130 if signum == signal.SIGINT else 143,
        f"{stop}{' after it had written' if signum == signal.SIGINT else ''} {final} (complete): make the same "
        f"target again to go on")
    assert final.exists()


def test_a_ctrl_c_that_c_code_turns_into_an_error_while_training_still_names_the_step(tmp_path, monkeypatch,
                                                                                     capsys, ctrl_c):
    """pyarrow, reading a batch, raises its own error in place of the KeyboardInterrupt: the line still
    says where training stopped and what resuming starts from, not a bare 'train stopped by Ctrl+C'."""
    from data.datamodule import SubscaleDataModule

    collate, batches = SubscaleDataModule.collate, []

    def collate_hit_by_ctrl_c(self, batch):
        batches.append(batch)
        if len(batches) == 8:
            try:
                press_ctrl_c()
            except KeyboardInterrupt:
                raise ValueError("Schema at index 2 was different") from None  # what pyarrow made of one
        return collate(self, batch)

    monkeypatch.setattr(SubscaleDataModule, "collate", collate_hit_by_ctrl_c)
    assert cli(["train", "--exp", "smoke", "--run-dir", str(tmp_path), "--stage", "first_slice",
                "--trainer.max_steps=100"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted: first_slice stopped at step ")


EXIT_HOOK = """
import atexit, os, signal, sys, time, runpy
import pipeline.interruption

SIGNUM = int(sys.argv[2])

def library_exit_hook():  # as W&B's: it runs as Python exits, after the command is done
    os.kill(os.getpid(), SIGNUM)
    time.sleep(0.2)
    print("the exit hook went on", file=sys.stderr)

if sys.argv[1] == "during the exit hooks":  # registered after the command line's own hook
    start = pipeline.interruption.reset
    pipeline.interruption.reset = lambda: (start(), atexit.register(library_exit_hook))
else:  # registered before it, so run after it: as Python's last second of teardown
    atexit.register(library_exit_hook)
sys.argv = ["pipeline", "stages", "--exp", "smoke"]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["during the exit hooks", "after them"])
def test_a_stop_after_a_command_is_done_ends_it_with_its_own_status_and_no_traceback(when, signum):
    """Under make, stopped by the same signal, make exits 130 or 143 with no line: the command's says why."""
    done = subprocess.run([sys.executable, "-c", EXIT_HOOK, when, str(int(signum))], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "WANDB_MODE": "disabled"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0, done.stderr[-2000:]  # not killed by the signal, not 130: the command had finished
    assert done.stdout.split() == ["first_slice", "size_spn", "depth_spn"]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr[-2000:]
    assert ("the exit hook went on" in done.stderr) == (when == "after them")  # at once: the command was done
    name = "Ctrl+C" if signum == signal.SIGINT else "SIGTERM"
    said = f"{name} came after stages had ended, with status 0: what it wrote stands"
    if when == "during the exit hooks":
        assert done.stderr.strip().splitlines()[-1] == said
    else:  # ignored in Python's last second: nothing to say
        assert said not in done.stderr


def test_the_last_line_on_a_stderr_that_is_gone_leaves_the_exit_status_as_it_is(tmp_path):
    """`make sample 2>&1 | tee log`, the tee ended by the same Ctrl+C: the line cannot be written, and the
    status must still say what happened (here 2, a user's mistake), not 1 or 120 for the lost line."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone
    done = subprocess.run([sys.executable, "-m", "pipeline", "sample", "--exp", "smoke", "--run-dir", str(tmp_path)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=write,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    os.close(write)
    assert done.returncode == 2
