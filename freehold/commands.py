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


def load_llm(args: argparse.Namespace):
    from freehold.kv.planner import parse_size
    from freehold.llm import LLM
    t0 = time.perf_counter()
    speculative = {"speculative": SpeculativeMode(args.speculative), "draft_model": args.draft_model,
                   "draft_weights": WeightMode(args.draft_weights),
                   "num_speculative_tokens": args.num_speculative_tokens} if hasattr(args, "speculative") else {}
    if hasattr(args, "kv_policy"):
        speculative.update(kv_policy=KVPolicy(args.kv_policy), sink_tokens=args.sink_tokens, window=args.window)
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
    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, weights=WeightMode(args.weights))
    ids = Tokenizer.from_model_path(loaded.path).encode(text, add_special_tokens=False)
    config = EngineConfig(device=args.device, dtype=DTYPES[args.dtype], kv_dtype=KVDtype(args.kv_dtype))
    if args.kv_policy:
        return _evaluate_streaming(args, loaded, ids[:args.tokens], config)
    cache = create_kv_cache(loaded.config, config, num_blocks=-(-args.window // config.block_size))
    t0 = time.perf_counter()
    result = perplexity(loaded.model, ids, args.window, args.max_tokens, cache=cache,
                        progress=lambda i, n: print(f"\rwindow {i}/{n}", end="", file=sys.stderr))
    print(file=sys.stderr)
    print(f"perplexity {result.perplexity:.4f} (weights {args.weights}, KV {args.kv_dtype}) over {result.num_predicted} predicted tokens "
          f"({result.num_windows} windows of {args.window}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _evaluate_streaming(args: argparse.Namespace, loaded, ids: list[int], config: EngineConfig) -> int:
    from freehold.eval.streaming import plot, stream_ppl
    if args.plot:
        require_extra("matplotlib", "inspect", "freehold eval ppl --plot")
    results = []
    print(f"{'policy':<10} {'ppl':>9} {'scored':>7} {'KV bytes':>11} {'tok/s':>8}  ({len(ids)} tokens, sinks "
          f"{args.sink_tokens}, window {args.window}, chunk {args.chunk})")
    for policy in [p for p in args.kv_policy.split(",") if p]:
        r = stream_ppl(loaded.model, loaded.config, config, ids, policy, args.sink_tokens, args.window, args.chunk)
        results.append(r)
        print(f"{r.policy:<10} {r.perplexity:>9.3f} {r.num_scored:>7} {r.kv_bytes:>11,} {r.tokens_per_second:>8.1f}")
    if args.plot:
        plot(results, args.plot)
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
        outcomes = evaluate(llm, tasks, modes, resources, limits, args.trace, progress, args.tool_choice)
    print(file=sys.stderr)
    targets = check_targets(outcomes)
    extra = {"model": llm.loaded.config.name, "limits": limits.as_dict(), "tool_choice": args.tool_choice,
             "store_build": build, "seconds": time.perf_counter() - t0,
             "targets": [dataclasses.asdict(t) for t in targets], "runs": [o.as_dict() for o in outcomes]}
    write_results("agent", HEADERS, [s.row() for s in summarize(outcomes)], extra, args.out)
    for target in targets:
        print(f"{'met' if target.met else 'NOT MET'}: {target.name} ({target.value})")
    return 0


def evaluate_memory(args: argparse.Namespace) -> int:
    from freehold.bench.common import write_results
    from freehold.eval.memory import HEADERS, make_conversation, num_tokens, parse_policies, run_policy
    from freehold.memory.context import ContextBudget
    from freehold.models.locate import default_model_path
    from freehold.tokenizer import Tokenizer
    require_extra("bm25s", "retrieval", "freehold eval memory (BM25 over the conversation)")
    try:
        policies = parse_policies(args.policies)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    llm = None if args.no_model else load_llm(args)
    tokenizer = llm.tokenizer if llm is not None else Tokenizer.from_model_path(args.model or default_model_path())
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    embed = None
    if args.dense:
        embedder = load_embedder(args)
        embed = lambda texts: embedder.embed(list(texts)).vectors  # noqa: E731
    answer = None
    if llm is not None:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        answer = lambda messages: llm.chat(messages, params)[0].text  # noqa: E731
    conversations = [make_conversation(args.seed + i, args.turns, args.facts) for i in range(args.conversations)]
    sizes = [num_tokens(c, count) for c in conversations]
    print(f"{len(conversations)} conversations of {args.turns} turns, {min(sizes)}-{max(sizes)} tokens each; "
          f"budget {args.budget} tokens", file=sys.stderr)
    reports = []
    for policy in policies:
        budget = ContextBudget(args.budget, policy)
        report = None
        for i, conversation in enumerate(conversations):
            print(f"\r{policy.value}: conversation {i + 1}/{len(conversations)}", end="", file=sys.stderr)
            report = run_policy(conversation, budget, count, embed, answer, report)
        reports.append(report)
    print(file=sys.stderr)
    extra = {"turns": args.turns, "conversations": args.conversations, "facts": args.facts, "budget": args.budget,
             "dense": args.dense, "model": None if llm is None else llm.describe(), "conversation_tokens": sizes,
             "threads": torch.get_num_threads()}
    write_results("memory", HEADERS, [r.row() for r in reports], extra, args.out)
    return 0


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
        tools = agent_tools(args)
    except ValueError as exc:
        raise FreeholdError(str(exc)) from None
    if args.base_url is not None:
        import os
        from freehold.agent.models import RemoteModel
        model = RemoteModel(args.base_url, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"))
    else:
        model = load_llm(args)
    runner = Agent(model, tools, instructions=args.instructions, limits=limits, tool_choice=args.tool_choice)
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

