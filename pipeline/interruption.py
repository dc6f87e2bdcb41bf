"""Ctrl+C and SIGTERM on the command line. A command stops where it is, except inside `held()`: the
short steps that put an output in place or log it to W&B finish first, so that a stop never leaves an
output half replaced and never lands inside W&B's or `logging`'s locks (where it was swallowed and the
process hung). The line that reports a stop says which outputs the command had put in place by then."""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from pipeline import Terminated

CTRL_C: list[bool] = []  # holds True once Ctrl+C has reached this command
WRITTEN: list[Path] = []  # the outputs this command has put in place, in order
_held: list[str] = []  # what the open held() blocks are doing, outermost first
_pending: list[type[BaseException]] = []  # the stop that arrived inside them, raised when the outermost ends


def interrupt(signum, frame):
    """SIGINT handler (Ctrl+C): noted in CTRL_C, then KeyboardInterrupt as Python raises it, or, inside
    `held()`, when the block ends (a second Ctrl+C there raises at once). C code that catches the
    KeyboardInterrupt and raises another error in its place (pyarrow inside `datasets` does) cannot
    make a Ctrl+C look like a fault: the command line reports any error after one as the interruption."""
    CTRL_C.append(True)
    if _held and not _pending:
        _pending.append(KeyboardInterrupt)
        os.write(2, f"\nCtrl+C: stopping once {_held[0]} is done (Ctrl+C again stops at once)\n".encode())
        return
    signal.default_int_handler(signum, frame)


def terminate(signum, frame):
    """SIGTERM handler (a scheduler, `timeout`, a closing shell): stop as on Ctrl+C, raising Terminated
    (inside `held()`, when the block ends); a second SIGTERM ends the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _held and not _pending:
        _pending.append(Terminated)
        return
    raise Terminated


@contextmanager
def held(doing: str):
    """Run the block to its end even if Ctrl+C or SIGTERM arrives (when `interrupt` and `terminate`
    are the handlers, as under `python -m pipeline`); the stop is raised when the block ends without an
    error of its own. `doing` names the step in the one line printed meanwhile, e.g. 'logging to W&B'."""
    _held.append(doing)
    try:
        yield
    finally:
        _held.pop()
        stop = _pending.pop() if _pending and not _held else None
    if stop is not None and not isinstance(sys.exc_info()[1], (KeyboardInterrupt, Terminated)):
        raise stop  # (in a `finally` run by a stop on its way out, that stop says it already)


def put_in_place(path: Path) -> None:
    """Note that the output `path` is now complete where the user looks for it (see `stopped`)."""
    WRITTEN.append(Path(path))


def shown(path: Path) -> str:
    """`path` relative to the working folder when it lies below it, as the user typed it most likely."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def stopped(command: str) -> str:
    """What a Ctrl+C that brought no message of its own (training's names the step) leaves of `command`."""
    if command == "train":
        return "train stopped by Ctrl+C; make the same target again to resume"
    if not WRITTEN:
        return f"{command} stopped by Ctrl+C; what it wrote before is as it was"
    names = list(dict.fromkeys(shown(path) for path in WRITTEN))
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{command} stopped by Ctrl+C after it had written {listed} (complete)"


def reset() -> None:
    """Forget the Ctrl+C, outputs and held blocks of an earlier command in this process."""
    CTRL_C.clear()
    WRITTEN.clear()
    _held.clear()
    _pending.clear()
