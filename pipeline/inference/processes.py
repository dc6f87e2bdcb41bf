"""Independent work split between forked CPU processes (`Cascade.sample`, the codec's chunks).

On a CPU, cached decoding of small images is a long chain of small tensor operations, each
bound by its fixed cost rather than its arithmetic; intra-op threads pay little at these sizes, so
one process keeps about one core busy (`make bench`, sampling, measures it). The images are independent given their noise, so `in_processes` cuts them
into W shares and runs the shares side by side, one thread each: the first in this process,
the others in forked processes. The codec's chunks of images are independent too, and it
computes on one thread anyway (`pipeline.codec.coder`).

Forked children inherit the model without copying it. Their results come back as
`torch.save` bytes: torch's own sharing of tensors between processes (file descriptors in
/dev/shm) is not used for results of a few kilobytes. A child never outlives
this process: on Linux the kernel kills it when this process dies, however it dies (prctl's
PR_SET_PDEATHSIG); everywhere, this process ends its children when it stops on an exception.
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import warnings

import torch

from pipeline import WorkerFailed
from pipeline.interruption import held

PATIENCE = 60.0  # seconds: a child that shows no progress for longer (and 10x this process's share) hangs


def worker_count(n: int, device, requested: int | None = None) -> int:
    """How many processes to split n independent items between: `requested` (by default one per
    thread torch may use, `torch.get_num_threads()`, which OMP_NUM_THREADS sets), at most n; always
    1 on a GPU, where fork is missing (macOS and Windows start processes otherwise), or inside a
    daemon process (a DataLoader or pool worker, which may not start processes)."""
    if (torch.device(device).type != "cpu" or "fork" not in multiprocessing.get_all_start_methods()
            or multiprocessing.current_process().daemon):
        return 1
    return max(1, min(n, torch.get_num_threads() if requested is None else requested))


def in_processes(job, items, progress, device="cpu", workers: int | None = None) -> list:
    """`items` (a sequence: list, range, tensor) cut into W contiguous shares, W = `worker_count(len(items),
    device, workers)`, and [job(share, counter) for each share], side by side: the first share in this
    process, each other in a forked process of its own (W = 1: job(items, progress) here).

    `job` returns tensors or bytes (alone or in tuples, lists, dicts); `counter.update(k)` adds k to
    `progress`, a tqdm-like bar of this process. The shares split torch's threads
    (`torch.get_num_threads() // W`, at least 1 each). The children ignore Ctrl+C: this process
    stops on it and ends them, as on any exception, and they die with this process. An exception
    in a share is raised here; a child that ends without a result (killed, or exiting early) raises
    WorkerFailed, and so does one that shows neither progress (`counter.update`) nor its result for
    PATIENCE seconds and 10 times what this process's own share took (it hangs). Forking costs more
    the more memory this process holds (its page tables are copied, and torn down when the child
    exits).
    """
    parts = worker_count(len(items), device, workers)
    if parts == 1:
        return [job(items, progress)]
    shares = [items[len(items) * i // parts: len(items) * (i + 1) // parts] for i in range(parts)]
    context = multiprocessing.get_context("fork")
    done, results, outputs = context.Value("q", 0), context.Queue(), {}
    threads, own_threads = max(1, torch.get_num_threads() // parts), torch.get_num_threads()
    children = [context.Process(target=_child, args=(job, i, shares[i], done, threads, results, os.getpid()),
                                daemon=True) for i in range(1, parts)]
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns of fork in a process with threads (torch's);
            # the children only run torch with threads of their own, as a DataLoader's workers do
            warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
            # a stop inside fork's hooks was swallowed there, leaving `logging`'s lock taken: the command went
            with held("starting the worker processes", firm=True):  # on and then hung in W&B's logging
                for child in children:
                    child.start()
        started = time.monotonic()
        torch.set_num_threads(threads)
        try:
            outputs[0] = job(shares[0], _Counter(done, progress))
        finally:
            torch.set_num_threads(own_threads)
        patience = max(PATIENCE, 10 * (time.monotonic() - started))
        counted, news = done.value, time.monotonic()
        while len(outputs) < parts:
            # children that had ended before this wait: their results, if any, are all in the queue by now
            ended = [child.exitcode for i, child in enumerate(children, start=1)
                     if i not in outputs and child.exitcode is not None]
            try:
                i, error, output = results.get(timeout=0.1)
            except queue.Empty:
                if ended:
                    raise WorkerFailed(f"a worker process ended without its result ({_exit(ended[0])})"
                                       + (", out of memory perhaps" if ended[0] else ": a bug, please report it"))
                if done.value != counted:
                    counted, news = done.value, time.monotonic()
                elif time.monotonic() - news > patience:
                    raise WorkerFailed(f"a worker process has shown no progress for {patience:.0f} s: it hangs "
                                       f"(a bug, please report it)")
            else:
                if error is not None:
                    raise error
                outputs[i] = torch.load(io.BytesIO(output), weights_only=True)
                news = time.monotonic()
            progress.update(done.value - progress.n)
        return [outputs[i] for i in range(parts)]
    finally:
        for i, child in enumerate(children, start=1):
            if i in outputs:  # done, and exiting: the kernel's teardown of its memory is not instant,
                threading.Thread(target=child.join, daemon=True).start()  # so it is reaped meanwhile
            elif child.pid is not None:
                child.terminate()
                child.join(5)
                if child.exitcode is None:  # stuck where SIGTERM waits
                    child.kill()
                    child.join()


def _exit(code: int) -> str:
    """A child's exit code in words: 'exit code 3', 'killed by SIGKILL'."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _die_with_parent(parent: int) -> None:
    """In a child: have the kernel kill this process when its parent dies (Linux; elsewhere the parent
    ends its children itself); exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


class _Counter:
    """A progress bar's `update`, counting into an integer shared between the processes; in this
    process it also moves `bar` to the total so far."""

    def __init__(self, value, bar=None):
        self.value, self.bar = value, bar

    def update(self, n: int = 1) -> None:
        with self.value.get_lock():
            self.value.value += n
        if self.bar is not None:
            self.bar.update(self.value.value - self.bar.n)


def _child(job, i: int, share, done, threads: int, results, parent: int) -> None:
    """Runs in a forked process: job(share), its result (torch.save bytes) or its exception put on `results`."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: terminate() ends the child
    torch.set_num_threads(threads)
    try:
        buffer = io.BytesIO()
        torch.save(job(share, _Counter(done)), buffer)
        results.put((i, None, buffer.getvalue()))
    except Exception as error:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001
            error = RuntimeError(f"{type(error).__name__}: {error}")
        results.put((i, error, None))
