"""The native paged decode-attention kernel equals gather + SDPA (the torch path) for every cache dtype, reads
blocks in any order, and gives a sequence the same result whatever else is in the batch."""
import pytest
import torch

from freehold.kernels import native
from freehold.kernels.checks import KernelArgumentError
from freehold.layers.attention import AttentionMetadata, KVCache, _decode_attention
from freehold.quant.kv_int8 import Int8KVCache

pytestmark = pytest.mark.skipif(native.paged_attention() is None, reason="no C compiler: the torch path is used")

BLOCKS, BS, KVH, D, H = 40, 16, 3, 64, 9


def filled(kind: str):
    torch.manual_seed(0)
    cache = (Int8KVCache(1, BLOCKS, BS, KVH, D, torch.float32, "cpu") if kind == "int8"
             else KVCache(1, BLOCKS, BS, KVH, D, {"fp32": torch.float32, "bf16": torch.bfloat16}[kind], "cpu"))
    cache.write(0, torch.arange(BLOCKS * BS), torch.randn(BLOCKS * BS, KVH, D) * 2, torch.randn(BLOCKS * BS, KVH, D))
    return cache


def decode(cache, q, tables, lens, use_native: bool, monkeypatch, runs=None):
    monkeypatch.setenv(native.ENV_SWITCH, "1" if use_native else "0")
    native.paged_attention.cache_clear()
    try:
        runs = torch.tensor(runs) if runs is not None else None
        meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), len(lens), tables, lens, (), runs)
        return _decode_attention(0, q, cache, meta)
    finally:
        native.paged_attention.cache_clear()


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_kernel_matches_gather_and_sdpa(kind, monkeypatch):
    cache = filled(kind)
    lens = torch.tensor([1, 16, 17, 100, 163])  # one token, a full block, a block and one, ...
    tables = torch.stack([torch.randperm(BLOCKS)[:11] for _ in lens])  # scattered, unordered blocks
    q = torch.randn(len(lens), H, D)
    got = decode(cache, q, tables, lens, True, monkeypatch)
    want = decode(cache, q, tables, lens, False, monkeypatch)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_a_sequence_gets_the_same_output_in_any_batch(kind, monkeypatch):
    cache = filled(kind)
    tables = torch.stack([torch.randperm(BLOCKS)[:8] for _ in range(6)])
    lens = torch.tensor([120, 7, 64, 33, 128, 90])
    q = torch.randn(6, H, D)
    together = decode(cache, q, tables, lens, True, monkeypatch)
    for i in range(6):
        alone = decode(cache, q[i:i + 1], tables[i:i + 1], lens[i:i + 1], True, monkeypatch)
        assert torch.equal(alone[0], together[i])


def runs_batch():
    """Rows of three sequences: one alone, a run of 5 (a token and 4 drafts) crossing a chunk boundary at 128, and
    a run of 30 rows (a short prompt chunk; more rows than one task holds: 64 / 3 heads per KV head = 21). With a
    bf16 cache on AVX-512, a run of at most 4 rows reads every KV head in one pass (attend_stream) when the call has at
    least as many tasks as threads, a longer run one head per task: every row as its own run against the runs of 5
    and 30 compares the two paths."""
    seqs = [(1, 90), (5, 126), (30, 300)]  # (rows, context of the first row)
    tables, lens, runs = [], [], [0]
    for i, (rows, first) in enumerate(seqs):
        table = torch.randperm(BLOCKS)[:21]
        tables += [table] * rows
        lens += range(first, first + rows)
        runs.append(runs[-1] + rows)
    return torch.stack(tables), torch.tensor(lens), runs


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_rows_of_a_run_match_gather_and_sdpa_and_each_row_alone(kind, monkeypatch):
    cache = filled(kind)
    tables, lens, runs = runs_batch()
    q = torch.randn(len(lens), H, D)
    together = decode(cache, q, tables, lens, True, monkeypatch, runs)
    torch.testing.assert_close(together, decode(cache, q, tables, lens, False, monkeypatch), atol=2e-6, rtol=1e-5)
    assert torch.equal(together, decode(cache, q, tables, lens, True, monkeypatch))  # every row its own run
    for i in (0, 1, 5, 6, 20, 27, 35):
        alone = decode(cache, q[i:i + 1], tables[i:i + 1], lens[i:i + 1], True, monkeypatch)
        assert torch.equal(alone[0], together[i]), i


def test_short_runs_streamed_give_each_row_the_same_bits_as_alone_and_as_in_a_long_run(monkeypatch):
    """bf16, two threads: with AVX-512, runs of 2-4 rows (a token and its drafts) take attend_stream, all KV heads at
    once, 16 tokens at a time (without AVX-512 every path is attend(), and this still checks a row alone against its
    run). Their rows end mid-block, on a block, and on both sides of the chunk boundary at 128, and a run's rows see
    different lengths (the first row's chunk can be empty). The same rows inside a run of 7 take the
    one-head-per-task path (attend_vec): every row must get the same bits in all three, and match gather + SDPA."""
    cache = filled("bf16")
    firsts = {2: 15, 3: 127, 4: 253}  # run length -> context of its first row
    tables, lens, runs = [], [], [0]
    for rows, first in firsts.items():
        tables += [torch.randperm(BLOCKS)[:21]] * rows
        lens += range(first, first + rows)
        runs.append(runs[-1] + rows)
    tables, lens, q = torch.stack(tables), torch.tensor(lens), torch.randn(len(lens), H, D)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        streamed = decode(cache, q, tables, lens, True, monkeypatch, runs)
        torch.testing.assert_close(streamed, decode(cache, q, tables, lens, False, monkeypatch), atol=2e-6,
                                   rtol=1e-5)
        for i in range(len(lens)):
            alone = decode(cache, q[i:i + 1], tables[i:i + 1], lens[i:i + 1], True, monkeypatch)
            assert torch.equal(alone[0], streamed[i]), i
        start = runs[2]  # the run of 4, extended by 3 more rows of the same sequence: a run of 7, one head per task
        extra = torch.arange(lens[-1] + 1, lens[-1] + 4)
        long_lens = torch.cat([lens[start:], extra])
        long_q = torch.cat([q[start:], torch.randn(3, H, D)])
        long_tables = tables[start:start + 1].repeat(7, 1)
        in_long = decode(cache, long_q, long_tables, long_lens, True, monkeypatch, [0, 7])
        assert torch.equal(in_long[:4], streamed[start:])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("runs, words", [([0, 2, 2, 36], "increasing row offsets"), ([0, 36, 40], "from 0 to 36"),
                                         ([1, 36], "from 0 to 36"), ([0, 3, 36], "share one block table")])
def test_runs_that_do_not_describe_the_rows_are_refused(runs, words, monkeypatch):
    cache = filled("fp32")
    tables, lens, _ = runs_batch()
    with pytest.raises(KernelArgumentError, match=words):
        decode(cache, torch.randn(len(lens), H, D), tables, lens, True, monkeypatch, runs)


def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.paged_attention.cache_clear()
    try:
        assert native.paged_attention() is None
    finally:
        native.paged_attention.cache_clear()


def test_an_unusable_cache_directory_falls_back_to_torch(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FREEHOLD_CACHE_DIR", str(blocker / "cache"))  # mkdir under a file fails
    native.paged_attention.cache_clear()
    try:
        assert native.paged_attention() is None
    finally:
        native.paged_attention.cache_clear()


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_a_decode_only_step_stores_the_new_rows_as_the_cache_would(kind, monkeypatch):
    from freehold.layers.attention import paged_attention
    lens = torch.randint(1, 4 * BS + 1, (10,))
    tables = torch.randperm(BLOCKS).view(10, 4)  # distinct blocks: every new row has its own slot
    slots = torch.stack([tables[i, (n - 1) // BS] * BS + (n - 1) % BS for i, n in enumerate(lens.tolist())])
    meta = AttentionMetadata(slots, len(lens), tables, lens, ())
    qkv = torch.randn(len(lens), H + 2 * KVH, D)  # rows as a fused projection leaves them: strided
    q, k, v = qkv[:, :H], qkv[:, H:H + KVH], qkv[:, H + KVH:]
    results = {}
    for use_native in (True, False):
        cache = filled(kind)
        monkeypatch.setenv(native.ENV_SWITCH, "1" if use_native else "0")
        native.paged_attention.cache_clear()
        try:
            out = paged_attention(0, q, k, v, cache, meta)
            scales = (getattr(cache, "k_scale", cache.k), getattr(cache, "v_scale", cache.v))  # int8 only
            results[use_native] = (out, [t.clone() for t in (cache.k, cache.v, *scales)])
        finally:
            native.paged_attention.cache_clear()
    (out, stored), (out_ref, stored_ref) = results[True], results[False]
    assert all(torch.equal(a, b) for a, b in zip(stored, stored_ref))  # bf16 rounding and int8 codes/scales included
    torch.testing.assert_close(out, out_ref, atol=2e-6, rtol=1e-5)


# A decode-only step of three sequences (5, 40 and 17 tokens) that the kernel stores into and reads, and the ways
# its indices can point outside the cache: each must be refused before the kernel reads or writes anything.
GOOD_STEP = {"tables": [[3, 0, 0], [7, 8, 9], [11, 12, 0]], "lens": [5, 40, 17],
             "slots": [3 * BS + 4, 9 * BS + 7, 12 * BS]}
BAD_STEPS = {
    "a block past the pool": ({"tables": [[3, 0, 0], [7, 8, BLOCKS], [11, 12, 0]]}, "block table holds 40"),
    "a negative block": ({"tables": [[-1, 0, 0], [7, 8, 9], [11, 12, 0]]}, "block table holds -1"),
    "a context longer than its table": ({"lens": [5, 3 * BS + 1, 17]}, "context length holds 49"),
    "a slot past the cache": ({"slots": [3 * BS + 4, BLOCKS * BS, 12 * BS]}, "slot holds 640"),
    "a negative slot": ({"slots": [-1, 9 * BS + 7, 12 * BS]}, "slot holds -1"),
    "int32 block tables": ({"tables": torch.tensor(GOOD_STEP["tables"], dtype=torch.int32)}, "int64"),
}


def decode_only_step(cache, monkeypatch, **indices):
    from freehold.layers.attention import paged_attention
    step = {name: torch.as_tensor(value) for name, value in {**GOOD_STEP, **indices}.items()}
    meta = AttentionMetadata(step["slots"], 3, step["tables"], step["lens"], ())
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    native.paged_attention.cache_clear()
    return paged_attention(0, torch.randn(3, H, D), torch.randn(3, KVH, D), torch.randn(3, KVH, D), cache, meta)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
@pytest.mark.parametrize("problem", BAD_STEPS)
def test_indices_outside_the_cache_are_refused_before_the_kernel_runs(kind, problem, monkeypatch):
    cache = filled(kind)
    decode_only_step(cache, monkeypatch)  # the good step runs
    before = cache.k.clone(), cache.v.clone()
    bad, message = BAD_STEPS[problem]
    with pytest.raises(KernelArgumentError, match=message):
        decode_only_step(cache, monkeypatch, **bad)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])  # nothing was stored


def test_a_query_of_another_shape_is_refused(monkeypatch):
    cache = filled("fp32")
    tables, lens = torch.tensor(GOOD_STEP["tables"]), torch.tensor(GOOD_STEP["lens"])
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), 3, tables, lens, ())
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    native.paged_attention.cache_clear()
    with pytest.raises(KernelArgumentError, match="head_dim 64"):
        _decode_attention(0, torch.randn(3, H, 2 * D), cache, meta)


def test_head_dim_128_at_the_one_pass_limit_gives_a_row_the_same_bits_alone_or_in_a_run(monkeypatch):
    """4 KV heads x 128 dims, bf16: the largest layout whose short runs read every head in one pass (4 x 128 <= 512
    floats per token); the run of 8 rows reads one head per task. Two threads, so each row alone (3 chunks) has at
    least as many tasks as threads."""
    torch.manual_seed(0)
    kvh, d, h, rows = 4, 128, 8, 8
    cache = KVCache(1, BLOCKS, BS, kvh, d, torch.bfloat16, "cpu")
    cache.write(0, torch.arange(BLOCKS * BS), torch.randn(BLOCKS * BS, kvh, d) * 2, torch.randn(BLOCKS * BS, kvh, d))
    tables = torch.randperm(BLOCKS)[:21].repeat(rows, 1)
    lens, q = torch.arange(300, 300 + rows), torch.randn(rows, h, d)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = decode(cache, q, tables, lens, True, monkeypatch, [0, rows])
        torch.testing.assert_close(together, decode(cache, q, tables, lens, False, monkeypatch), atol=2e-6, rtol=1e-5)
        assert torch.equal(together, decode(cache, q, tables, lens, True, monkeypatch))  # every row its own run
        for i in (0, 3, 7):
            assert torch.equal(decode(cache, q[i:i + 1], tables[i:i + 1], lens[i:i + 1], True, monkeypatch)[0],
                               together[i]), i
    finally:
        torch.set_num_threads(threads)
