"""Work split between forked CPU processes (`pipeline.inference.processes`, used by `Cascade.sample`)."""
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import WorkerFailed
from pipeline.inference import processes
from pipeline.inference.processes import in_processes, worker_count
from pipeline.progress import PlainBar, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_how_many_processes_sample():
    assert worker_count(1, "cpu") == 1
    assert worker_count(100, "cpu") == torch.get_num_threads()
    assert worker_count(100, "cpu", requested=3) == 3
    assert worker_count(2, "cpu", requested=8) == 2  # no process without an image
    assert worker_count(100, "cuda", requested=4) == 1  # a GPU samples in this process
    assert worker_count(100, "cpu", requested=0) == 1


def share(items, counter):
    i = items[0]
    counter.update(i + 1)
    return torch.full((i + 1,), float(i)), [torch.tensor(i)]


def test_shares_come_back_in_order_with_their_progress():
    bar = PlainBar(6, stream=io.StringIO())
    shares = in_processes(share, range(3), bar, workers=3)
    assert [len(values) for values, _ in shares] == [1, 2, 3]
    assert all(torch.equal(values, torch.full((i + 1,), float(i))) and int(rest[0]) == i
               for i, (values, rest) in enumerate(shares))
    assert bar.n == 1 + 2 + 3


def test_a_plain_bar_gives_each_count_once():
    """Its last periodic line fell on the final count, and closing it printed the same count again."""
    stream = io.StringIO()
    bar = PlainBar(4, desc="evaluating test", unit="image", seconds=0.0, stream=stream)
    bar.update(2)
    bar.update(2)
    bar.close()
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "evaluating test: 2/4 images", "evaluating test: 4/4 images"]
    quiet = io.StringIO()
    bar = PlainBar(4, desc="evaluating test", unit="image", seconds=3600.0, stream=quiet)
    bar.update(4)
    bar.close()  # nothing shown yet: the end is shown once
    assert quiet.getvalue().count("4/4 images") == 1


def test_items_are_cut_into_contiguous_shares_one_per_process():
    shares = in_processes(lambda items, counter: torch.tensor(list(items)), range(7), progress_bar(disable=True),
                          workers=3)
    assert len(shares) == 3 and torch.cat(shares).tolist() == list(range(7))
    alone = in_processes(lambda items, counter: torch.tensor(list(items)), range(7), progress_bar(disable=True),
                         workers=1)
    assert len(alone) == 1 and alone[0].tolist() == list(range(7))


def fails(items, counter):
    if items[0] == 1:
        raise ValueError("share 1 failed")
    return torch.zeros(1)


def test_an_error_in_a_process_is_raised_here():
    with pytest.raises(ValueError, match="share 1 failed"):
        in_processes(fails, range(2), progress_bar(disable=True), workers=2)


def fails_here(items, counter):
    if items[0] == 0:
        raise KeyboardInterrupt  # Ctrl+C while this process draws its own share
    return torch.zeros(1)


def test_an_interrupt_in_the_share_run_here_is_raised_as_it_is():
    with pytest.raises(KeyboardInterrupt):
        in_processes(fails_here, torch.arange(4), progress_bar(disable=True), workers=2)


def torch_threads(items, counter):
    return torch.tensor([torch.get_num_threads(), multiprocessing.current_process().pid])


def test_processes_share_the_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        shares = in_processes(torch_threads, range(2), progress_bar(disable=True), workers=2)
        assert torch.get_num_threads() == 4  # this process has its threads back
    finally:
        torch.set_num_threads(before)
    assert all(int(threads) == 2 for threads, _ in shares)
    pids = [int(pid) for _, pid in shares]
    assert pids[0] == multiprocessing.current_process().pid != pids[1]  # the first share ran here


BAR = PlainBar(3, stream=io.StringIO())


def counts_and_reads_the_bar(items, counter):
    counter.update(len(items))
    return torch.tensor(BAR.n)


def test_the_share_run_here_moves_the_bar_as_it_goes():
    seen = in_processes(counts_and_reads_the_bar, range(3), BAR, workers=3)
    assert int(seen[0]) >= 1  # at once, not only when the other shares are done
    assert BAR.n == 3


def dies(items, counter):
    if items[0] == 1:
        import os
        os._exit(3)  # as when the kernel kills a process for memory
    return torch.zeros(1)


def test_a_process_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="exit code 3"):
        in_processes(dies, range(2), progress_bar(disable=True), workers=2)


@pytest.fixture
def deadline():
    """Fail, rather than hang, a test whose call does not return within 30 s."""
    def expired(signum, frame):
        raise AssertionError("in_processes hung")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def exits_quietly(items, counter):
    if items[0] == 1:
        os._exit(0)  # a job that ends its process: no result, no error, exit code 0
    return torch.zeros(1)


def test_a_process_that_exits_without_its_result_is_an_error_not_a_hang(deadline):
    with pytest.raises(WorkerFailed, match=r"ended without its result \(exit code 0\)"):
        in_processes(exits_quietly, range(2), progress_bar(disable=True), workers=2)


def hangs(items, counter):
    if items[0] == 1:
        time.sleep(600)
    return torch.zeros(1)


def test_a_process_that_hangs_is_an_error_not_a_hang(deadline, monkeypatch):
    monkeypatch.setattr(processes, "PATIENCE", 1.0)
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="no progress for 1 s: it hangs"):
        in_processes(hangs, range(2), progress_bar(disable=True), workers=2)
    assert time.monotonic() - started < 10


def gone(pid: int, seconds: float) -> bool:
    """Whether process `pid` ends (or is a zombie) within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


ORPHAN = """
import os, signal, sys, time
from pathlib import Path
from pipeline.inference.processes import in_processes
from pipeline.progress import progress_bar

def job(items, counter):
    pid_file = Path(sys.argv[1])
    if items[0] == 1:  # the child: says who it is, then works on for long
        pid_file.write_text(str(os.getpid()))
        time.sleep(120)
    while not pid_file.exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)  # this process dies at once, without a word or a finally

in_processes(job, range(2), progress_bar(disable=True), workers=2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_worker_dies_with_its_parent_even_by_kill_9(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "child.pid")], cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -signal.SIGKILL
    child = int((tmp_path / "child.pid").read_text())
    try:
        assert gone(child, 5), "the worker outlived its parent"
    finally:
        if not gone(child, 0):
            os.kill(child, signal.SIGKILL)


TERMINATED = """
import os, runpy, sys, time
from pathlib import Path
from pipeline.inference import sample
from pipeline.inference.processes import in_processes
from pipeline.progress import progress_bar

PID_FILE, RUN_DIR = sys.argv[1:3]

def job(items, counter):
    if items[0] == 1:
        Path(PID_FILE).write_text(str(os.getpid()))
    time.sleep(120)  # both shares: a long sampling

sample.main = lambda args: in_processes(job, range(2), progress_bar(disable=True), workers=2)
sys.argv = ["pipeline", "sample", "--exp", "smoke", "--run-dir", RUN_DIR]
runpy.run_module("pipeline", run_name="__main__")  # as `python -m pipeline sample ...`
"""


@pytest.mark.parametrize("sent", [1, 2])
def test_sigterm_ends_the_command_and_its_workers_in_one_line(tmp_path, sent):
    """Also when it comes twice (sent to the group of `make sample`, which passes its own copy on) and the
    second lands once the command is done: it killed the process by SIGTERM then, after its line (the
    copy that lands during the clean-up: tests/test_interruption.py)."""
    script = tmp_path / "terminated.py"
    script.write_text(TERMINATED)
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, str(script), str(pid_file), str(tmp_path / "run")], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    for _ in range(sent):
        proc.send_signal(signal.SIGTERM)  # a scheduler's, `timeout`'s or a closing shell's (make's copy next)
        time.sleep(0.1)
    try:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 143 and err.strip() == "terminated (SIGTERM)", (proc.returncode, err)
        assert gone(child, 5), "the worker outlived the command"
    finally:
        proc.kill()
        if not gone(child, 0):
            os.kill(child, signal.SIGKILL)
