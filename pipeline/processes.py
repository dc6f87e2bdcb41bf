"""Independent work split between forked CPU processes (`Cascade.sample`, the codec's chunks).

On a CPU, cached decoding of small images is a long chain of small tensor operations (a
step of the default model at batch 16: about 50 of them in the C++ loop, of 1 to 10
microseconds each). Intra-op threads pay little at these sizes, so one process keeps about
one core busy. The images are independent given their noise, so `in_processes` cuts them
into W shares and runs the shares side by side, one thread each: the first in this process,
the others in forked processes. The codec's chunks of images are independent too, and it
computes on one thread anyway (`pipeline.codec`).

Forked children inherit the model without copying it. Their results come back as
`torch.save` bytes: torch's own sharing of tensors between processes (file descriptors in
/dev/shm) is not needed for a few kilobytes, and was seen to stall here.
"""
from __future__ import annotations

import io
import multiprocessing
import pickle
import queue
import signal
import threading
import warnings

import torch


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
    stops on it and ends them. An exception in a share is raised here; a child that dies without a
    result (killed) raises RuntimeError. Forking costs more the more memory this process holds (its
    page tables are copied, and torn down when the child exits): about 25 ms for a model loaded to
    sample, tenths of a second for gigabytes.
    """
    parts = worker_count(len(items), device, workers)
    if parts == 1:
        return [job(items, progress)]
    shares = [items[len(items) * i // parts: len(items) * (i + 1) // parts] for i in range(parts)]
    context = multiprocessing.get_context("fork")
    done, results, outputs = context.Value("q", 0), context.Queue(), {}
    threads, own_threads = max(1, torch.get_num_threads() // parts), torch.get_num_threads()
    children = [context.Process(target=_child, args=(job, i, shares[i], done, threads, results), daemon=True)
                for i in range(1, parts)]
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns of fork in a process with threads (torch's);
            # the children only run torch with threads of their own, as a DataLoader's workers do
            warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
            for child in children:
                child.start()
        torch.set_num_threads(threads)
        try:
            outputs[0] = job(shares[0], _Counter(done, progress))
        finally:
            torch.set_num_threads(own_threads)
        while len(outputs) < parts:
            try:
                i, error, output = results.get(timeout=0.1)
            except queue.Empty:
                dead = [child.exitcode for child in children if child.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a worker process died (exit code {dead[0]}), out of memory perhaps")
            else:
                if error is not None:
                    raise error
                outputs[i] = torch.load(io.BytesIO(output), weights_only=True)
            progress.update(done.value - progress.n)
        return [outputs[i] for i in range(parts)]
    finally:
        for i, child in enumerate(children, start=1):
            if i in outputs:  # done, and exiting: the kernel's teardown of its memory takes ~15 ms,
                threading.Thread(target=child.join, daemon=True).start()  # so it is reaped meanwhile
            elif child.pid is not None:
                child.terminate()
                child.join()


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


def _child(job, i: int, share, done, threads: int, results) -> None:
    """Runs in a forked process: job(share), its result (torch.save bytes) or its exception put on `results`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
