"""`freehold bench prefill`'s ceiling: the linear layers' shapes and FLOPs, and a rate from timed GEMMs."""
from collections import Counter

import pytest

from freehold.bench import prefill
from freehold.models.fuse import fuse_projections
from freehold.quant.convert import quantize_model
from freehold.quant.modes import WeightMode
from tests.conftest import TINY, tiny_model


def test_bench_prefill_counts_the_decoder_layers_linear_flops_and_times_their_gemms():
    """`freehold bench prefill`'s ceiling: every decoder linear layer's weight shape once per layer, the LM head left
    out, the same FLOPs fused or not, and a rate from timed bf16 GEMMs of those shapes."""
    e, i = TINY.hidden_size, TINY.intermediate_size
    q, kv = TINY.num_heads * TINY.head_dim, TINY.num_kv_heads * TINY.head_dim
    expected = Counter()
    for shape in ((e, q), (e, kv), (e, kv), (q, e), (e, i), (e, i), (i, e)):  # q, k, v, o, gate, up, down
        expected[shape] += TINY.num_layers
    assert prefill.linear_shapes(tiny_model()) == expected
    fused = prefill.linear_shapes(fuse_projections(quantize_model(tiny_model(), WeightMode.INT4)))
    assert fused != expected and (e, 2 * i) in fused  # gate/up joined at least
    flops = lambda shapes: sum(2 * k * n * c for (k, n), c in shapes.items())  # noqa: E731
    assert flops(fused) == flops(expected)
    tokens_per_s, gflops = prefill.ceiling(fused, rows=64, repeats=3)
    assert tokens_per_s > 0 and gflops == pytest.approx(tokens_per_s * flops(fused) / 1e9)


@pytest.mark.parametrize("argv, message", [(["--input-len", "abc"], "two whole numbers"),
                                           (["--input-len", "5,2"], "1 <= min <= max"),
                                           (["--prompts", "0"], "at least 1")])
def test_bench_prefill_names_a_bad_argument_before_loading_a_model(argv, message):
    from freehold.cli import build_parser
    with pytest.raises(SystemExit) as exit_info:
        prefill.run(build_parser().parse_args(["bench", "prefill", *argv]))
    assert message in str(exit_info.value)
