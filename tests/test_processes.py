"""Work split between forked CPU processes (`pipeline.processes`, used by `Cascade.sample`)."""
import io
import multiprocessing

import pytest
import torch

from pipeline.processes import in_processes, worker_count
from pipeline.progress import PlainBar, progress_bar


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
