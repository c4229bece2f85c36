"""Tool-call cost: decode tokens/s of a constrained tool-call turn (tool_choice "required": the grammar of the call
syntax, the offered names and each tool's argument schema) vs free text, at batch 1 and 16, on the same prompts.

The method is `freehold bench structured`'s: the constrained run goes first (greedy); its per-request output lengths
are forced on the free run (EOS ignored), so both decode the same number of tokens in the same batches and differ
only by the grammar; decode time counts the steps after every request has its first token."""
from __future__ import annotations

import argparse

from freehold.bench.common import write_results
from freehold.bench.structured import decode_batch

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "book_table", "description": "Book a restaurant table.",
                                      "parameters": {"type": "object", "properties": {
                                          "restaurant": {"type": "string"},
                                          "people": {"type": "integer", "minimum": 1, "maximum": 20},
                                          "time": {"type": "string"},
                                          "notes": {"type": "array", "items": {"type": "string"}}},
                                          "required": ["restaurant", "people", "time"]}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money.",
                                      "parameters": {"type": "object", "properties": {
                                          "amount": {"type": "number"}, "source": {"type": "string"},
                                          "target": {"type": "string"}},
                                          "required": ["amount", "source", "target"]}}},
]
ASKS = ["What is the weather in Lima?", "Book a table for 4 at Chez Paul at 8pm.", "Convert 120 euros to yen.",
        "Is it cold in Oslo right now?", "Table for two at Sakura tomorrow at noon, by the window.",
        "How many dollars is 50 pounds?", "Weather in Nairobi in fahrenheit, please.",
        "Reserve Luigi's for 6 people at 7:30.", "Turn 1000 rupees into euros.", "Do I need a coat in Montreal?",
        "Book Blue Door for 3 at 6pm, one vegetarian.", "What are 75 Swiss francs in dollars?",
        "What's the temperature in Cairo?", "A table for 10 at The Oak at 9pm.", "Convert 20 dollars to pesos.",
        "Weather in Reykjavik?"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"])
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5, help="turns of free then constrained decoding")


def run(args: argparse.Namespace) -> int:
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    llm = LLM(args.model, progress=False, kv_cache_memory=512 << 20, weights=WeightMode(args.weights))
    prompt_of, constraint = _tool_turn(llm)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [prompt_of(ASKS[i % len(ASKS)]) for i in range(batch)]
        lengths = [len(t) for t in decode_batch(llm, prompts, [args.max_tokens] * batch, constraint).tokens]
        # free and constrained take turns, so drift in the machine's speed hits both; the cost is the median of the
        # per-turn ratios (robust to one slow run), the tok/s columns the best run of each
        pairs = [(decode_batch(llm, prompts, lengths, None), decode_batch(llm, prompts, lengths, constraint))
                 for _ in range(args.repeats)]
        ratios = sorted(c.seconds / f.seconds for f, c in pairs)
        free = min((f for f, _ in pairs), key=lambda d: d.seconds)
        constrained = min((c for _, c in pairs), key=lambda d: d.seconds)
        rows.append([batch, sum(lengths), free.tokens_per_s, constrained.tokens_per_s,
                     100.0 * (ratios[len(ratios) // 2] - 1.0)])
    write_results("tools", ["batch", "decoded tokens", "free tok/s", "tool-call tok/s", "cost per token % (median of turns)"], rows,
                  {"tools": TOOLS, "tool_choice": "required", "max_tokens": args.max_tokens, "weights": args.weights},
                  args.out)
    return 0


def _tool_turn(llm):
    """(prompt for a question, the compiled tool-call constraint): the turn `LLM.chat(..., tools=TOOLS,
    tool_choice="required")` renders and constrains."""
    from freehold.constrain.compiler import ConstraintCompiler
    from freehold.tools.grammar import tool_constraint
    from freehold.tools.spec import tool_request
    request = tool_request(TOOLS, "required", None)
    constraint = ConstraintCompiler(llm.tokenizer, llm.loaded.config.vocab_size).compile(tool_constraint(request))
    return lambda ask: llm.chat_prompt([{"role": "user", "content": ask}], request), constraint
