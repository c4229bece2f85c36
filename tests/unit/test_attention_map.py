"""The attention map's math on tiny random models: probabilities, the uniform baseline, the probe, table and heatmap.
(Against transformers' own attention probabilities on the default model: tests/integration/test_model_parity.py.)"""
import pytest
import torch

from freehold.errors import InvalidRequestError
from freehold.layers.attention import paged_attention
from freehold.models.attention_map import (
    attention_probs_per_layer,
    causal_attention_probs,
    format_table,
    layer_sink_attention,
    measure_sink_attention,
    save_heatmap,
    uniform_share,
)
from tests.conftest import TINY, tiny_model


def test_probabilities_times_values_is_the_models_attention_output():
    """p @ v with head h reading KV head h // (H / KVH) equals the layer's causal SDPA output: the same softmax."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, heads, 16, generator=gen) for heads in (6, 2, 2))
    p = causal_attention_probs(q, k)  # [6, 12, 12]
    expected = paged_attention(0, q, k, v, None, None)  # [12, 6, 16]
    ours = torch.einsum("hij,jhd->ihd", p, v.repeat_interleave(3, dim=1))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(p.triu(1), torch.zeros_like(p))  # nothing on future keys
    torch.testing.assert_close(p.sum(-1), torch.ones(6, 12))
    torch.testing.assert_close(causal_attention_probs(q, k, 5, 9), p[:, 5:9])  # a block of query rows


def test_uniform_attention_gets_exactly_the_uniform_share():
    """Zero queries spread every row evenly: the measured sink share is the baseline, ratio 1."""
    q, k = torch.zeros(20, 4, 8), torch.randn(20, 2, 8)
    x = layer_sink_attention(0, q, k, sink_tokens=3, query_start=6)
    assert uniform_share(20, 3, 6) == pytest.approx(sum(3 / (i + 1) for i in range(6, 20)) / 14)
    assert x.sink_share == pytest.approx(uniform_share(20, 3, 6))
    assert x.first_token_share == pytest.approx(sum(1 / (i + 1) for i in range(6, 20)) / 14)
    assert x.head_sink_shares == pytest.approx((x.sink_share,) * 4)


def test_a_key_every_query_matches_takes_the_mass_in_the_heads_that_read_it():
    """Key 0 of KV head 0 aligned with every query of heads 0 and 1 (GQA group 0): those heads put ~all their mass
    on it; heads 2 and 3 (KV head 1, all keys equal) stay uniform."""
    q = torch.zeros(16, 4, 8)
    q[:, :2, 0] = 10.0
    k = torch.zeros(16, 2, 8)
    k[0, 0, 0] = 10.0
    x = layer_sink_attention(0, q, k, sink_tokens=2, query_start=4)
    assert x.head_sink_shares[0] > 0.999 and x.head_sink_shares[1] > 0.999
    assert x.head_sink_shares[2:] == pytest.approx((uniform_share(16, 2, 4),) * 2)


def test_the_probe_leaves_the_forward_pass_unchanged_and_removes_its_hooks():
    model = tiny_model()
    ids = list(range(10, 40))
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        before = model(torch.tensor(ids), positions)
    probs = attention_probs_per_layer(model, ids)
    with torch.inference_mode():
        after = model(torch.tensor(ids), positions)
    assert torch.equal(before, after)
    assert all(not a.self_attn._forward_hooks and not a.self_attn._forward_pre_hooks for a in model.model.layers)
    assert len(probs) == TINY.num_layers and probs[0].shape == (TINY.num_heads, len(ids), len(ids))
    assert not torch.equal(probs[0], probs[1])  # each layer's own queries and keys


def test_measure_table_and_heatmap(tmp_path):
    result = measure_sink_attention(tiny_model(), list(range(50)), sink_tokens=2)
    assert (result.num_tokens, result.sink_tokens, result.query_start) == (50, 2, 4)
    assert [x.layer for x in result.layers] == list(range(TINY.num_layers))
    assert result.uniform_share == pytest.approx(uniform_share(50, 2, 4))
    assert result.mean_sink_share == pytest.approx(sum(x.sink_share for x in result.layers) / TINY.num_layers)
    assert all(x.first_token_share <= x.sink_share <= 1.0 for x in result.layers)
    table = format_table(result).splitlines()
    assert "first 2" in table[1] and "x uniform" in table[1]
    assert len(table) == 2 + TINY.num_layers + 1 and table[-1].split()[0] == "mean"
    assert float(table[-1].split()[-1]) == pytest.approx(result.ratio(result.mean_sink_share), abs=0.05)
    assert save_heatmap(result, tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ids, sink_tokens, needle", [
    ([], 4, "the prompt is empty"),
    ([1, 2, 3], 0, "sink_tokens must be at least 1, got 0"),
    ([1, 2, 3, 4, 5], 4, "the prompt has 5 tokens; with 4 sink tokens the measured queries start at position 8"),
    (list(range(200)) * 6, 4, "the prompt has 1200 tokens; the model's context is 1024"),
])
def test_bad_input_is_named(ids, sink_tokens, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        measure_sink_attention(tiny_model(), ids, sink_tokens)


def test_png_without_matplotlib_is_named_before_the_model_loads(monkeypatch, capsys):
    import sys

    from freehold import commands
    from freehold.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when it is not installed

    def load_llm(args):
        raise AssertionError("the model loaded before the missing package was reported")
    monkeypatch.setattr(commands, "load_llm", load_llm)
    assert main(["inspect", "attention", "--prompt", "Hi", "--png", "map.png"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'freehold[inspect]'" in err and "--png" in err
