"""The one command line of the project: `python -m pipeline <command> ...` (the Makefile calls it)."""
from __future__ import annotations

import argparse
import atexit
import os
import re
import signal
import sys
from pathlib import Path

from pipeline import Terminated, WorkerFailed
from pipeline.interruption import CTRL_C, interrupt, reset, say, stopped, terminate, terminated
from stages.plan import ORDER


def positive_int(text: str) -> int:
    """A command-line count of 1 or more; argparse.ArgumentTypeError (one line) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: use 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number: use 1 or more")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line (what is wrong, where to read more) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help):
        c = sub.add_parser(name, help=help)
        c.add_argument("--exp", default=None, help="experiment name in conf/experiments/ or a YAML path")
        c.add_argument("--run-dir", default=None, help="folder of the run (default runs/<exp>)")
        return c

    command("stages", "print the stages of the experiment's cascade")
    command("data", "prepare the experiment's data cache once")
    train = command("train", "train (or resume) one stage")
    train.add_argument("--stage", required=True, choices=ORDER)
    train.add_argument("overrides", nargs="*", help="LightningCLI overrides, e.g. --trainer.max_steps=100")
    for name, help in (("sample", "draw new images through the cascade"),
                       ("upscale", "super-resolution: INPUT is slice 0, draw the other slices"),
                       ("deepen", "bit-depth expansion: keep INPUT's high bits, draw the low bits")):
        c = command(name, help)
        c.add_argument("--n", type=positive_int, default=16, help="number of images")
        c.add_argument("--temperature", type=float, default=1.0)
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--batch", type=positive_int, default=16, help="images drawn at once (the images depend on it)")
        if name != "sample":
            c.add_argument("--input", required=True, help="the image to condition on (PNG)")
    quality = command("quality", "FID and KID of images drawn from the cascade against the test split")
    quality.add_argument("--n", type=positive_int, default=500, help="number of images drawn (FID_N)")
    quality.add_argument("--temperature", type=float, default=1.0)
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--batch", type=positive_int, default=64, help="images drawn at once")
    quality.add_argument("--inception", default=None, help="torch-fidelity's Inception-v3 weights file: also FID/KID "
                                                           "in its features (never downloaded)")
    for name, help in (("compress", "losslessly compress images with the cascade into one file"),
                       ("decompress", "restore the images of a file written by compress")):
        c = command(name, help)
        c.add_argument("--input", required=True, help="compress: a folder of images or an .npz; decompress: a file")
        c.add_argument("--out", required=True, help="compress: the file to write; decompress: a new folder or .npz")
    evaluate = command("evaluate", "exact bits/dim of the cascade and of each stage")
    evaluate.add_argument("--images", default=None, help=".npz with 'images', or a folder of images")
    evaluate.add_argument("--batch", type=positive_int, default=250)
    evaluate.add_argument("--skip-compress", action="store_true", help="leave out the real compressed size")
    evaluate.add_argument("--skip-codecs", action="store_true", help="leave out PNG, WebP and JPEG-XL")
    return p


# what to lower when a command runs out of memory
LESS_MEMORY = {"sample": "lower BATCH (and N)", "upscale": "lower BATCH (and N)", "deepen": "lower BATCH (and N)",
               "quality": "lower BATCH (and FID_N)",
               "evaluate": "lower BATCH (make evaluate BATCH=..., 250 by default)",
               "compress": "compress the images in parts (INPUT: a few at a time)",
               "decompress": "decompress on a machine with more memory",
               "train": "lower the batch size (ARGS=\"--data.batch_size=...\")"}


def out_of_memory(error: BaseException) -> str | None:
    """For an allocation that failed (torch's CPU or GPU allocator, numpy, Python): how much was asked
    for, in words ('' if it does not say); None for any other error."""
    text = str(error)
    if not (isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocate (\d+) bytes", text)  # torch's CPU allocator
    if asked:
        return f"{int(asked.group(1)) / 2**30:,.1f} GiB asked for"
    asked = re.search(r"(?i)allocate ([\d.]+ ?[KMGTP]i?B)", text)  # CUDA's and numpy's
    return f"{asked.group(1)} asked for" if asked else ""


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def report(line: str) -> None:
    """The command's last line, on stderr. A stderr that is gone (`2>&1 | tee log`, the tee ended by the
    same Ctrl+C) is pointed at /dev/null instead, so that neither this line nor Python's flushing at exit
    turns the command's exit status into 1 or 120."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        to_devnull(sys.stderr)


def to_devnull(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null (its reader is gone), so later writes and flushes
    to it succeed and lose nothing anyone could read."""
    devnull, fd = os.open(os.devnull, os.O_WRONLY), stream.fileno()
    if devnull != fd:  # (a descriptor already closed gets its own number back: /dev/null is in place)
        os.dup2(devnull, fd)
        os.close(devnull)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    previous = signal.signal(signal.SIGTERM, terminate)
    reset()
    keyboard = signal.getsignal(signal.SIGINT)
    if keyboard is signal.default_int_handler:  # Ctrl+C ignored (a background job) stays ignored
        signal.signal(signal.SIGINT, interrupt)
    try:
        return run(argv)
    except Terminated as stop:
        report(str(stop) or terminated(argv[0] if argv else "pipeline"))
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keyboard is signal.default_int_handler:
            signal.signal(signal.SIGINT, keyboard)


def dispatch(args) -> None:
    """Run the command `args.command` with its arguments."""
    from pipeline.config import DEFAULT_EXPERIMENT

    args.run_dir = args.run_dir or f"runs/{Path(args.exp or DEFAULT_EXPERIMENT).stem}"  # EXP may be a YAML path
    if args.command == "stages":
        from pipeline.config import load_experiment, stage_names

        print(" ".join(stage_names(load_experiment(args.exp, arguments=False))))  # at every make call: fast
    elif args.command == "data":
        from pipeline.data import main as run
        run(args)
    elif args.command == "train":
        from pipeline.train import main as run
        run(args)
    elif args.command in ("sample", "upscale", "deepen"):
        from pipeline.inference import sample
        {"sample": sample.main, "upscale": sample.upscale, "deepen": sample.deepen}[args.command](args)
    elif args.command in ("compress", "decompress"):
        from pipeline.codec import compress
        {"compress": compress.compress_command, "decompress": compress.decompress_command}[args.command](args)
    elif args.command == "evaluate":
        from pipeline.inference.evaluate import main as run
        run(args)
    elif args.command == "quality":
        from pipeline.inference.quality import main as run
        run(args)


def run(argv) -> int:
    if not sys.stderr.isatty():  # a log file: no redrawn progress bars from `datasets`
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # LightningCLI overrides start with "--" too: everything after the known flags is theirs
    args, rest = parser().parse_known_args(argv)
    if rest:
        if args.command != "train":
            parser().error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*getattr(args, "overrides", []), *rest]
    try:
        try:
            dispatch(args)
        except Exception as error:
            if not CTRL_C:
                raise
            raise KeyboardInterrupt(stopped(args.command)) from error
    except (ValueError, OSError) as error:  # a user's mistake or a missing file, network or disk: one line
        report(f"error: {one_line(error)}")
        return 2
    except ImportError as error:
        report(f"error: {one_line(error)}: install the project's packages with `make install`")
        return 2
    except WorkerFailed as error:  # killed for memory, most likely, when killed
        remedy = f"; if so, {LESS_MEMORY.get(args.command, 'free memory')}" if "memory" in str(error) else ""
        report(f"error: {one_line(error)}{remedy}")
        return 1
    except (MemoryError, RuntimeError) as error:
        asked = out_of_memory(error)
        if asked is None:
            raise
        report(f"error: out of memory{f' ({asked})' if asked else ''}: {LESS_MEMORY.get(args.command, 'free memory')}")
        return 1
    except KeyboardInterrupt as stop:
        report(f"interrupted: {str(stop) or stopped(args.command)}")
        return 130
    return 0


def exit_with(status: int, command: str = "the command") -> None:
    """End the process with `status` once the command is done. A Ctrl+C or SIGTERM during the exit hooks
    (W&B's stop its service) ends the process at once with that status, rather than raising inside a hook
    (a traceback); `ignore_stops` then keeps one during Python's last second of teardown from killing
    the process by SIGINT or SIGTERM, which made a finished command look interrupted, with no line saying why."""
    def ended_already(signum, frame):  # make, stopped by the same signal, exits 130 or 143 and says nothing
        if status not in (130, 143):  # (a stopped command has said so: this is the same stop again)
            name = "Ctrl+C" if signum == signal.SIGINT else "SIGTERM"
            say(f"{name} came after {command} had ended, with status {status}: what it wrote stands")
        os._exit(status)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, ended_already)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # as Ctrl+C (make's copy of a SIGTERM comes late)
        signal.signal(signal.SIGTERM, ended_already)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # gone, as in `report`
            to_devnull(stream)
    sys.exit(status)


def ignore_stops() -> None:
    """Ignore Ctrl+C and SIGTERM from now on, the command's status set (Python leaves an ignored signal so
    through its teardown)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    atexit.register(ignore_stops)  # registered before the libraries' hooks: it runs after them all
    status = 130
    try:
        status = main()
    except KeyboardInterrupt:  # in the instant between main's own handling and exit_with's
        pass
    except Terminated:  # the same instant, for SIGTERM
        status = 143
    exit_with(status, next((a for a in sys.argv[1:2] if not a.startswith("-")), "the command"))
