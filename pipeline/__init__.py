"""Pipeline: the command line and the training of each stage; `pipeline.inference` works on a trained
cascade (likelihoods, sampling, evaluation, FID/KID), `pipeline.codec` compresses with it."""


class Terminated(BaseException):
    """SIGTERM as an exception (the command line's handler raises it), which stops a command as Ctrl+C's
    KeyboardInterrupt does: the `finally` blocks run (forked workers are ended, partial files removed)."""


class WorkerFailed(RuntimeError):
    """A forked worker process (`pipeline.inference.processes`) ended without its result, or hangs; the
    message says which."""
