"""Where one engine step's time goes: decode-only steps at each batch size (`--batches`), every sequence holding
`--context` prompt tokens, on the default model with default engine settings (only `max_num_seqs` is raised to the
largest batch, so the whole batch decodes in one step). Greedy, EOS ignored.

Per batch size: ms per step measured without a profiler, then the same number of steps under cProfile, whose
self time (tottime) per function is summed into categories. A function's category is its own (by module, or one
named function), or else its callers' (weighted by the time each call took): a C op such as `torch.matmul` counts
where it was called from. The lm head is the default model's Q8_0 or bf16 table (quant/q8.py, quant/bf16.py) or
whatever `compute_logits` calls; a helper shared by several categories (quant/compute.py's `by_row_kind`) splits
its time by its callers' totals, not per call path. "rest" holds the embedding lookup, the model's glue (reshapes,
concatenations), `nn.Module` dispatch (torch/nn/modules/module.py) and the engine's own Python. cProfile adds a
cost to every call, which inflates Python-heavy code; the shares take that cost off each function's self time
(the cost per call = profiled minus unprofiled step time, over the number of calls). ms per category = its share of
the unprofiled step. A decode-only step of the default model runs its decoder layers in one native call
(freehold.models.native_layers): one category, "decoder layers in one native call"; `--python-layers` runs them one
by one, each kernel in its own category.

    freehold bench step                       # batches 1,64, context 512, 20 steps each
    freehold bench step --batches 1,8 --context 128 --steps 5
    freehold bench step --batches 1 --python-layers
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from freehold.bench.common import pydoc_token_ids, write_results

INT4, LM_HEAD, ATTENTION, ELEMENTWISE = "int4 matmuls", "lm head", "attention", "norms, rope, activations"
SAMPLING, SCHEDULER, REST = "sampling", "scheduler + input preparation", "rest (Python overhead)"
LAYERS = "decoder layers in one native call"  # int4 + attention + norms of a decode-only step: models/native_layers.py
CATEGORIES = (INT4, LM_HEAD, ATTENTION, ELEMENTWISE, LAYERS, SAMPLING, SCHEDULER, REST)
WARMUP_STEPS = 2

FuncKey = tuple[str, int, str]  # pstats: (file, first line, name); C functions: ("~", 0, "<built-in ...>")


@dataclass(frozen=True)
class StepProfile:
    batch: int
    context: int
    num_steps: int
    ms_per_step: float  # without the profiler
    profiled_ms_per_step: float
    shares: dict[str, float]  # category -> fraction of the step, cProfile's cost per call removed (sums to 1)
    raw_shares: dict[str, float]  # the same, as cProfile measured it


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default: 1,64)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per sequence (default: 512)")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed, then profiled (default: 20)")
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 3G (default: the engine's default)")
    p.add_argument("--python-layers", action="store_true",
                   help="run the decoder layers one by one in Python, each kernel in its category (default: a "
                        "decode-only step's layers in one native call where it applies, one category)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="KV cache dtype (default: the engine's, bf16 on CPU)")


def run(args: argparse.Namespace) -> int:
    from freehold.config import KVDtype
    from freehold.kv.planner import parse_size
    from freehold.llm import LLM
    batches = [int(b) for b in args.batches.split(",")]
    if min(batches) < 1 or args.context < 1 or args.steps < 1:
        raise SystemExit("--batches, --context and --steps must be positive")
    options = {"kv_cache_memory": parse_size(args.kv_cache_memory)} if args.kv_cache_memory else {}
    llm = LLM(args.model, progress=False, max_num_seqs=max(batches), kv_dtype=KVDtype(args.kv_dtype), **options)
    print(llm.describe())
    llm.engine.runner.model.native_layers = not args.python_layers
    corpus = pydoc_token_ids(llm.tokenizer)
    profiles = [profile_decode(llm.engine, _windows(corpus, batch, args.context), args.steps) for batch in batches]
    extra = {"model": llm.loaded.path.name, "kv_dtype": args.kv_dtype, "python_layers": args.python_layers,
             "profiles": [asdict(p) for p in profiles]}
    write_results("step", *step_table(profiles), extra, args.out)
    print("\nshares: cProfile self time by category, its cost per call taken off (cProfile inflates Python overhead); "
          "ms = share x the unprofiled step. Under the profiler a step took "
          + ", ".join(f"{p.profiled_ms_per_step:.1f} ms at batch {p.batch}" for p in profiles) + ".")
    return 0


def step_table(profiles: list[StepProfile]) -> tuple[list[str], list[list]]:
    """Headers and rows: one row per category, a % and an ms column per batch size, then the step's total."""
    headers = ["category"] + [h for p in profiles for h in (f"batch {p.batch} %", f"batch {p.batch} ms")]
    rows = [[name] + [v for p in profiles for v in (round(100 * p.shares[name], 1), p.shares[name] * p.ms_per_step)]
            for name in CATEGORIES]
    rows.append(["step (no profiler)"] + [v for p in profiles for v in (100.0, p.ms_per_step)])
    return headers, rows


# ---- measuring ----------------------------------------------------------------------------------------------------
def profile_decode(engine, prompts: list[list[int]], num_steps: int) -> StepProfile:
    """Prefill `prompts` together, then time `num_steps` decode steps, then profile as many; aborts them after."""
    from freehold.types import SamplingParams
    ids = [f"bench-step-{i}" for i in range(len(prompts))]
    # the first sequences decode while the last ones prefill: enough tokens that none finishes before the profile
    prefill_steps = 2 * -(-sum(map(len, prompts)) // engine.scheduler.max_num_batched_tokens) + 2
    params = SamplingParams(max_tokens=prefill_steps + WARMUP_STEPS + 2 * num_steps + 2, temperature=0.0,
                            ignore_eos=True)
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    try:
        started: set[str] = set()
        for _ in range(sum(map(len, prompts)) + 1):  # prefill steps, until every sequence has its first token
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
            if len(started) == len(ids):
                break
        else:
            raise RuntimeError("the prompts did not all prefill; is the KV cache large enough (--kv-cache-memory)?")
        _decode(engine, WARMUP_STEPS, len(ids))
        plain = _decode(engine, num_steps, len(ids))
        profiler = cProfile.Profile()
        profiled = _decode(engine, num_steps, len(ids), profiler)
    finally:
        for rid in ids:
            engine.abort_request(rid)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    cost_per_call = max(profiled - plain, 0.0) / max(sum(s[1] for s in stats.values()), 1)
    return StepProfile(len(prompts), len(prompts[0]), num_steps, 1000 * plain / num_steps,
                       1000 * profiled / num_steps, category_shares(stats, cost_per_call), category_shares(stats, 0.0))


def _decode(engine, num_steps: int, batch: int, profiler: cProfile.Profile | None = None) -> float:
    """Seconds for `num_steps` steps, each of which must decode one token for every sequence."""
    seconds = 0.0
    for _ in range(num_steps):
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        outputs = engine.step()
        seconds += time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        if len(outputs) != batch or any(len(o.outputs[0].token_ids) != 1 for o in outputs):
            raise RuntimeError(f"expected a decode step of {batch} sequences, one token each; is the KV cache "
                               "large enough for the batch (--kv-cache-memory)?")
    return seconds


def _windows(corpus: list[int], num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(corpus) - length) for _ in range(num)]
    return [corpus[s:s + length] for s in starts]


# ---- categories ---------------------------------------------------------------------------------------------------
def category_shares(stats: dict, cost_per_call: float) -> dict[str, float]:
    """pstats' raw stats -> {category: fraction of the summed self time}, each function's self time less
    `cost_per_call` x its calls (clipped at 0)."""
    own_rule = _rules()
    memo: dict[FuncKey, dict[str, float]] = {}
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for key, (_, num_calls, tottime, _, _) in stats.items():
        seconds = max(tottime - cost_per_call * num_calls, 0.0)
        split = {REST: 1.0} if _is_dispatch(key) else _resolve(key, stats, own_rule, memo, frozenset())
        for name, fraction in split.items():
            totals[name] += seconds * fraction
    total = sum(totals.values()) or 1.0
    return {name: seconds / total for name, seconds in totals.items()}


def _resolve(key: FuncKey, stats: dict, own_rule: Callable[[FuncKey], str | None],
             memo: dict[FuncKey, dict[str, float]], path: frozenset) -> dict[str, float]:
    """A function's category, or its callers' weighted by the cumulative time of each call; REST at the root."""
    name = own_rule(key)
    if name is not None:
        return {name: 1.0}
    if key in memo:
        return memo[key]
    callers = {c: edge[3] for c, edge in stats[key][4].items() if c not in path and c in stats}
    weight = sum(callers.values())
    if weight <= 0:
        return {REST: 1.0}
    split: dict[str, float] = defaultdict(float)
    for caller, w in callers.items():
        for name, fraction in _resolve(caller, stats, own_rule, memo, path | {key}).items():
            split[name] += fraction * w / weight
    memo[key] = dict(split)
    return memo[key]


def _is_dispatch(key: FuncKey) -> bool:
    return Path(key[0]).as_posix().endswith("torch/nn/modules/module.py")


def _rules() -> Callable[[FuncKey], str | None]:
    """key -> its own category (a named function first, then its file), None when it takes its callers'."""
    from freehold import kv, sampling
    from freehold.engine import engine, runner, scheduler, sequence
    from freehold.layers import attention, norm, rotary
    from freehold.models import llama, native_layers
    from freehold.quant import bf16, int4, int4_unpack, q8
    functions = {llama.LlamaForCausalLM.compute_logits: LM_HEAD,  # whatever the lm head's module is
                 llama.MLP.forward: ELEMENTWISE,  # silu(gate) * up; the projections are modules of their own
                 q8.Q8Embedding.forward: REST, bf16.Bf16Embedding.forward: REST,  # the embedding lookup
                 q8.Q8Blocks.rows: None,  # the embedding's rows, or the lm head's fallback: its callers decide
                 runner.ModelRunner.prepare_input: SCHEDULER,
                 engine.Engine._update: SCHEDULER,  # folding sampled tokens into the sequences
                 engine.Engine._sampling_rows: SAMPLING}
    by_code = {(f.__code__.co_filename, f.__code__.co_firstlineno, f.__code__.co_name): name
               for f, name in functions.items()}
    files = {m.__file__: name for m, name in ((int4, INT4), (int4_unpack, INT4), (q8, LM_HEAD), (bf16, LM_HEAD),
                                              (attention, ATTENTION), (norm, ELEMENTWISE), (rotary, ELEMENTWISE),
                                              (native_layers, LAYERS),
                                              (scheduler, SCHEDULER), (sequence, SCHEDULER))}
    folders = {str(Path(sampling.__file__).parent): SAMPLING, str(Path(kv.__file__).parent): SCHEDULER}

    def own_rule(key: FuncKey) -> str | None:
        if key in by_code:
            return by_code[key]
        if key[0] in files:
            return files[key[0]]
        return folders.get(str(Path(key[0]).parent))
    return own_rule
