"""What each `freehold` subcommand does (the parser lives in cli.py)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import torch

from freehold.config import EngineConfig, KVDtype, KVPolicy, SpeculativeMode
from freehold.errors import FreeholdError, InvalidRequestError
from freehold.quant.modes import WeightMode
from freehold.types import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run(args: argparse.Namespace) -> int:
    handlers = {"generate": generate, "chat": chat, "eval": evaluate, "kv-plan": kv_plan,
                "bench": bench, "inspect": inspect, "serve": serve, "index": index, "search": search,
                "agent": agent}
    return handlers[args.command](args)


def load_llm(args: argparse.Namespace, **engine_options):
    """The LLM the command's model arguments describe; `engine_options` add EngineConfig fields."""
    from freehold.kv.planner import parse_size
    from freehold.llm import LLM
    t0 = time.perf_counter()
    speculative = {"speculative": SpeculativeMode(args.speculative), "draft_model": args.draft_model,
                   "draft_weights": WeightMode(args.draft_weights),
                   "num_speculative_tokens": args.num_speculative_tokens} if hasattr(args, "speculative") else {}
    if hasattr(args, "kv_policy"):
        speculative.update(kv_policy=KVPolicy(args.kv_policy), sink_tokens=args.sink_tokens, window=args.window)
    speculative.update(engine_options)
    llm = LLM(args.model, dtype=DTYPES[args.dtype], device=args.device, weights=WeightMode(args.weights),
              kv_cache_memory=parse_size(args.kv_cache_memory), kv_dtype=KVDtype(args.kv_dtype), **speculative)
    print(f"{llm.describe()}\nloaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return llm


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Stop before any model loads when an optional dependency of this command is missing."""
    if importlib.util.find_spec(module) is None:
        raise FreeholdError(f"{purpose} needs {module}, which is not installed: pip install 'freehold[{extra}]'")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def generate(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    for delta in llm.stream(prompt, sampling_params(args)):
        print(delta, end="", flush=True)
    print()
    return 0


def chat(args: argparse.Namespace) -> int:
    from freehold.memory.session import ChatSession
    session = ChatSession.open(args.data_dir or _default_data_dir(), args.session) if args.session else None
    llm = load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if session is not None:
        earlier = session.messages()
        messages += earlier
        print(f"session {args.session!r}: resumed with {len(earlier)} earlier messages" if earlier
              else f"session {args.session!r}: new", file=sys.stderr)
    print("chat with the model; an empty line or Ctrl-D ends the session", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        for delta in llm.stream(llm.chat_prompt(messages), sampling_params(args)):
            reply += delta
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
        if session is not None:
            session.add_turn(line, reply)
    return 0


def _default_data_dir() -> str:
    from freehold.server.main import default_data_dir
    return default_data_dir()


def evaluate(args: argparse.Namespace) -> int:
    if args.eval_command == "structured":
        return evaluate_structured(args)
    if args.eval_command == "tools":
        return evaluate_tools(args)
    if args.eval_command == "retrieval":
        return evaluate_retrieval(args)
    if args.eval_command == "agent":
        return evaluate_agent(args)
    if args.eval_command == "memory":
        return evaluate_memory(args)
    from freehold.engine.memory import create_kv_cache
    from freehold.eval.ppl import default_text, perplexity
    from freehold.models.loader import load_model
    from freehold.tokenizer import Tokenizer
    if args.text is not None and not args.text.is_file():
        raise InvalidRequestError(f"text file not found: {args.text}")
    if args.kv_policy:
        from freehold.eval.streaming import parse_policies
        parse_policies(args.kv_policy)  # a bad list is an error before the model loads
    else:
        stray = [flag for flag, used in (("--decode", args.decode), ("--plot", args.plot),
                                         ("--recompute-every", args.recompute_every != 1)) if used]
        if stray:
            raise InvalidRequestError(f"{', '.join(stray)} only apply with --kv-policy")
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, weights=WeightMode(args.weights))
    ids = Tokenizer.from_model_path(loaded.path).encode(text, add_special_tokens=False)
    config = EngineConfig(device=args.device, dtype=DTYPES[args.dtype], kv_dtype=KVDtype(args.kv_dtype))
    if args.kv_policy:
        return _evaluate_streaming(args, loaded, ids, config)
    cache = create_kv_cache(loaded.config, config, num_blocks=-(-args.window // config.block_size))
    t0 = time.perf_counter()
    result = perplexity(loaded.model, ids, args.window, args.max_tokens, cache=cache,
                        progress=lambda i, n: print(f"\rwindow {i}/{n}", end="", file=sys.stderr))
    print(file=sys.stderr)
    kv = str(config.cache_dtype).removeprefix("torch.")
    print(f"perplexity {result.perplexity:.4f} (weights {args.weights}, KV {args.kv_dtype}: {kv}) over "
          f"{result.num_predicted} predicted tokens ({result.num_windows} windows of {args.window}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _evaluate_streaming(args: argparse.Namespace, loaded, ids: list[int], config: EngineConfig) -> int:
    from freehold.bench.common import write_results
    from freehold.eval.streaming import decode_speed, parse_checkpoints, parse_policies, plot, stream_ppl
    if args.plot:
        require_extra("matplotlib", "inspect", "freehold eval ppl --plot")
    checkpoints = parse_checkpoints(args.tokens, len(ids))
    results = {}
    for policy in parse_policies(args.kv_policy):
        t0 = time.perf_counter()
        results[policy] = stream_ppl(loaded.model, loaded.config, config, ids, policy, args.sink_tokens, args.window,
                                     args.chunk, checkpoints, args.recompute_every)
        print(f"{policy}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    decode = {}
    if args.decode:
        decode = {n: (rate, held) for n, rate, held in decode_speed(
            loaded.model, loaded.config, config, ids, args.sink_tokens, args.window, checkpoints)}
    reference = results.get("recompute")
    full = results.get("full")
    rows = []
    for r in results.values():
        for c in r.checkpoints:
            vs_recompute = vs_full = "-"
            mine = {p for p in r.positions if p < c.tokens}
            if reference is not None and r is not reference:
                shared = mine & set(reference.positions)
                vs_recompute = round(r.perplexity_at(shared) / reference.perplexity_at(shared), 4)
            if full is not None and r is not full and c.tokens <= full.positions[-1] + 1:  # full stops at the context
                shared = mine & set(full.positions)
                vs_full = round(r.perplexity_at(shared) / full.perplexity_at(shared), 4)
            rows.append([r.policy, c.tokens, round(c.perplexity, 3), vs_recompute, vs_full, c.kv_bytes,
                         round(c.tokens_per_second, 1)])
    headers = ["policy", "tokens", "ppl", "ppl / recompute (same positions)", "ppl / full (same positions)",
               "KV bytes held", "stream tok/s (segment)"]
    for n, (rate, held) in decode.items():
        rows.append(["sink decode", n, "-", "-", "-", held, round(rate, 1)])
    extra = {"sink_tokens": args.sink_tokens, "window": args.window, "chunk": args.chunk,
             "recompute_every": args.recompute_every, "text_tokens": len(ids), "kv_dtype": args.kv_dtype,
             "weights": args.weights}
    write_results("streaming_ppl", headers, rows, extra, args.out)
    if args.plot:
        plot(list(results.values()), args.plot)
        print(f"plot: {args.plot}")
    return 0


def evaluate_structured(args: argparse.Namespace) -> int:
    from freehold.bench.common import format_table, write_results
    from freehold.constrain.compiler import ConstraintCompiler
    from freehold.eval.structured import HEADERS, Settings, evaluate_subset, load_schemas, report_details
    require_extra("jsonschema", "eval", "freehold eval structured (it validates each output against its schema)")
    llm = load_llm(args)
    compiler = ConstraintCompiler(llm.tokenizer, llm.loaded.config.vocab_size)
    settings = Settings(args.max_tokens, args.frequency_penalty)
    rows = []
    for subset in [s for s in args.subsets.split(",") if s]:
        cases = load_schemas(args.data / subset, args.limit)
        print(f"{subset}: {len(cases)} schemas", file=sys.stderr)
        report, results = evaluate_subset(llm, compiler, subset, cases, settings)
        write_results(f"structured_{subset}", HEADERS, [report.row()], report_details(results, settings), args.out)
        rows.append(report.row())
    print(format_table(HEADERS, rows))
    return 0


def evaluate_tools(args: argparse.Namespace) -> int:
    from freehold.bench.common import format_table, write_results
    from freehold.eval.tools import HEADERS, MODES, details, evaluate, find_categories, load_items
    require_extra("jsonschema", "eval", "freehold eval tools (it validates each call against its tool's schema)")
    found = find_categories(args.data)
    names = [c for c in args.categories.split(",") if c] if args.categories else list(found)
    modes = [m for m in args.modes.split(",") if m]
    for name in [n for n in names if n not in found] + [m for m in modes if m not in MODES]:
        raise InvalidRequestError(f"unknown category or mode {name!r} (categories in {args.data}: "
                                  f"{', '.join(found) or 'none'}; modes: {', '.join(MODES)})")
    llm = load_llm(args)
    rows = []
    for name in names:
        items = load_items(found[name], name, args.limit)
        reports = [evaluate(llm, name, items, mode, args.max_tokens, args.frequency_penalty,
                            lambda i, n, m=mode: print(f"\r{name} {m}: {i}/{n}", end="", file=sys.stderr))
                   for mode in modes]
        print(file=sys.stderr)
        write_results(f"tools_{name}", HEADERS, [r.row() for r, _ in reports],
                      {"max_tokens": args.max_tokens, "temperature": 0.0, "frequency_penalty": args.frequency_penalty,
                       "items": [d for _, outcomes in reports for d in details(outcomes)]}, args.out)
        rows += [r.row() for r, _ in reports]
    print(format_table(HEADERS, rows))
    return 0


def load_embedder(args: argparse.Namespace):
    require_extra("bm25s", "retrieval", "retrieval (BM25 and the vector index)")
    require_extra("usearch", "retrieval", "retrieval (BM25 and the vector index)")
    from freehold.embed import Embedder
    return Embedder(args.embedding_model)


def index(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from freehold.retrieval.chunking import ChunkingStrategy
    from freehold.retrieval.corpus import read_corpus
    from freehold.retrieval.store import VectorStore
    if (args.out / "store.sqlite").exists():
        raise InvalidRequestError(f"{args.out} already holds a vector store", param="out")
    strategy = ChunkingStrategy(args.max_chunk_tokens, args.chunk_overlap_tokens)
    files = [dataclasses.replace(f, chunking=strategy) for f in read_corpus(args.data)]
    store = VectorStore(args.out, load_embedder(args), create=True, name=args.data.name)
    t0 = time.perf_counter()
    with tqdm(total=0, unit="chunk", desc="embedding") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        records = store.add_files(files, progress)
    failed = [r for r in records if r.status.value == "failed"]
    print(f"indexed {len(records) - len(failed)} files ({sum(r.num_chunks for r in records)} chunks) into "
          f"{args.out} in {time.perf_counter() - t0:.1f} s" + (f"; {len(failed)} failed" if failed else ""))
    for r in failed[:10]:
        print(f"  {r.filename}: {r.error}", file=sys.stderr)
    return 0


def search(args: argparse.Namespace) -> int:
    from freehold.retrieval.store import VectorStore
    embedder = load_embedder(args)
    result = VectorStore(args.store, embedder).search(args.query, args.mode, args.k)
    for rank, hit in enumerate(result.hits, start=1):
        text = " ".join(hit.text.split())
        print(f"{rank:>3}. {hit.score:.4f}  {hit.filename}  (chunk {hit.chunk_id})\n     {text[:300]}")
    return 0


def evaluate_retrieval(args: argparse.Namespace) -> int:
    import tempfile
    from tqdm import tqdm
    from freehold.bench.common import write_results
    from freehold.eval.retrieval import HEADERS, evaluate_mode, open_or_build_store, parse_modes, read_queries
    require_extra("ir_measures", "eval", "freehold eval retrieval (metrics by ir-measures)")
    queries, qrels = read_queries(args.data)
    modes = parse_modes(args.modes)
    embedder = load_embedder(args)
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=0, unit="chunk", desc="indexing") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        store, build = open_or_build_store(args.data, args.store or Path(tmp) / "store", embedder, progress)
        bar.close()
        reports = [evaluate_mode(store, queries, qrels, mode) for mode in modes]
        store.close()
    if build is None:
        print(f"searched the existing store {args.store} (index build not measured)")
    else:
        print(f"index build: {build.num_docs} docs ({build.num_chunks} chunks) in {build.seconds:.1f} s = "
              f"{build.docs_per_second:.1f} docs/s")
    extra = {"build": dataclasses.asdict(build), "docs_per_second": build.docs_per_second} if build else {}
    write_results(f"retrieval_{args.data.name}", HEADERS, [r.row() for r in reports], extra, args.out)
    return 0


def evaluate_agent(args: argparse.Namespace) -> int:
    import tempfile
    from freehold.agent.evaluation import (HEADERS, Category, Mode, Resources, all_tasks, check_targets, evaluate,
                                           select, summarize)
    from freehold.agent.evaluation.pydoc_store import build_pydoc_store
    from freehold.agent.evaluation.run import parse_choices
    from freehold.agent.evaluation.tasks import HANG_SECONDS
    from freehold.agent.limits import Limits
    from freehold.bench.common import write_results
    try:
        categories = parse_choices(args.categories, Category, "--categories")
        modes = parse_choices(args.modes, Mode, "--modes")
        limits = Limits(max_steps=args.max_steps, max_tool_calls=2 * args.max_steps, max_turn_tokens=args.max_tokens,
                        max_seconds=args.max_seconds, tool_timeout=args.tool_timeout)
        if args.retries_after_error < 0:
            raise ValueError(f"--retries-after-error must be at least 0, got {args.retries_after_error}")
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    tasks = select(all_tasks(hang_seconds=max(HANG_SECONDS, 3 * args.tool_timeout)), categories, args.limit)
    needs_store = Mode.TOOLS in modes and any(t.category is Category.LOOKUP for t in tasks)
    embedder = load_embedder(args) if needs_store else None
    llm = load_llm(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        resources, build = Resources(), None
        if embedder is not None:
            resources, build = build_pydoc_store(tmp, embedder)
            print(f"pydoc store: {build.num_files} topics, {build.num_chunks} chunks in {build.seconds:.1f} s",
                  file=sys.stderr)
        def progress(i: int, n: int, outcome) -> None:
            print(f"\r{i}/{n} {outcome.task_id} {outcome.mode.value}: {outcome.stop_reason}".ljust(60), end="",
                  file=sys.stderr)
        outcomes = evaluate(llm, tasks, modes, resources, limits, args.trace, progress, args.tool_choice,
                            args.retries_after_error)
    print(file=sys.stderr)
    targets = check_targets(outcomes)
    extra = {"model": llm.loaded.config.name, "limits": limits.as_dict(), "tool_choice": args.tool_choice,
             "retries_after_error": args.retries_after_error,
             "store_build": build, "seconds": time.perf_counter() - t0,
             "targets": [dataclasses.asdict(t) for t in targets], "runs": [o.as_dict() for o in outcomes]}
    write_results("agent", HEADERS, [s.row() for s in summarize(outcomes)], extra, args.out)
    for target in targets:
        print(f"{'met' if target.met else 'NOT MET'}: {target.name} ({target.value})")
    return 0


def evaluate_memory(args: argparse.Namespace) -> int:
    from freehold.bench.common import write_results
    from freehold.eval.memory import HEADERS, make_conversation, num_tokens, parse_policies, run_policy, run_sink
    from freehold.kv.sink import SinkWindow
    from freehold.memory.context import ContextBudget
    from freehold.models.locate import default_model_path
    from freehold.tokenizer import Tokenizer
    require_extra("bm25s", "retrieval", "freehold eval memory (BM25 over the conversation)")
    try:
        policies = parse_policies(args.policies)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    window = sink_window(args.budget) if "sink" in policies else None
    llm = None if args.no_model else load_llm(args, **({"window": window} if window else {}))
    tokenizer = llm.tokenizer if llm is not None else Tokenizer.from_model_path(args.model or default_model_path())
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    embed = None
    if args.dense:
        embedder = load_embedder(args)
        embed = lambda texts: embedder.embed(list(texts)).vectors  # noqa: E731

    def answerer(kv_policy: KVPolicy | None):
        def answer(messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, kv_policy=kv_policy)
            generation = llm.chat(messages, params)[0]
            return generation.text, generation.num_cached_tokens, len(generation.prompt_token_ids)
        return answer if llm is not None else None

    conversations = [make_conversation(args.seed + i, args.turns, args.facts) for i in range(args.conversations)]
    sizes = [num_tokens(c, count) for c in conversations]
    print(f"{len(conversations)} conversations of {args.turns} turns, {min(sizes)}-{max(sizes)} tokens each; "
          f"budget {args.budget} tokens", file=sys.stderr)
    reports = []
    for policy in policies:
        report = None
        for i, conversation in enumerate(conversations):
            name = policy if policy == "sink" else policy.value
            print(f"\r{name}: conversation {i + 1}/{len(conversations)}", end="", file=sys.stderr)
            if policy == "sink":
                render_ids = lambda messages: llm_prompt(tokenizer, messages)  # noqa: E731
                sinks = SinkWindow.from_tokens(4, window, 16).num_sink_tokens
                report = run_sink(conversation, window, count, ContextBudget(args.budget).message_overhead, render_ids,
                                  tokenizer.decode, answerer(KVPolicy.SINK), report, args.max_tokens, sinks)
            else:
                report = run_policy(conversation, ContextBudget(args.budget, policy), count, embed,
                                    answerer(None), report, args.max_tokens, args.every_turn)
        reports.append(report)
    print(file=sys.stderr)
    extra = {"turns": args.turns, "conversations": args.conversations, "facts": args.facts, "budget": args.budget,
             "dense": args.dense, "model": None if llm is None else llm.describe(), "conversation_tokens": sizes,
             "sink_window": window, "every_turn": args.every_turn,
             "threads": torch.get_num_threads()}
    write_results("memory", HEADERS, [r.row() for r in reports], extra, args.out)
    return 0


def sink_window(budget: int, sink_tokens: int = 4, block_size: int = 16) -> int:
    """The largest window (whole blocks) whose sink sequences hold at most `budget` tokens (sinks + W + E)."""
    from freehold.kv.sink import SinkWindow
    window = budget - budget % block_size
    while window >= block_size and SinkWindow.from_tokens(sink_tokens, window, block_size).max_cache_len > budget:
        window -= block_size
    if window < block_size:
        least = SinkWindow.from_tokens(sink_tokens, block_size, block_size).max_cache_len
        raise InvalidRequestError(f"--budget {budget} is too small for the sink policy: its sinks, one window block "
                                  f"and one eviction step take {least} tokens")
    return window


def llm_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A chat's prompt ids as LLM.chat renders them (no tools)."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def kv_plan(args: argparse.Namespace) -> int:
    from freehold.kv.planner import format_plan, parse_size, plan, read_model_for_plan
    from freehold.models.locate import resolve_model_path
    path = Path(args.model) if args.model and args.model.endswith(".json") else resolve_model_path(args.model)
    if not path.exists():
        raise InvalidRequestError(f"config file not found: {path}")
    cfg, weight_bytes = read_model_for_plan(path)
    print(format_plan(plan(cfg, weight_bytes, parse_size(args.memory), args.block_size)))
    return 0


def bench(args: argparse.Namespace) -> int:
    from freehold.bench.cli import run_bench
    return run_bench(args)


def inspect(args: argparse.Namespace) -> int:
    if args.inspect_command == "attention":
        return inspect_attention(args)
    from freehold.sampling.inspect import format_table, inspect_distribution, save_chart
    require_extra("matplotlib", "inspect", "freehold inspect sampling (it draws a chart)")
    llm = load_llm(args)
    ids = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else llm.encode_prompt(args.prompt)
    model = llm.loaded.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=args.device), torch.arange(len(ids), device=args.device))
        logits = model.compute_logits(hidden[-1:])[0].cpu()
    temps = [float(t) for t in args.temperatures.split(",")]
    results = inspect_distribution(logits, lambda i: llm.tokenizer.decode([i]), temps,
                                   top_p=args.top_p, min_p=args.min_p, top_n=args.top_n)
    print(format_table(results))
    print(f"chart saved to {save_chart(results, args.chart)}")
    return 0


DEFAULT_ATTENTION_TOKENS = 512  # without --prompt: this many tokens from the start of the pydoc text


def inspect_attention(args: argparse.Namespace) -> int:
    from freehold.models.attention_map import format_table, measure_sink_attention, save_heatmap
    if args.sink_tokens < 1:
        raise InvalidRequestError(f"--sink-tokens must be at least 1, got {args.sink_tokens}")
    if args.png is not None:
        require_extra("matplotlib", "inspect", "freehold inspect attention --png (it draws a heatmap)")
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FreeholdError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from exc
    else:
        text = args.prompt
    if text is not None and not text.strip():
        raise InvalidRequestError("the prompt is empty: give --prompt TEXT or a --prompt-file with text in it")
    llm = load_llm(args)
    if text is None:
        from freehold.eval.ppl import default_text
        ids = llm.encode_prompt(default_text()[:8 * DEFAULT_ATTENTION_TOKENS])[:DEFAULT_ATTENTION_TOKENS]
    else:
        ids = llm.encode_prompt(text)
    result = measure_sink_attention(llm.loaded.model, ids, args.sink_tokens)
    print(format_table(result))
    if args.png is not None:
        print(f"heatmap saved to {save_heatmap(result, args.png)}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from freehold.server.main import serve as run_server
    return run_server(args)


def agent(args: argparse.Namespace) -> int:
    """`freehold agent TASK`: run the loop, printing each step as it happens; `freehold agent trace FILE`."""
    from freehold.agent.trace import read_trace, render, render_event
    if args.task == "trace" and args.file is None:
        raise FreeholdError("freehold agent trace FILE: name the JSONL trace to render")
    if args.task == "trace":
        try:
            print(render(read_trace(args.file)))
        except (OSError, ValueError) as exc:
            raise FreeholdError(f"cannot read the trace {args.file}: {exc}") from None
        return 0
    if args.file is not None:
        raise FreeholdError(f"unexpected argument {str(args.file)!r}: quote the task, or `freehold agent trace FILE`")
    from freehold.agent import Agent, Limits, StopReason
    try:
        limits = Limits(max_steps=args.max_steps, max_tool_calls=args.max_tool_calls,
                        max_total_tokens=args.max_total_tokens, max_turn_tokens=args.max_tokens,
                        max_seconds=args.max_seconds, tool_timeout=args.tool_timeout)
        if args.retries_after_error < 0:
            raise ValueError(f"--retries-after-error must be at least 0, got {args.retries_after_error}")
        if args.retries_after_error and (args.tools.strip() in ("", "none") or args.tool_choice == "none"):
            raise ValueError("--retries-after-error needs tools the model may call (not --tools none or "
                             "--tool-choice none)")
        tools = agent_tools(args)
    except ValueError as exc:
        raise FreeholdError(str(exc)) from None
    if args.base_url is not None:
        import os
        from freehold.agent.models import RemoteModel
        model = RemoteModel(args.base_url, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
    else:
        model = load_llm(args)
    runner = Agent(model, tools, instructions=args.instructions, limits=limits, tool_choice=args.tool_choice,
                   retries_after_error=args.retries_after_error)
    result = runner.run(args.task, trace=args.trace,
                        on_event=lambda e: [print(line, flush=True) for line in render_event(e)])
    return 0 if result.stop_reason is StopReason.ANSWER else 1


def agent_tools(args: argparse.Namespace) -> list:
    """The built-in tools named by --tools (read_file under --root, file_search over --store)."""
    from freehold.agent.builtin import builtin_tools
    names = [n.strip() for n in args.tools.split(",") if n.strip() and n.strip() != "none"]
    manager, store_ids = None, ()
    if "file_search" in names:
        if args.store is None:
            raise ValueError("--tools file_search needs --store DIR (a store built by `freehold index build`)")
        manager, store_ids = open_cli_store(args)
    return builtin_tools(names, root=args.root or Path.cwd(), manager=manager, vector_store_ids=store_ids)


def open_cli_store(args: argparse.Namespace):
    """--store DIR as file_search's store manager (the folder must hold a store built by `freehold index build`)."""
    from freehold.agent.builtin.file_search import StoreFolder
    from freehold.retrieval.store import VectorStore
    if not (args.store / "store.sqlite").is_file():
        raise ValueError(f"--store {args.store}: no store there (build one with `freehold index build --out DIR`)")
    return StoreFolder(VectorStore(args.store, load_embedder(args))), [StoreFolder.ID]

