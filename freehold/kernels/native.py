"""Native CPU kernels: small C files beside this module, compiled once with the system C compiler into a cache
directory and loaded with ctypes (the call releases the GIL). Where there is no compiler, or with
FREEHOLD_NATIVE_KERNELS=0, `paged_attention()` returns None and callers keep their torch path.

The build uses -march=native and OpenMP; the shared object links libgomp by soname, so it shares the OpenMP
runtime torch already loaded (one thread pool). The cache key covers the source, the flags and the CPU model.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fopenmp", "-funsafe-math-optimizations", "-fno-finite-math-only",
         "-shared", "-fPIC"]
ENV_SWITCH = "FREEHOLD_NATIVE_KERNELS"


def cache_dir() -> Path:
    if "FREEHOLD_CACHE_DIR" in os.environ:
        return Path(os.environ["FREEHOLD_CACHE_DIR"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "freehold" / "kernels"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("model name", "flags"))), "")


def build(name: str) -> Path | None:
    """Compile `name`.c (once per source/flags/CPU) and return the shared object, or None without a compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or sys.platform != "linux":
        return None
    source = SOURCE_DIR / f"{name}.c"
    key = hashlib.sha256("\0".join([source.read_text(), *FLAGS, compiler, _cpu_model()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    run = subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial), "-lm"], capture_output=True, text=True)
    if run.returncode != 0:
        partial.unlink(missing_ok=True)
        print(f"freehold: native kernel {name} did not compile, using the torch path:\n{run.stderr[-2000:]}",
              file=sys.stderr)
        return None
    partial.replace(target)  # atomic: concurrent builders each write their own file
    return target


@functools.cache
def paged_attention():
    """The `paged_decode_attention` C function (see paged_attention.c), or None."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        path = build("paged_attention")
    except OSError as exc:  # an unwritable cache directory, a compiler that cannot run ...
        print(f"freehold: native kernel unavailable ({exc}), using the torch path", file=sys.stderr)
        return None
    if path is None:
        return None
    fn = ctypes.CDLL(str(path)).paged_decode_attention
    p, i = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [p, p, p, p, p, p, i, p, p, i, i, i, i, i, i, ctypes.c_float]
    fn.restype = i
    return fn
