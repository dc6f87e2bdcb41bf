"""Pipeline: the command line, training of each stage, the cascade, sampling and evaluation."""


class Terminated(BaseException):
    """SIGTERM as an exception (the command line's handler raises it), which stops a command as Ctrl+C's
    KeyboardInterrupt does: the `finally` blocks run (forked workers are ended, partial files removed)."""


class WorkerFailed(RuntimeError):
    """A forked worker process (`pipeline.processes`) ended without its result, or hangs; the message says which."""
