"""The small native ops of a step (kernels/rope.c, kernels/rms_norm.c, kernels/swiglu.c's bf16 form) against their
PyTorch definitions."""
import pytest
import torch

from freehold.kernels import native
from freehold.layers.norm import RMSNorm
from freehold.layers.rotary import RotaryEmbedding
from freehold.models.llama import swiglu


@pytest.fixture
def no_native(monkeypatch):
    """Run the body with the PyTorch paths (the switch read on first use, so the caches are cleared)."""
    def switch(on: bool):
        monkeypatch.setenv(native.ENV_SWITCH, "1" if on else "0")
        native.rope.cache_clear()
        native.add_rms_norm.cache_clear()
    yield switch
    switch(True)


@pytest.mark.skipif(native.rope() is None, reason="no C compiler")
def test_rope_kernel_matches_the_rotation(no_native):
    torch.manual_seed(0)
    rotary = RotaryEmbedding(64, 4096, 10000.0)
    qkv = torch.randn(7, 9 + 2 * 3, 64)  # a fused projection's heads; q and k are the first 12
    tables = rotary.tables(torch.tensor([0, 1, 5, 100, 2047, 4095, 3]))
    got = tables.apply(qkv[:, :12])
    no_native(False)
    want = tables.apply(qkv[:, :12])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    # the rotation itself: the pair (x_i, x_{i+32}) turned by angle p * theta_i
    p, i = 100, 5
    theta = 10000.0 ** (-2 * i / 64)
    x1, x2 = qkv[3, 0, i].double(), qkv[3, 0, i + 32].double()
    c, s = torch.cos(torch.tensor(p * theta, dtype=torch.float64)), torch.sin(torch.tensor(p * theta, dtype=torch.float64))
    assert abs(got[3, 0, i].item() - (x1 * c - x2 * s).item()) < 1e-5
    assert abs(got[3, 0, i + 32].item() - (x2 * c + x1 * s).item()) < 1e-5


@pytest.mark.skipif(native.add_rms_norm() is None, reason="no C compiler")
@pytest.mark.parametrize("rows", [1, 300])
def test_add_rms_norm_kernel_matches_the_definition(no_native, rows):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.normal_()
    x, residual = torch.randn(rows, 576), torch.randn(rows, 576) * 3
    y, total = norm.add_and_norm(x, residual)
    assert torch.equal(total, x + residual)
    h = (x + residual).double()
    want = norm.weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    first, none = norm.add_and_norm(x, None)
    assert torch.equal(none, x) and torch.equal(first, norm(x))
    no_native(False)
    y_torch, _ = norm.add_and_norm(x, residual)
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)


# Operands the kernels would read past: each is refused at the Python boundary with an error naming the kernel.
def test_products_with_packed_weights_refuse_activations_of_another_width():
    from freehold.kernels.checks import KernelArgumentError
    from freehold.quant.bf16 import native_bf16_matmul
    from freehold.quant.int4 import native_int4_matmul, pack_int4, quantize_int4
    from freehold.quant.q8 import Q8Blocks, native_q8_matmul
    torch.manual_seed(0)
    q8 = Q8Blocks(torch.randint(-127, 128, (64, 64), dtype=torch.int8), torch.rand(64, 2).half())
    int4 = pack_int4(quantize_int4(torch.randn(128, 64)), "cpu")
    wide = torch.randn(2, 128)  # K = 128 against weights of K = 64: the kernel would read 2x past each row
    calls = [(native.q8_matmul, "Q8_0", lambda: native_q8_matmul(wide, q8)),
             (native.bf16_matmul, "bf16", lambda: native_bf16_matmul(wide.bfloat16(), torch.randn(64, 64).bfloat16())),
             (native.int4_matmul, "int4", lambda: native_int4_matmul(wide, int4.packed, int4.scales_and_zeros, 128))]
    checked = 0
    for accessor, kernel, call in calls:
        if accessor() is not None:  # where the kernel is unavailable the torch path (and its own checks) serves
            with pytest.raises(KernelArgumentError, match=f"native {kernel} matmul kernel: x "):
                call()
            checked += 1
    if "avx512f" in native._cpu_features().split() and native.rope() is not None:
        assert checked >= 2  # the table kernels run on this CPU, so their checks did


@pytest.mark.skipif(native.add_rms_norm() is None, reason="no C compiler")
def test_rms_norm_kernel_refuses_a_weight_of_another_size():
    from freehold.kernels.checks import KernelArgumentError
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.ones(32)  # the kernel would read 32 floats past it
    with pytest.raises(KernelArgumentError, match="RMSNorm"):
        norm.add_and_norm(torch.randn(3, 64), None)


@pytest.mark.skipif(native.rope() is None, reason="no C compiler")
def test_rope_kernel_refuses_tables_for_fewer_tokens():
    from freehold.kernels.checks import KernelArgumentError
    rotary = RotaryEmbedding(64, 4096, 10000.0)
    tables = rotary.tables(torch.tensor([0, 1]))  # two tokens' angles ...
    with pytest.raises(KernelArgumentError, match="RoPE"):
        tables.apply(torch.randn(7, 4, 64))  # ... for seven tokens


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="no OpenMP workers to release with one thread")
def test_releasing_openmp_threads_ends_this_threads_workers_and_later_regions_run_again():
    import os
    tasks = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731  (this process's threads)
    torch.manual_seed(0)
    a = torch.randn(512, 512)
    want = a @ a  # a parallel region: this thread's pool of workers exists
    before = tasks()
    assert native.release_openmp_threads()
    assert tasks() < before
    assert torch.equal(a @ a, want)  # a new pool, the same result


def test_importing_freehold_first_sets_a_short_openmp_spin_unless_told_otherwise():
    """freehold/__init__.py: read by libgomp when torch loads it (a test of the setting, not of its timing)."""
    import os
    import subprocess
    import sys
    code = "import os, freehold, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    for given, want in ((None, "10000"), ("300000", "300000")):
        if given is not None:
            env["GOMP_SPINCOUNT"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


@pytest.mark.skipif(native.silu_mul_bf16() is None, reason="no C compiler, or no AVX-512 BW/VL")
@pytest.mark.parametrize("inter", [1536, 40, 17, 1])  # tails of 8, 1 and 1 lanes
def test_bf16_swiglu_kernel_is_the_fp32_kernel_rounded_to_bf16(inter):
    """bf16 in, bf16 out: silu_mul(gu.float()).to(bfloat16) bit for bit, NaN bits aside (PyTorch's own conversion
    writes two NaN patterns), with special values, rounding ties (sigmoid(g) is exactly 1 above g ~ 17, so rows of
    large g hold exact products), products that overflow to inf and subnormal results; a row alone too."""
    torch.manual_seed(1)
    gate_up = (torch.randn(11, 2 * inter) * torch.logspace(-3, 3, 11)[:, None]).bfloat16()
    specials = torch.tensor([0.0, -0.0, 90.0, -90.0, -87.0, 1e-30, -1e-30, -1e30, 3e38, float("inf"), float("-inf"),
                             float("nan"), 1.0 + 2 ** -7, -(1.0 + 3 * 2 ** -8)]).bfloat16()
    n = min(len(specials), inter)
    gate_up[0, :n] = specials[:n]  # as gate
    gate_up[1, inter:inter + n] = specials[:n]  # as up
    pairs = torch.tensor([[1e-30, 1e-10], [3e38, 2.0], [3e38, -1.5], [2e38, 1.7], [1e-20, -1e-20]]).bfloat16()
    m = min(len(pairs), inter)
    gate_up[2, :m], gate_up[2, inter:inter + m] = pairs[:m, 0], pairs[:m, 1]  # subnormal and infinite results
    out = torch.empty(11, inter, dtype=torch.bfloat16)
    native.silu_mul_bf16()(gate_up.data_ptr(), out.data_ptr(), 11, inter)
    want = swiglu(gate_up.float()).to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    if inter >= len(pairs):  # the pairs reach what they are there for
        assert want[2, 1].isinf() and want[2, 2].isinf() and 0 < want[2, 0].abs() < torch.finfo(torch.bfloat16).tiny
    for i in range(11):  # a row alone
        alone = torch.empty(1, inter, dtype=torch.bfloat16)
        native.silu_mul_bf16()(gate_up[i:i + 1].contiguous().data_ptr(), alone.data_ptr(), 1, inter)
        assert torch.equal(alone.view(torch.int16), out[i:i + 1].view(torch.int16))
