"""Building the project's C++ code (`stages.native.build_extension`): one build at a time, and a
build that was killed (`kill -9`) does not leave later runs waiting forever."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# A module with nothing in it, in Python's C API: built in a second (torch names it TORCH_EXTENSION_NAME)
EMPTY_MODULE = """
#include <Python.h>
#define JOIN_(a, b) a##b
#define JOIN(a, b) JOIN_(a, b)
#define TEXT_(a) #a
#define TEXT(a) TEXT_(a)
static struct PyModuleDef definition = {PyModuleDef_HEAD_INIT, TEXT(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC JOIN(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&definition); }
"""

BUILD = ("import sys; from stages.native import build_extension; "
         "print(build_extension('spn_test', sys.argv[1]).__name__)")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_a_killed_build_leaves_no_lock_that_later_builds_wait_on(tmp_path):
    source = tmp_path / "empty.cpp"
    source.write_text(EMPTY_MODULE)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}

    def build():
        done = subprocess.run([sys.executable, "-c", BUILD, str(source)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    first = build()
    name = f"spn_test_{torch.backends.cpu.get_cpu_capability().lower()}"
    assert first.stdout.split() == [name] and "building the C++ code of empty.cpp" in first.stderr
    folder = tmp_path / "cache" / name
    (folder / "lock").write_text("")  # what torch's FileBaton leaves behind when its build is killed
    again = build()  # torch alone would wait for that file to go, forever
    assert again.stdout.split() == [name] and "building" not in again.stderr
    assert not (folder / "lock").exists()
