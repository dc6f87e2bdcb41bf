"""The C++ slice sampler (`stages/slice_sampler.cpp`): built once per machine, then loaded.

`torch.utils.cpp_extension.load` compiles the C++ file with this machine's C++ compiler and
ninja the first time it is needed (about 25 s; `make install` does it ahead of use) and keeps
the library in torch's extension cache (TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions), where later runs find it in a fraction of a second; it rebuilds
when the source changes. Where it cannot be built (no compiler), sampling keeps to the Python
step (`IncrementalDecoder`) after a note on stderr saying why.
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

SOURCE = Path(__file__).with_name("slice_sampler.cpp")

# Vector instructions for the compiler, by the level torch itself detected on this CPU. The
# library is built on the machine that runs it, and its name carries the level, so a cache
# shared by different CPUs keeps one build per level.
VECTOR_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"],
                "AVX2": ["-mavx2", "-mfma"]}


@functools.cache
def load():
    """The compiled module (its one function: `sample_slice`), or None where it cannot be built,
    after a line on stderr saying why. Set SPN_NATIVE=0 to skip it (the Python step is used)."""
    if os.environ.get("SPN_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")  # what torch builds with: one command, no arguments
    if not shutil.which(compiler):
        return _not_built(f"no C++ compiler: {compiler} is not on PATH")
    level = torch.backends.cpu.get_cpu_capability()
    name = f"spn_slice_sampler_{level.lower()}"
    if not _built(name):
        print("note: building the C++ slice sampler for this machine, once (about 25 s)", file=sys.stderr)
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger_level = logger.level
    try:
        from torch.utils import cpp_extension
        with warnings.catch_warnings():  # torch's warnings about the compiler: the build's outcome says enough
            warnings.simplefilter("ignore")
            logger.setLevel(logging.ERROR)
            return cpp_extension.load(name, [str(SOURCE)], extra_cflags=["-O3", *VECTOR_FLAGS.get(level, [])],
                                      verbose=False)
    except Exception as error:  # no ninja, a failed build: all mean the same to a user
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        return _not_built(next((line for line in lines if "error:" in line), lines[0])[:160])  # the compiler's
    finally:
        logger.setLevel(logger_level)


def _not_built(reason: str) -> None:
    print(f"note: the C++ slice sampler could not be built ({reason}); sampling uses the Python step, "
          "about 1.5x slower", file=sys.stderr)


def _built(name: str) -> bool:
    """Whether torch's extension cache holds a build of `name` (then loading takes well under a
    second). It asks a private helper of torch's for the folder: if that goes, it says True."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return any(Path(_get_build_directory(name, False)).glob("*.so"))
    except Exception:  # noqa: BLE001 - only the note depends on it
        return True


def usable(device, dtype) -> bool:
    """Whether `sample_slice` can decode a decoder on `device` with weights of `dtype` here:
    float32 on the CPU, with the module built (building it now if need be)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and load() is not None


def sample_slice(fast, start_token: int, noise: torch.Tensor, temperature: float = 1.0):
    """Draw one slice in C++: `fast`, an `IncrementalDecoder` set up for the slice (its weights and
    input terms; B images of T sub-pixels), `noise` (B, T) uniforms. Returns values (B, T) long and
    their log-probability at temperature 1, (B,) nats: the draws of `SliceDecoder.sample` with
    method "cached" from the same noise, up to float rounding. Raises RuntimeError where the
    module cannot be built."""
    module = load()
    if module is None:
        raise RuntimeError("the C++ slice sampler is not available on this machine: use method='fast'")
    layers = [tensor.contiguous() for layer in fast.layers
              for tensor in (*layer.norm1[:2], *layer.qkv, *layer.proj, *layer.norm2[:2], *layer.up, *layer.down)]
    eps = [float(e) for layer in fast.layers for e in (layer.norm1[2], layer.norm2[2])]
    return module.sample_slice(fast.embedding.contiguous(), fast.inputs, noise.float().contiguous(), layers, eps,
                               fast.norm[0], fast.norm[1], float(fast.norm[2]), fast.head[0], fast.head[1],
                               start_token, fast.heads, float(temperature))


def build() -> None:
    """`make install`: build the module now rather than at the first sampling, and say so."""
    print("C++ slice sampler: " + ("ready" if load() is not None else "not built, sampling uses the Python step"))
