"""`freehold bench step`: decode steps of a tiny int4 model profiled into categories that cover the whole step."""
import dataclasses
import json

import pytest

from freehold.bench import step
from freehold.bench.common import write_results
from freehold.cli import build_parser
from freehold.quant.bf16 import Bf16Linear
from freehold.quant.convert import pack_weight, quantize_model, swap_modules
from freehold.quant.int4 import Int4Linear
from freehold.quant.modes import WeightFormat, WeightMode
from tests.conftest import TINY, tiny_engine, tiny_model


@pytest.fixture(scope="module")
def profiles():
    model = quantize_model(tiny_model(), WeightMode.INT4)  # int4 layers; the lm head as the default model's table:
    swap_modules(model, {"lm_head.weight": pack_weight(model.lm_head.dequantize(), WeightFormat.BF16, "cpu")})
    assert any(isinstance(m, Int4Linear) for m in model.modules()) and isinstance(model.lm_head, Bf16Linear)
    engine = tiny_engine(model, max_num_seqs=4)
    prompts = [[(7 * i + j) % (TINY.vocab_size - 1) for j in range(40)] for i in range(4)]
    result = [step.profile_decode(engine, prompts[:batch], num_steps=3) for batch in (1, 4)]
    assert not engine.has_unfinished()  # the bench's requests are gone afterwards
    engine.check_integrity()
    return result


def test_every_category_is_measured_and_the_shares_cover_the_step(profiles):
    for p in profiles:
        assert set(p.shares) == set(step.CATEGORIES) == set(p.raw_shares)
        assert sum(p.shares.values()) == pytest.approx(1.0) and sum(p.raw_shares.values()) == pytest.approx(1.0)
        # each part of a step shows up where it belongs: C ops count where they are called from
        for name in (step.INT4, step.LM_HEAD, step.ATTENTION, step.ELEMENTWISE, step.SAMPLING, step.SCHEDULER):
            assert p.shares[name] > 0, (name, p.shares)
        assert p.ms_per_step > 0 and p.profiled_ms_per_step > 0
    assert [p.batch for p in profiles] == [1, 4] and profiles[0].context == 40 and profiles[0].num_steps == 3


def test_the_table_has_a_row_per_category_and_percentages_summing_to_100(profiles, tmp_path):
    headers, rows = step.step_table(profiles)
    assert headers == ["category", "batch 1 %", "batch 1 ms", "batch 4 %", "batch 4 ms"]
    assert [r[0] for r in rows] == [*step.CATEGORIES, "step (no profiler)"]
    for col, p in ((1, profiles[0]), (3, profiles[1])):
        assert sum(r[col] for r in rows[:-1]) == pytest.approx(100, abs=0.5)
        assert sum(r[col + 1] for r in rows[:-1]) == pytest.approx(p.ms_per_step)
        assert rows[-1][col + 1] == p.ms_per_step
    extra = {"profiles": [dataclasses.asdict(p) for p in profiles]}
    written = json.loads(write_results("step", headers, rows, extra, tmp_path).read_text())
    assert written["rows"][0][0] == step.INT4 and written["extra"]["profiles"][1]["batch"] == 4


def test_a_c_op_counts_for_its_caller_and_module_dispatch_is_overhead(monkeypatch):
    mlp = ("/x/freehold/models/llama.py", 1, "forward")
    stats = {  # key: (calls, calls, self time, cumulative time, {caller: edge})
        ("~", 0, "<built-in method matmul>"): (2, 2, 3.0, 3.0, {mlp: (1, 1, 1.0, 1.0),
                                                                  ("/x/other.py", 1, "f"): (1, 1, 2.0, 2.0)}),
        ("/x/torch/nn/modules/module.py", 1, "_call_impl"): (1, 1, 1.0, 1.0, {}),
        ("/x/other.py", 1, "f"): (1, 1, 0.0, 2.0, {}),
        mlp: (1, 1, 0.0, 1.0, {}),
    }
    monkeypatch.setattr(step, "_rules", lambda: {mlp: step.ELEMENTWISE}.get)  # a rule table for these keys
    shares = step.category_shares(stats, cost_per_call=0.0)
    assert shares[step.ELEMENTWISE] == pytest.approx(0.25) and shares[step.REST] == pytest.approx(0.75)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_the_bench_is_registered_with_the_issue_defaults():
    args = build_parser().parse_args(["bench", "step"])
    assert (args.batches, args.context, args.steps, args.kv_dtype) == ("1,64", 512, 20, "auto")
