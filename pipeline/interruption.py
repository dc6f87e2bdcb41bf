"""Ctrl+C and SIGTERM on the command line. A command stops where it is, except inside `held()`: the
short steps that put an output in place or log it to W&B finish first, so that a stop never leaves an
output half replaced and never lands inside W&B's or `logging`'s locks (where it was swallowed and the
process hung). The line that reports a stop says which outputs the command had put in place by then."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import Terminated

CTRL_C: list[bool] = []  # holds True once Ctrl+C has reached this command
WRITTEN: list[Path] = []  # the outputs this command has put in place, in order, as the command named them
_held: list[tuple[str, bool]] = []  # (what, firm) of the open held() blocks, outermost first
_pending: list[type[BaseException]] = []  # the stop that arrived inside them, raised when the outermost ends
SAME_STOP_S = 1.0  # a SIGTERM this soon after the first is the same stop, sent twice (`terminate`)


def say(line: str) -> None:
    """One line on stderr from a signal handler: os.write, which buffers nothing that the interrupted code
    may be in the middle of; a closed or broken stderr (`| tee` ended by the same Ctrl+C) is let be."""
    try:
        os.write(2, f"\n{line}\n".encode())
    except OSError:
        pass


def _hold(stop: type[BaseException], name: str) -> bool:
    """Note `stop` as pending when a held() block is open; whether it was (or is to be) held."""
    if not _held:
        return False
    firm = any(firm for _, firm in _held)
    if not _pending:
        _pending.append(stop)
        again = "" if firm else f" ({name} again{' a second later' if stop is Terminated else ''} stops at once)"
        say(f"{name}: stopping once {_held[0][0]} is done{again}")
        return True
    return firm  # a second one: at once, except in the instant of a rename


def interrupt(signum, frame):
    """SIGINT handler (Ctrl+C): noted in CTRL_C, then KeyboardInterrupt as Python raises it, or, inside
    `held()`, when the block ends (a second Ctrl+C there raises at once, unless the block is firm). C code
    that catches the KeyboardInterrupt and raises another error in its place (pyarrow inside `datasets`
    does) cannot make a Ctrl+C look like a fault: the command line reports any error after one as the
    interruption."""
    CTRL_C.append(True)
    if not _hold(KeyboardInterrupt, "Ctrl+C"):
        signal.default_int_handler(signum, frame)


def terminate(signum, frame):
    """SIGTERM handler (a scheduler, `timeout`, a closing shell): stop as on Ctrl+C, raising Terminated
    (inside `held()`, when the block ends). For SAME_STOP_S after it SIGTERM is ignored: a copy of the
    same stop (the whole process group was sent SIGTERM, and make passes its own copy on to the command)
    must not cut the command's clean-up and its line short. After that a SIGTERM ends the process at once,
    the way to end a stuck one (`_end_at_once_after`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_end_at_once_after, args=(SAME_STOP_S,), name="sigterm-window", daemon=True).start()
    if not _hold(Terminated, "SIGTERM"):
        raise Terminated


def _end_at_once_after(seconds: float) -> None:
    """Give SIGTERM its default action (the process ends at once) after `seconds`, unless the command set
    its own handling meanwhile. Python's `signal.signal` works only in the main thread, which may be stuck
    in C code by then, so this thread sets it through the C library's `signal()`."""
    time.sleep(seconds)
    if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        return
    try:
        libc = ctypes.CDLL(None)
        libc.signal.argtypes, libc.signal.restype = (ctypes.c_int, ctypes.c_void_p), ctypes.c_void_p
        libc.signal(int(signal.SIGTERM), None)  # None: SIG_DFL
    except (OSError, AttributeError):  # no C library to call: SIGTERM stays ignored, SIGKILL still ends it
        pass


@contextmanager
def held(doing: str, firm: bool = False):
    """Run the block to its end even if Ctrl+C or SIGTERM arrives (when `interrupt` and `terminate`
    are the handlers, as under `python -m pipeline`; otherwise nothing changes); the stop is raised when
    the outermost block ends, in place of an error of the block's own (a stop already on its way out is
    left to say it). A second Ctrl+C stops at once, unless `firm` (for renames: an instant, and cutting
    them would lose an output). `doing` names the step in the one line printed meanwhile, e.g.
    'logging the sample run to W&B'."""
    _held.append((doing, firm))
    try:
        yield
    finally:
        _held.pop()
        stop = _pending.pop() if _pending and not _held else None
        if stop is not None and not isinstance(sys.exc_info()[1], (KeyboardInterrupt, Terminated)):
            raise stop


def put_in_place(path: str | Path) -> None:
    """Note that the output `path` (as the command named it) is now complete (see `stopped`)."""
    WRITTEN.append(Path(path))


def written() -> str:
    """The outputs this command has put in place, as its stop line names them ('' for none)."""
    names = list(dict.fromkeys(str(path) for path in WRITTEN))
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def stopped(command: str) -> str:
    """What a Ctrl+C that brought no message of its own (training's names the step) leaves of `command`."""
    if command == "train":
        return "train stopped by Ctrl+C; make the same target again to resume"
    if not WRITTEN:
        return f"{command} stopped by Ctrl+C; what it wrote before is as it was"
    return f"{command} stopped by Ctrl+C after it had written {written()} (complete)"


def terminated(command: str) -> str:
    """The line for a SIGTERM that brought no message of its own (a trained stage's names its checkpoint) and
    stopped `command`: it names the outputs the command had put in place, as on Ctrl+C."""
    if command == "train":
        return "terminated (SIGTERM); make the same target again to resume"
    return "terminated (SIGTERM)" + (f" after {command} had written {written()} (complete)" if WRITTEN else "")


def reset() -> None:
    """Forget the Ctrl+C, outputs and held blocks of an earlier command in this process."""
    CTRL_C.clear()
    WRITTEN.clear()
    _held.clear()
    _pending.clear()
