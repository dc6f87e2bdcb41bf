"""The project's C++ code, built once per machine and then loaded: the slice sampler
(`stages/slice_sampler.cpp`) here, and any other extension through `build_extension`.

`torch.utils.cpp_extension.load` compiles a C++ file with this machine's C++ compiler and
ninja the first time it is needed (`make install` does it ahead of use) and keeps the library
in torch's extension cache (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), where
later runs load it; it rebuilds when the source changes. Where it
cannot be built (no compiler), the caller keeps to its Python code after a note on stderr
saying why.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from filelock import FileLock, Timeout

SOURCE = Path(__file__).with_name("slice_sampler.cpp")

# Vector instructions for the compiler, by the level torch itself detected on this CPU. The
# library is built on the machine that runs it, and its name carries the level, so a cache
# shared by different CPUs keeps one build per level.
VECTOR_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"],
                "AVX2": ["-mavx2", "-mfma"]}


def build_folder(name: str) -> Path:
    """The folder of torch's extension cache that holds the build of the module `name`."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: the folder torch itself picks
        return Path(_get_build_directory(name, False))
    except Exception:  # noqa: BLE001 - the same rule, for a torch without the helper
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions" / \
            f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
        return Path(root) / name


def build_extension(name: str, source: str | Path, flags=(), what: str | None = None,
                    instead: str = "the Python code is used instead"):
    """Build (once) and load the C++ file `source` as the module `<name>_<CPU level>`, compiled with
    `flags` and the vector instructions of this CPU (VECTOR_FLAGS). Returns the module, or None where
    it cannot be built, after one note on stderr: "`what` could not be built (the reason); `instead`".

    Processes building or loading one module take turns (a lock file beside its build folder, which
    the system releases when its holder dies, even by `kill -9`); holding it, the `lock` file that
    torch leaves in the folder when a build is killed, and on which torch would wait forever, is removed.
    """
    what = what or f"the C++ code of {Path(source).name}"
    compiler = os.environ.get("CXX", "c++")  # what torch builds with: one command, no arguments
    if not shutil.which(compiler):
        return _not_built(what, f"no C++ compiler: {compiler} is not on PATH", instead)
    level = torch.backends.cpu.get_cpu_capability()
    name = f"{name}_{level.lower()}"
    folder = build_folder(name)
    lock = FileLock(f"{folder}.lock")
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger_level = logger.level
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"note: another process is building {what}; waiting for it", file=sys.stderr)
            lock.acquire()
        (folder / "lock").unlink(missing_ok=True)  # torch's, left by a build that was killed: none runs now
        if not any(folder.glob("*.so")):
            print(f"note: building {what} for this machine (once; this can take a minute)", file=sys.stderr)
        from torch.utils import cpp_extension
        with warnings.catch_warnings():  # torch's warnings about the compiler: the build's outcome says enough
            warnings.simplefilter("ignore")
            logger.setLevel(logging.ERROR)
            return cpp_extension.load(name, [str(source)], extra_cflags=["-O3", *flags, *VECTOR_FLAGS.get(level, [])],
                                      build_directory=str(folder), verbose=False)
    except Exception as error:  # no ninja, a failed build: all mean the same to a user
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        return _not_built(what, next((line for line in lines if "error:" in line), lines[0])[:160], instead)
    finally:
        logger.setLevel(logger_level)
        if lock.is_locked:
            lock.release()


def _not_built(what: str, reason: str, instead: str) -> None:
    print(f"note: {what} could not be built ({reason}); {instead}", file=sys.stderr)


@functools.cache
def load():
    """The compiled slice sampler (its one function: `sample_slice`), or None where it cannot be
    built, after a line on stderr saying why. Set SPN_NATIVE=0 to skip it (the Python step is used)."""
    if os.environ.get("SPN_NATIVE", "1") == "0":
        return None
    return build_extension("spn_slice_sampler", SOURCE, what="the C++ slice sampler",
                           instead="sampling uses the slower Python step")


def usable(device, dtype) -> bool:
    """Whether `sample_slice` can decode a decoder on `device` with weights of `dtype` here:
    float32 on the CPU, with the module built (building it now if need be)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and load() is not None


# the fields of each packed type that `sample_slice` passes as arguments of their own, not by name
PASSED_APART = {"PackedDecoder": ("blocks", "heads"), "PackedBlock": ()}


def named_tensors(packed) -> dict[str, torch.Tensor]:
    """A packed block or decoder (`stages.networks.PackedBlock`, `PackedDecoder`) as {field name: tensor},
    the form the C++ loop reads: tensors contiguous, floats (the epsilons) as 0-d float64 tensors, the
    type's fields in PASSED_APART left out. Raises TypeError for a field of another type, which the C++
    loop could not read, and for a type not in PASSED_APART."""
    kind = type(packed).__name__
    if kind not in PASSED_APART:
        raise TypeError(f"{kind} is not a packed block or decoder: the C++ loop reads {', '.join(PASSED_APART)}")
    out = {}
    for name, value in packed._asdict().items():
        if isinstance(value, torch.Tensor):
            out[name] = value.contiguous()
        elif isinstance(value, float):
            out[name] = torch.tensor(value, dtype=torch.float64)
        elif name not in PASSED_APART[kind]:
            raise TypeError(f"{kind}.{name} is a {type(value).__name__}: the C++ loop reads "
                            f"tensors and floats by name only")
    return out


def sample_slice(packed, start_token: int, noise: torch.Tensor, temperature: float = 1.0):
    """Draw one slice in C++: `packed`, a `stages.networks.PackedDecoder` (`SliceDecoder.pack`) for B images
    of T sub-pixels, `noise` (B, T) uniforms. Returns values (B, T) long and their log-probability at
    temperature 1, (B,) nats: the draws of `SliceDecoder.sample` with method "cached" from the same
    noise, up to float rounding. Raises RuntimeError where the module cannot be built or for a packed
    field the C++ loop does not compute, and TypeError (`named_tensors`) for a field it cannot read."""
    module = load()
    if module is None:
        raise RuntimeError("the C++ slice sampler is not available on this machine: use method='fast'")
    return module.sample_slice(named_tensors(packed), [named_tensors(block) for block in packed.blocks],
                               noise.float().contiguous(), start_token, packed.heads, float(temperature))


def build() -> None:
    """`make install`: build the module now rather than at the first sampling, and say so."""
    print("C++ slice sampler: " + ("ready" if load() is not None else "not built, sampling uses the Python step"))
