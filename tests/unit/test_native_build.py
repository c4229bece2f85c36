"""How the native kernels are built and loaded: loading one leaves the host's float semantics alone, the cache key
follows the instruction set the compiler targets (not the CPU's name), a broken cached object falls back to the
torch path, and kernels written for AVX512 are not used as scalar loops on CPUs without it."""
import json
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from freehold.kernels import native

COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(COMPILER is None or sys.platform != "linux", reason="no C compiler")
X86 = platform.machine() in ("x86_64", "AMD64")

# Runs in a fresh interpreter: what a host process sees before and after it loads every kernel.
FLOAT_MODE_PROBE = textwrap.dedent("""
    import ctypes, json, platform, sys
    import numpy as np
    import torch
    from freehold.kernels import native

    def mxcsr():
        if platform.machine() != "x86_64":
            return None
        env = ctypes.create_string_buffer(64)  # glibc's x86-64 fenv_t: 32 bytes, MXCSR at offset 28
        ctypes.CDLL("libm.so.6").fegetenv(env)
        return int.from_bytes(env.raw[28:32], "little") & ~0x3F  # the control bits, not the sticky exception flags

    def probe():
        tiny = 1e-40  # subnormal in fp32; flush-to-zero / denormals-are-zero turn these into 0
        return {"torch": (torch.tensor([tiny]) * 1.0).item(), "numpy": float(np.float32(tiny) * np.float32(1.0)),
                "torch_in": (torch.tensor([tiny]) + 0.0).item() != 0.0, "mxcsr": mxcsr()}

    before = probe()
    names = sorted(p.stem for p in native.SOURCE_DIR.glob("*.c"))
    loaded = {name: native._library(name) is not None for name in names}
    print(json.dumps({"before": before, "after": probe(), "loaded": loaded}))
""")

FTZ, DAZ = 1 << 15, 1 << 6  # MXCSR bits


@needs_compiler
def test_loading_every_kernel_keeps_subnormals():
    run = subprocess.run([sys.executable, "-c", FLOAT_MODE_PROBE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loaded"] and all(result["loaded"].values()), result["loaded"]  # every .c file was loaded
    before, after = result["before"], result["after"]
    assert before["torch"] != 0.0 and before["numpy"] != 0.0  # the probe can see a flush
    assert after["torch"] == before["torch"] and after["numpy"] == before["numpy"] and after["torch_in"]
    if X86:
        assert after["mxcsr"] == before["mxcsr"] and not after["mxcsr"] & (FTZ | DAZ)


# A compiler that is the system one except for the -march it targets: one path, one CPU name, several targets.
RETARGET = """#!/bin/sh
for arg; do shift; [ "$arg" = -march=native ] && arg="-march=$FREEHOLD_TEST_MARCH"; set -- "$@" "$arg"; done
exec {compiler} "$@"
"""
MARCHES = {"x86_64": ("x86-64", "x86-64-v3"), "aarch64": ("armv8-a", "armv8.2-a")}.get(platform.machine())
ACCESSORS = (native.paged_attention, native.int4_matmul, native.bf16_matmul, native.q8_matmul, native.add_rms_norm,
             native.rope)


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """Kernels built into an empty cache directory; `use(march)` makes the compiler target `march` instead of this
    machine. The accessors and the compiler probe are memoized per process, so each use starts them afresh."""
    wrapper = tmp_path / "cc"
    wrapper.write_text(RETARGET.format(compiler=COMPILER))
    wrapper.chmod(0o755)
    monkeypatch.setenv("FREEHOLD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(native.ENV_SWITCH, "1")

    def forget():
        native.compile_target.cache_clear()
        for accessor in ACCESSORS:
            accessor.cache_clear()

    def use(march: str | None):
        if march is None:
            monkeypatch.delenv("CC", raising=False)
        else:
            monkeypatch.setenv("CC", str(wrapper))
            monkeypatch.setenv("FREEHOLD_TEST_MARCH", march)
        forget()
    yield use
    monkeypatch.undo()
    forget()


@needs_compiler
@pytest.mark.skipif(MARCHES is None, reason="no two known -march values for this machine")
def test_the_cache_key_follows_the_target_not_the_cpu_name(fresh_native):
    built = {}
    for march in MARCHES:  # the same compiler path and /proc/cpuinfo, two instruction sets
        fresh_native(march)
        built[march] = native.build("rope")
    assert built[MARCHES[0]] != built[MARCHES[1]] and all(path.is_file() for path in built.values())
    fresh_native(MARCHES[0])
    assert native.build("rope") == built[MARCHES[0]]  # the same target finds its object again


@needs_compiler
@pytest.mark.skipif(not X86, reason="the table kernels are written for x86 AVX512")
def test_table_kernels_only_where_their_instructions_are(fresh_native):
    fresh_native("x86-64-v3")  # AVX2, no AVX512: the kernels would be scalar loops, slower than PyTorch's GEMM
    assert native.q8_matmul() is None and native.bf16_matmul() is None and native.int4_matmul() is None
    assert native.rope() is not None  # the portable kernels still build
    fresh_native(None)
    flags = native._cpu_features().split()
    if "avx512f" in flags:
        assert native.q8_matmul() is not None and native.bf16_matmul() is not None


@needs_compiler
def test_a_cached_object_that_cannot_be_used_falls_back_to_torch(fresh_native, capsys):
    fresh_native(None)
    rope_path, norm_path = native.build("rope"), native.build("rms_norm")

    def replace_rope(content: bytes):  # a new file, as a builder writes one: the loaded one stays intact
        partial = rope_path.with_suffix(".partial")
        partial.write_bytes(content)
        partial.replace(rope_path)
        fresh_native(None)

    replace_rope(b"\x7fELF truncated")  # does not load
    assert native.rope() is None
    replace_rope(norm_path.read_bytes())  # loads, but has no `rope` symbol
    assert native.rope() is None
    assert "native kernel rope unusable" in capsys.readouterr().err  # said, not raised
    assert native.add_rms_norm() is not None  # other kernels are unaffected
