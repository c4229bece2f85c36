"""Packed layers choose their matmul path by each row's kind (freehold.quant.compute), never by the batch size:
a decode row computes the same bits alone or beside hundreds of prompt rows, and a prompt row's result does not
depend on how many other prompt rows share the call. The runner marks the kinds."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from freehold.engine.scheduler import ScheduledChunk
from freehold.engine.sequence import Sequence
from freehold.kernels import native
from freehold.models.gguf_loader import GGUFTensor
from freehold.quant.bf16 import Bf16Linear
from freehold.quant.compute import GEMM_MIN_PROMPT_TOKENS, RowKind, native_bf16_gemm, row_kinds
from freehold.quant.int4 import Int4Linear, int4_groups_from_gguf, pack_int4
from freehold.quant.int8 import Int8Linear, quantize_int8
from freehold.quant.q8 import Q8Linear, q8_blocks_from_gguf
from freehold.types import SamplingParams
from tests.conftest import tiny_engine

N, K, T = 192, 256, 300  # T: more rows than any former "prefill-sized" threshold (128, 192, 256)


def gguf(qtype: GGMLQuantizationType) -> GGUFTensor:
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)
    return GGUFTensor("w", qtype, (N, K), quantize(w, qtype))


def make_layer(kind: str) -> torch.nn.Module:
    if kind == "int4":  # the default weights' layers: a GGUF Q4_1 tensor
        return Int4Linear(pack_int4(int4_groups_from_gguf(gguf(GGMLQuantizationType.Q4_1)), "cpu"))
    if kind == "q8_0":  # the default weights' LM head
        return Q8Linear(q8_blocks_from_gguf(gguf(GGMLQuantizationType.Q8_0)))
    if kind == "int8":
        return Int8Linear(quantize_int8(torch.randn(N, K)))
    return Bf16Linear(torch.randn(N, K).bfloat16())


LAYERS = ["int4", "q8_0", "int8", "bf16"]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("kind", LAYERS)
def test_a_decode_row_computes_the_same_alone_and_beside_a_large_prompt_chunk(kind):
    layer, x = make_layer(kind), torch.randn(T, K)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[0, 1, 150]] = True  # two decode steps first, and a generated token inside a recomputed chunk
    with torch.inference_mode(), row_kinds(mask):
        mixed = layer(x)
    for i in (0, 1, 150):
        with torch.inference_mode(), row_kinds(RowKind.DECODE):
            assert torch.equal(layer(x[i:i + 1])[0], mixed[i]), f"decode row {i}"
    with torch.inference_mode(), row_kinds(RowKind.PROMPT):
        assert torch.equal(layer(x[~mask]), mixed[~mask])


@pytest.mark.skipif(not native_bf16_gemm(), reason="no native bf16 GEMM: prompt rows take the kernels too")
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_prompt_rows_do_not_depend_on_how_many_share_the_call(kind):
    """What makes prompt rows batch-invariant: this host's bf16 GEMM sums a row the same way at any M."""
    layer, x = make_layer(kind), torch.randn(700, K)
    with torch.inference_mode():
        full = layer(x)  # outside any row_kinds block every row is a prompt row
        for start, m in ((0, 1), (3, 7), (100, 64), (200, 333), (1, 699)):
            assert torch.equal(layer(x[start:start + m]), full[start:start + m]), (start, m)


@pytest.mark.skipif(native.int4_matmul() is None or not native_bf16_gemm(), reason="one path only on this host")
def test_the_two_paths_really_differ():
    """Decode rows take the exact-to-fp32 kernel, prompt rows bf16: the kind matters, so the tests above can fail."""
    layer, x = make_layer("int4"), torch.randn(4, K)
    with torch.inference_mode(), row_kinds(RowKind.DECODE):
        kernel = layer(x)
    with torch.inference_mode(), row_kinds(RowKind.PROMPT):
        gemm = layer(x)
    assert not torch.equal(kernel, gemm)


def test_row_kinds_blocks_do_not_nest_and_masks_must_cover_the_call():
    layer = make_layer("int4")
    with row_kinds(RowKind.DECODE), pytest.raises(RuntimeError, match="do not nest"):
        with row_kinds(RowKind.PROMPT):
            pass
    mask = torch.tensor([True, False, False])
    with torch.inference_mode(), row_kinds(mask), pytest.raises(AssertionError, match="flat batch"):
        layer(torch.randn(5, K))


def sequence(num_prompt: int, num_output: int = 0, num_cached: int = 0) -> Sequence:
    seq = Sequence("r", 0, list(range(1, num_prompt + 1)), SamplingParams(), arrival=0)
    seq.output_token_ids, seq.num_cached_tokens = list(range(num_output)), num_cached
    seq.block_table = list(range(-(-(num_prompt + num_output) // 16)))
    return seq


@pytest.mark.parametrize("rows_attend_alone", [False, True])
def test_runner_marks_decode_rows_by_each_rows_own_sequence(rows_attend_alone):
    runner = tiny_engine().runner
    runner.rows_attend_alone = rows_attend_alone  # True: every chunk here goes to the kernel, packed in order
    long, n = GEMM_MIN_PROMPT_TOKENS, GEMM_MIN_PROMPT_TOKENS + 100
    chunks = (ScheduledChunk(sequence(long, 3), 0, long + 3),  # recomputed after preemption: prompt + 3 outputs
              ScheduledChunk(sequence(2, 1), 2, 1),  # a decode step
              ScheduledChunk(sequence(20), 0, 20),  # a short prompt: decode rows too
              ScheduledChunk(sequence(n, num_cached=101), 101, n - 101),  # long, but 101 tokens came from the cache
              ScheduledChunk(sequence(n), 0, 50))  # the first chunk of a long prompt
    rows = [[False] * long + [True] * 3, [True], [True] * 20, [True] * (n - 101), [False] * 50]  # per chunk
    order = range(5) if rows_attend_alone else (1, 0, 2, 3, 4)  # else decode chunks are packed first
    assert runner.prepare_input(chunks).decode_rows.tolist() == [r for i in order for r in rows[i]]
