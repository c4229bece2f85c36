"""The `freehold` command: parses arguments, calls the library, prints. Errors print one line, no traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freehold.errors import FreeholdError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--weights", choices=["auto", "fp32", "bf16", "int8", "int4"], default="auto",
                   help="auto keeps a GGUF's own quantization (int4/int8 kernels); fp32/bf16 dequantize")
    p.add_argument("--kv-dtype", choices=["auto", "fp32", "bf16", "fp16", "int8"], default="auto",
                   help="what the KV cache stores: auto = bf16 on CPU (fp32 activations), else the activation dtype; "
                        "fp32 keeps exactly what the model computed; int8 holds twice bf16's tokens")
    p.add_argument("--kv-cache-memory", default="256M", help="KV cache size, e.g. 256M or 2G")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _add_eval_run_args(p: argparse.ArgumentParser, items: str, result_name: str) -> None:
    """The options every generating evaluation shares: how many items, how long, where results go, which model."""
    p.add_argument("--limit", type=int, default=None, help=f"the first N {items}")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="greedy decoding with this penalty")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help=f"folder for {result_name}.json and .md (default: ./bench-results/)")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freehold", description="Self-hosted LLM inference server and runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    from freehold.server.main import add_kv_policy_arguments, add_serve_arguments, add_speculative_arguments
    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server"))

    g = sub.add_parser("generate", help="complete a prompt")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    _add_sampling_args(g)
    add_speculative_arguments(g)
    add_kv_policy_arguments(g)

    c = sub.add_parser("chat", help="interactive terminal chat, streaming tokens")
    c.add_argument("--system", default=None)
    c.add_argument("--session", default=None, metavar="NAME",
                   help="keep the conversation under this name and resume it on the next run (stored in SQLite "
                        "in --data-dir, as a conversation of the server's Conversations API)")
    c.add_argument("--data-dir", default=None, metavar="DIR",
                   help="with --session: where it is kept (default: the server's, $XDG_DATA_HOME/freehold or "
                        "~/.local/share/freehold)")
    _add_model_args(c)
    _add_sampling_args(c)
    add_speculative_arguments(c)
    add_kv_policy_arguments(c)

    e = sub.add_parser("eval", help="evaluations")
    esub = e.add_subparsers(dest="eval_command", required=True)
    ppl = esub.add_parser("ppl", help="perplexity over a text (default: pydoc topics)")
    ppl.add_argument("--text", type=Path, default=None, help="a UTF-8 text file")
    ppl.add_argument("--max-tokens", type=int, default=32768)
    ppl.add_argument("--window", type=int, default=1024,
                     help="tokens per scored window; with --kv-policy: the KV window (tokens kept)")
    ppl.add_argument("--kv-policy", default=None,
                     help="stream the text under KV policies instead, comma-separated: full, sink, window "
                          "(no sinks), recompute (sliding window re-computed, like for like with sink)")
    ppl.add_argument("--sink-tokens", type=int, default=4, help="with --kv-policy sink (rounded up to blocks)")
    ppl.add_argument("--tokens", default="8192",
                     help="with --kv-policy: tokens of the text to stream; comma-separated checkpoints "
                          "(e.g. 8192,32768,110000) report each length from one stream")
    ppl.add_argument("--chunk", type=int, default=64, help="with --kv-policy: tokens per prefill chunk")
    ppl.add_argument("--recompute-every", type=int, default=1,
                     help="with recompute: score one eviction step in N (the reference costs ~9x a stream)")
    ppl.add_argument("--decode", action="store_true",
                     help="with --kv-policy: also time decoding in sink mode at each checkpoint (a request whose prompt is "
                          "the text up to there, generating 512 tokens)")
    ppl.add_argument("--plot", default=None, metavar="PNG", help="with --kv-policy: ppl against position")
    ppl.add_argument("--out", type=Path, default=Path("bench-results"),
                     help="with --kv-policy: folder for streaming_ppl.json and .md")
    _add_model_args(ppl)
    st = esub.add_parser("structured", help="JSON-schema-constrained generation: compile coverage, validity, cost")
    st.add_argument("--data", type=Path, required=True,
                    help="a folder of subsets, each a folder of JSON Schema files (e.g. JSONSchemaBench's data/)")
    st.add_argument("--subsets", default="Github_easy,Glaiveai2K", help="comma-separated subset folders of --data")
    _add_eval_run_args(st, "schemas of each subset", "structured_SUBSET")
    tl = esub.add_parser("tools", help="BFCL function calling: constrained vs unconstrained + parse")
    tl.add_argument("--data", type=Path, required=True,
                    help="a BFCL data folder: BFCL_v*_CATEGORY.json files and possible_answer/")
    tl.add_argument("--categories", default=None, help="comma-separated (default: every AST category found)")
    tl.add_argument("--modes", default="constrained,unconstrained", help="comma-separated")
    _add_eval_run_args(tl, "items of each category", "tools_CATEGORY")

    rt = esub.add_parser("retrieval", help="BEIR folder: nDCG@10, Recall@100, MRR@10 for bm25, dense, hybrid")
    rt.add_argument("--data", type=Path, required=True,
                    help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    rt.add_argument("--modes", default="bm25,dense,hybrid", help="comma-separated")
    rt.add_argument("--store", type=Path, default=None,
                    help="keep the built store in this folder (default: a temp dir); one already there is reused")
    rt.add_argument("--embedding-model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    rt.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for retrieval_NAME.json and .md")
    ev = esub.add_parser("agent", help="the agent loop on a shipped task set (arithmetic, pydoc look-ups, faulty "
                                       "tools), with and without tools")
    ev.add_argument("--limit", type=int, default=None, help="the first N tasks of each category")
    ev.add_argument("--categories", default="arithmetic,lookup,fault", help="comma-separated")
    ev.add_argument("--modes", default="tools,no_tools", help="comma-separated (fault tasks run with tools only)")
    ev.add_argument("--max-steps", type=int, default=5, help="model turns per run")
    ev.add_argument("--max-tokens", type=int, default=192, help="max_tokens of one model turn")
    ev.add_argument("--max-seconds", type=float, default=60.0, help="wall clock per run")
    ev.add_argument("--tool-timeout", type=float, default=2.0,
                    help="seconds per tool call (the hanging tool outlasts it)")
    ev.add_argument("--tool-choice", choices=["auto", "required"], default="auto",
                    help="the first turn's tool_choice with tools: required makes the model start with a call")
    ev.add_argument("--retries-after-error", type=int, default=0,
                    help="times per run the turn after a failed call must call again (the failed tool; any tool "
                         "when several failed)")
    ev.add_argument("--trace", type=Path, default=None, help="write each run's JSONL trace into this folder")
    ev.add_argument("--embedding-model", default=None, help="for the pydoc store (default: all-MiniLM-L6-v2)")
    ev.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for agent.json and .md")
    _add_model_args(ev)

    mm = esub.add_parser("memory", help="long generated conversations: is the planted fact in the prompt under "
                                        "a token budget (memory vs truncation), answer accuracy, cost")
    mm.add_argument("--conversations", type=int, default=2)
    mm.add_argument("--turns", type=int, default=150, help="turns per conversation (a turn: message + reply)")
    mm.add_argument("--facts", type=int, default=5, help="facts planted early, asked about in the last turns")
    mm.add_argument("--budget", type=int, default=2048, help="prompt token budget per turn")
    mm.add_argument("--policies", default="memory,truncate",
                    help="comma-separated: memory, truncate, sink (the whole conversation under the KV policy sink, "
                         "its window the budget)")
    mm.add_argument("--every-turn", action="store_true",
                    help="with a model: run every turn's prompt through the engine (one token) to measure its "
                         "cached_tokens share (slow: a prefill per turn)")
    mm.add_argument("--dense", action="store_true", help="recall with BM25 + all-MiniLM-L6-v2 (default: BM25 only)")
    mm.add_argument("--embedding-model", default=None, help="with --dense (default: all-MiniLM-L6-v2)")
    mm.add_argument("--no-model", action="store_true", help="recall and cost only: no answers, no accuracy")
    mm.add_argument("--max-tokens", type=int, default=24, help="tokens of each answer")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for memory.json and .md")
    _add_model_args(mm)

    a = sub.add_parser("agent", help="run a task with tools (`freehold agent trace FILE` renders a trace)",
                       description="Run TASK through the agent loop: model turn -> tool calls -> results -> next "
                                   "turn, until an answer or a limit; each step is printed as it happens.")
    a.add_argument("task", help="the task, or `trace` to render the trace FILE")
    a.add_argument("file", nargs="?", type=Path, help="with `trace`: a JSONL trace written by --trace")
    a.add_argument("--tools", default="calculator",
                   help="comma-separated built-in tools: calculator, python, read_file, file_search (or none)")
    a.add_argument("--instructions", default=None, help="the system message")
    a.add_argument("--tool-choice", choices=["auto", "required", "none"], default="auto",
                   help="for the first turn (later turns are auto): required makes the model start with a call")
    a.add_argument("--retries-after-error", type=int, default=0,
                   help="times per run the turn after a failed call must call again (the failed tool; any tool "
                        "when several failed; default 0)")
    a.add_argument("--max-steps", type=int, default=8, help="model turns")
    a.add_argument("--max-tool-calls", type=int, default=16)
    a.add_argument("--max-total-tokens", type=int, default=None, help="prompt + completion tokens of the run")
    a.add_argument("--max-tokens", type=int, default=512, help="max_tokens of one model turn")
    a.add_argument("--max-seconds", type=float, default=300.0, help="wall clock of the run")
    a.add_argument("--tool-timeout", type=float, default=30.0, help="seconds per tool call")
    a.add_argument("--trace", type=Path, default=None, help="append the run's events to this JSONL file")
    a.add_argument("--root", type=Path, default=None, help="read_file: the directory it may read (default: .)")
    a.add_argument("--store", type=Path, default=None, help="file_search: a store built by `freehold index build`")
    a.add_argument("--embedding-model", default=None, help="file_search: the folder the store was built with")
    a.add_argument("--base-url", default=None,
                   help="use this OpenAI-compatible server (e.g. http://localhost:8000/v1) instead of a local model")
    a.add_argument("--api-key", default=None, help="with --base-url (default: $OPENAI_API_KEY)")
    a.add_argument("--served-model", default=None, help="with --base-url: the `model` to ask for")
    _add_model_args(a)

    ix = sub.add_parser("index", help="build a vector store from documents")
    ixsub = ix.add_subparsers(dest="index_command", required=True)
    ib = ixsub.add_parser("build", help="chunk, embed and index a BEIR corpus.jsonl or a folder of .txt/.md files")
    ib.add_argument("--data", type=Path, required=True, help="corpus.jsonl (BEIR: _id, title, text) or a folder")
    ib.add_argument("--out", type=Path, required=True, help="the store's folder (created; must not hold a store)")
    ib.add_argument("--max-chunk-tokens", type=int, default=800)
    ib.add_argument("--chunk-overlap-tokens", type=int, default=400)
    ib.add_argument("--embedding-model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    sr = sub.add_parser("search", help="ranked chunks of a store built by `freehold index build`")
    sr.add_argument("store", type=Path)
    sr.add_argument("query")
    sr.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid")
    sr.add_argument("-k", type=int, default=10, help="number of results")
    sr.add_argument("--embedding-model", default=None, help="the folder the store was built with (default: MiniLM)")

    k = sub.add_parser("kv-plan", help="what fits: KV bytes/token, tokens and concurrent requests for a memory size")
    k.add_argument("model", nargs="?", default=None, help="GGUF, HF dir or config.json (default: the default model)")
    k.add_argument("--memory", default="8G", help="total memory for weights + KV, e.g. 24G")
    k.add_argument("--block-size", type=int, default=16)

    from freehold.bench.cli import add_bench_arguments
    add_bench_arguments(sub.add_parser("bench", help="benchmarks (tables to ./bench-results/ or --out DIR)"))

    i = sub.add_parser("inspect", help="look inside the model's decisions")
    isub = i.add_subparsers(dest="inspect_command", required=True)
    s = isub.add_parser("sampling", help="what temperature/top-p/min-p do to the next-token distribution")
    s.add_argument("--prompt", required=True)
    s.add_argument("--temperatures", default="0.2,0.7,1.0,1.5")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--top-n", type=int, default=10)
    s.add_argument("--chart", type=Path, default=Path("sampling.png"))
    s.add_argument("--chat", action="store_true")
    _add_model_args(s)
    at = isub.add_parser("attention", help="the share of attention each layer puts on the first tokens (sinks)")
    text = at.add_mutually_exclusive_group()
    text.add_argument("--prompt", default=None, help="default: the first 512 tokens of the pydoc text")
    text.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from this UTF-8 file")
    at.add_argument("--sink-tokens", type=int, default=4, help="how many first tokens count as sinks (default 4)")
    at.add_argument("--png", type=Path, default=None, help="also draw a layers x heads heatmap to this PNG")
    _add_model_args(at)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from freehold import commands
        return commands.run(args)
    except FreeholdError as exc:
        print(f"freehold: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
