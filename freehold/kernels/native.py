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
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# Attention's exp/max loops vectorize only with reassociation; the matmuls keep IEEE order (their fixed summation
# order is what makes a row's result independent of the batch).
EXTRA_FLAGS = {"paged_attention": ["-funsafe-math-optimizations", "-fno-finite-math-only"]}
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
    flags = FLAGS + EXTRA_FLAGS.get(name, [])
    key = hashlib.sha256("\0".join([source.read_text(), *flags, compiler, _cpu_model()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    run = subprocess.run([compiler, *flags, str(source), "-o", str(partial), "-lm"], capture_output=True, text=True)
    if run.returncode != 0:
        partial.unlink(missing_ok=True)
        print(f"freehold: native kernel {name} did not compile, using the torch path:\n{run.stderr[-2000:]}",
              file=sys.stderr)
        return None
    partial.replace(target)  # atomic: concurrent builders each write their own file
    return target


def _library(name: str) -> ctypes.CDLL | None:
    """The compiled `name`.c, or None (switched off, no compiler, an unusable cache directory ...)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        path = build(name)
        return ctypes.CDLL(str(path)) if path is not None else None
    except OSError as exc:  # an unwritable cache directory, a compiler that cannot run ...
        print(f"freehold: native kernel {name} unavailable ({exc}), using the torch path", file=sys.stderr)
        return None


def _function(library: ctypes.CDLL | None, symbol: str, argtypes: list):
    if library is None:
        return None
    fn = getattr(library, symbol)
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


@functools.cache
def paged_attention():
    """The `paged_decode_attention` C function (see paged_attention.c), or None."""
    return _function(_library("paged_attention"), "paged_decode_attention",
                     [_P, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float,
                      _P, _P, _I64, _I64, _P])


@functools.cache
def int4_matmul():
    """`int4_matmul(x, y, packed, sz, M, N, K)` (see quant_matmul.c), or None (also on CPUs without AVX512-VNNI)."""
    library = _library("quant_matmul")
    if library is None or not _function(library, "int4_supported", [])():
        return None
    return _function(library, "int4_matmul", [_P, _P, _P, _P, _I64, _I64, _I64])


@functools.cache
def bf16_matmul():
    """`bf16_matmul(x, y, w, M, N, K)` (see quant_matmul.c), or None."""
    return _function(_library("quant_matmul"), "bf16_matmul", [_P, _P, _P, _I64, _I64, _I64])


@functools.cache
def q8_matmul():
    """`q8_matmul(x, y, codes, scales, M, N, K)` (see quant_matmul.c), or None."""
    return _function(_library("quant_matmul"), "q8_matmul", [_P, _P, _P, _P, _I64, _I64, _I64])


@functools.cache
def add_rms_norm():
    """`add_rms_norm(x, residual, w, r, y, rows, dim, eps)` (see rms_norm.c), or None."""
    return _function(_library("rms_norm"), "add_rms_norm", [_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float])


@functools.cache
def rope():
    """`rope(x, y, cos, sin, tokens, heads, head_dim, stride)` (see rope.c), or None."""
    return _function(_library("rope"), "rope", [_P, _P, _P, _P, _I64, _I64, _I64, _I64])
