"""Native CPU kernels: small C files beside this module, compiled once with the system C compiler into a cache
directory and loaded with ctypes (the call releases the GIL). Where there is no compiler, with
FREEHOLD_NATIVE_KERNELS=0, or when a built object cannot be loaded, the accessors (`paged_attention()` ...) return
None and callers keep their torch path.

The build uses -march=native and OpenMP; the shared object links libgomp by soname, so it shares the OpenMP
runtime torch already loaded (one thread pool). Loading a kernel leaves the process's float environment alone (no
flush-to-zero: see EXTRA_FLAGS).

The cache key covers the source and the headers beside it, the flags, the compiler and the exact target it compiles
for on this machine:
the macros the compiler predefines under these flags (its version and one per instruction-set extension that
-march=native turns on) and the CPU's feature list. A cache directory shared between machines therefore never
hands one machine an object built for instructions it lacks (a SIGILL cannot be caught in-process, so the key is
exact rather than the object probed).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# Attention's exp/max loops vectorize only with reassociation. These are the parts of -funsafe-math-optimizations
# (the same code), not that flag itself: with it GCC links crtfastmath.o, whose constructor turns on flush-to-zero
# and denormals-are-zero for the whole host process. The matmuls keep IEEE order (their fixed summation order is
# what makes a row's result independent of the batch).
EXTRA_FLAGS = {"paged_attention": ["-fno-signed-zeros", "-fno-trapping-math", "-fassociative-math",
                                   "-freciprocal-math"]}
ENV_SWITCH = "FREEHOLD_NATIVE_KERNELS"


def cache_dir() -> Path:
    if "FREEHOLD_CACHE_DIR" in os.environ:
        return Path(os.environ["FREEHOLD_CACHE_DIR"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "freehold" / "kernels"


def _cpu_features() -> str:
    """The CPU's feature list as the kernel reports it (x86 `flags`, arm64 `Features`), or "" where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


@functools.cache
def compile_target(compiler: str) -> str | None:
    """What `compiler` compiles for here under FLAGS: its predefined macros (version, the resolved -march and every
    instruction-set extension it may use) plus the CPU's feature list; None when the compiler does not run."""
    try:
        run = subprocess.run([compiler, *FLAGS, "-E", "-dM", "-x", "c", os.devnull], capture_output=True, text=True)
    except OSError:
        return None
    if run.returncode != 0:
        return None
    return "\n".join(sorted(run.stdout.splitlines()) + [_cpu_features()])


def build(name: str) -> Path | None:
    """Compile `name`.c (once per source, flags, compiler and target) and return the shared object, or None without
    a working compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or sys.platform != "linux":
        return None
    compiled_for = compile_target(compiler)
    if compiled_for is None:
        print(f"freehold: the C compiler {compiler} does not run, using the torch path", file=sys.stderr)
        return None
    source = SOURCE_DIR / f"{name}.c"
    flags = FLAGS + EXTRA_FLAGS.get(name, [])
    headers = [h.read_text() for h in sorted(SOURCE_DIR.glob("*.h"))]  # what the sources #include "..."
    text = "\0".join([source.read_text(), *headers, *flags, compiler, compiled_for])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
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
    """The compiled `name`.c, or None (switched off, no compiler, an unusable cache directory or object ...)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        path = build(name)
        return ctypes.CDLL(str(path)) if path is not None else None
    except OSError as exc:  # an unwritable cache directory, a compiler that cannot run, an object that cannot load
        print(f"freehold: native kernel {name} unavailable ({exc}), using the torch path", file=sys.stderr)
        return None


def _function(name: str, symbol: str, argtypes: list, supported: str | None = None):
    """`symbol` of the compiled `name`.c, or None where the library is unavailable, lacks the symbol, or its
    `supported` function (the build has the instructions the kernel was written for) returns 0."""
    library = _library(name)
    if library is None:
        return None
    try:
        if supported is not None and not _bind(library, supported, [])():
            return None
        return _bind(library, symbol, argtypes)
    except AttributeError as exc:  # an object from elsewhere, or one that does not match this source
        print(f"freehold: native kernel {name} unusable ({exc}), using the torch path", file=sys.stderr)
        return None


def _bind(library: ctypes.CDLL, symbol: str, argtypes: list):
    fn = getattr(library, symbol)
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


@functools.cache
def paged_attention():
    """The `paged_decode_attention` C function (see paged_attention.c), or None."""
    return _function("paged_attention", "paged_decode_attention",
                     [_P, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float,
                      _P, _P, _I64, _I64, _P, _P, _I])


@functools.cache
def int4_matmul():
    """`int4_matmul(x, y, packed, sz, M, N, K)` (see quant_matmul.c), or None (also on CPUs without AVX512-VNNI)."""
    return _function("quant_matmul", "int4_matmul", [_P, _P, _P, _P, _I64, _I64, _I64], "int4_supported")


@functools.cache
def int4_dequantize_t():
    """`int4_dequantize_t(packed, sz, wt, N, K)` (see quant_matmul.c): bf16 W^T from int4_matmul's layout, or None."""
    return _function("quant_matmul", "int4_dequantize_t", [_P, _P, _P, _I64, _I64])


@functools.cache
def bf16_matmul():
    """`bf16_matmul(x, y, w, M, N, K)` (see quant_matmul.c), or None (also on CPUs without AVX512F)."""
    return _function("quant_matmul", "bf16_matmul", [_P, _P, _P, _I64, _I64, _I64], "tables_supported")


@functools.cache
def q8_matmul():
    """`q8_matmul(x, y, codes, scales, M, N, K)` (see quant_matmul.c), or None (also on CPUs without AVX512F)."""
    return _function("quant_matmul", "q8_matmul", [_P, _P, _P, _P, _I64, _I64, _I64], "tables_supported")


@functools.cache
def add_rms_norm():
    """`add_rms_norm(x, residual, w, r, y, rows, dim, eps)` (see rms_norm.c), or None."""
    return _function("rms_norm", "add_rms_norm", [_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float])


@functools.cache
def rope():
    """`rope(x, y, cos, sin, tokens, heads, head_dim, stride)` (see rope.c), or None."""
    return _function("rope", "rope", [_P, _P, _P, _P, _I64, _I64, _I64, _I64])


@functools.cache
def silu_mul():
    """`silu_mul(gu, out, rows, inter)` (see swiglu.c), or None."""
    return _function("swiglu", "silu_mul", [_P, _P, _I64, _I64])


@functools.cache
def silu_mul_bf16():
    """`silu_mul_bf16(gu, out, rows, inter)` (see swiglu.c: bf16 in and out), or None (also without AVX-512 BW/VL)."""
    return _function("swiglu", "silu_mul_bf16", [_P, _P, _I64, _I64], "silu_mul_bf16_supported")


@functools.cache
def decode_layers():
    """`decode_layers(kernels, layers, num_layers, dims, step, x, r)` (see decode_layers.c), or None."""
    return _function("decode_layers", "decode_layers", [_P, _P, _I, _P, _P, _P, _P])


def address(fn) -> int:
    """The C address of a bound kernel (for decode_layers.c, which calls the kernels through pointers)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


def release_openmp_threads() -> bool:
    """Release the calling thread's OpenMP worker threads (OpenMP 5's `omp_pause_resource_all`, soft: libgomp frees
    that thread's pool; a later parallel region on it starts a new one). Returns whether the runtime did it.

    Why: libgomp keeps a pool of workers for every thread that ever ran a parallel region (torch ops and these kernels
    share one runtime). Once the pools hold more threads than there are CPUs, libgomp stops letting idle workers spin
    and puts them to sleep after each region, so every kernel call pays a wake-up: a decode step on the server's
    engine thread, with the model loaded on the main thread, took ~2x as long as on the loading thread
    (docs/performance.md, issue 19). The server calls this on the threads that are done with torch (the loading
    thread before the engine thread starts, the embedding and ingest workers when they go idle)."""
    if sys.platform != "linux":
        return False
    try:
        return ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(1) == 0  # 1 = omp_pause_soft
    except (OSError, AttributeError):  # another OpenMP runtime, or one without OpenMP 5's pause
        return False
