"""Serving benchmark: an asyncio load generator against Freehold's OpenAI API (streamed /v1/completions).

Workload: `--num-requests` requests per concurrency level (closed loop: `concurrency` requests in flight), each
with a prompt of 64-512 tokens cut from the pydoc topics text (a different window per request, so the prefix
cache does not hide prefill) and 64-256 greedy output tokens with ignore_eos. Lengths come from `--seed`.

Per level it reports time to first token and inter-token latency (gaps between streamed text chunks, about one
token each) at p50/p99, output tokens/s and total time; prints a table and writes `--out`/serve.json and serve.md
(default ./bench-results/). `--sweep LEVELS` runs issue 19's concurrency sweep: the levels given, 64 requests
per level of the workload above, and a PNG plot (`--plot`, default `--out`/serve.png) of output tok/s and TTFT
p50/p99 against concurrency (needs matplotlib: the `inspect` extra).

    freehold bench serve --quick                       # starts its own server on a free port
    freehold bench serve --url http://127.0.0.1:8000   # against a running server (default model's tokenizer)
    freehold bench serve --sweep 1,4,16,64             # the sweep, with serve.png
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from freehold.bench.common import write_results
from freehold.errors import FreeholdError

QUICK = {"num_requests": 8, "concurrency": [1, 4], "input_len": (32, 64), "output_len": (16, 32)}
SWEEP = {"num_requests": 64, "input_len": (64, 512), "output_len": (64, 256)}  # issue 19's workload per level
DEFAULT_LEVELS = "1,8,32"


@dataclass
class RequestResult:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class LevelReport:
    concurrency: int
    num_requests: int
    num_failed: int
    total_time_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    mean_prompt_tokens: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="a running OpenAI-compatible server, with or without /v1 "
                                                     "(default: start one on a free port)")
    parser.add_argument("--model", default=None, help="model for the started server and the prompt tokenizer")
    parser.add_argument("--served-model-name", default=None, help="`model` field to send (default: ask the server)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--concurrency", default=None, help=f"comma-separated levels (default: {DEFAULT_LEVELS})")
    parser.add_argument("--sweep", default=None, metavar="LEVELS",
                        help=f"concurrency sweep, e.g. 1,4,16,64: these levels, {SWEEP['num_requests']} requests "
                             f"each, inputs {SWEEP['input_len']}, outputs {SWEEP['output_len']}, and a plot")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of output tok/s and TTFT p50/p99 against concurrency (default with --sweep: "
                             "OUT/serve.png; needs matplotlib, the `inspect` extra)")
    parser.add_argument("--input-len", default="64,512", help="prompt tokens, min,max (default: 64,512)")
    parser.add_argument("--output-len", default="64,256", help="output tokens, min,max (default: 64,256)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (lengths and prompt windows)")
    parser.add_argument("--kv-cache-memory", default=None, help="for the started server, e.g. 1G")
    parser.add_argument("--max-num-seqs", default=None, help="for the started server")
    parser.add_argument("--max-num-batched-tokens", default=None, help="for the started server")
    parser.add_argument("--kv-dtype", default=None, choices=["auto", "fp32", "bf16", "fp16", "int8"],
                        help="for the started server (default: the server's, auto: bf16 on CPU)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small run: {QUICK['num_requests']} requests at {QUICK['concurrency']}, "
                             f"inputs {QUICK['input_len']}, outputs {QUICK['output_len']}")


def run(args: argparse.Namespace) -> int:
    levels, num_requests, input_len, output_len = _workload_shape(args)
    plot = plot_path(args)
    if plot is not None:
        require_matplotlib()  # before the server starts and the levels run
    server = None if args.url else _start_server(args)
    url = server_root(args.url) if args.url else server[0]
    try:
        reports, model = asyncio.run(_bench(url, args, levels, num_requests, input_len, output_len))
    finally:
        if server is not None:
            _stop_server(server[1])
    extra = {"url": url, "model": model, "num_requests": num_requests, "input_len": input_len,
             "output_len": output_len, "seed": args.seed, "quick": args.quick, "sweep": args.sweep is not None,
             "levels": [asdict(r) for r in reports]}
    write_results("serve", TABLE_HEADERS, table_rows(reports), extra, args.out)
    if plot is not None:
        print(f"wrote {plot_sweep(reports, plot, title=f'{model}: {num_requests} requests per level')}")
    return 1 if any(r.num_failed for r in reports) else 0


# ---- workload -----------------------------------------------------------------------------------------------------
def _workload_shape(args: argparse.Namespace) -> tuple[list[int], int, tuple[int, int], tuple[int, int]]:
    if args.sweep is not None and args.concurrency is not None:
        raise SystemExit("give the levels once: --sweep LEVELS or --concurrency LEVELS")
    levels = _levels(args.sweep or args.concurrency or DEFAULT_LEVELS)
    if args.quick:
        return (levels if args.sweep else QUICK["concurrency"]), QUICK["num_requests"], QUICK["input_len"], \
            QUICK["output_len"]
    if args.sweep is not None:
        return levels, SWEEP["num_requests"], SWEEP["input_len"], SWEEP["output_len"]
    return levels, args.num_requests, parse_min_max(args.input_len), parse_min_max(args.output_len)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        raise SystemExit(f"expected comma-separated concurrency levels such as 1,4,16,64, got {text!r}") from None
    if min(levels) < 1:
        raise SystemExit(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def parse_min_max(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"expected min,max (two whole numbers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise SystemExit(f"expected min,max with 1 <= min <= max, got {text!r}")
    return lo, hi


def make_prompts(model: str | None, num: int, input_len: tuple[int, int], seed: int) -> list[tuple[str, int]]:
    """(prompt text, prompt length in tokens) windows of the pydoc topics text."""
    from pydoc_data.topics import topics

    from freehold.models.locate import resolve_model_path
    from freehold.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_model_path(resolve_model_path(model))
    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        length = rng.randint(*input_len)
        start = rng.randrange(0, len(ids) - length)
        prompts.append((tokenizer.decode(ids[start:start + length]), length))
    return prompts


# ---- load generation ----------------------------------------------------------------------------------------------
async def _bench(url: str, args: argparse.Namespace, levels: list[int], num_requests: int,
                 input_len: tuple[int, int], output_len: tuple[int, int]) -> tuple[list[LevelReport], str]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # A connection per request: a kept-alive one that the server closes as it idles (llama.cpp's server does after
    # 5 s) fails the next request sent on it ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600, limits=limits) as client:
        model = args.served_model_name or await _served_model(client, url)
        prompts = await asyncio.to_thread(make_prompts, args.model, num_requests * len(levels), input_len, args.seed)
        rng = random.Random(args.seed + 1)
        outputs = [rng.randint(*output_len) for _ in prompts]
        await _one_request(client, model, "Warm up.", 4)
        reports = []
        for i, level in enumerate(levels):
            batch = slice(i * num_requests, (i + 1) * num_requests)
            reports.append(await _run_level(client, model, level, prompts[batch], outputs[batch]))
            print(f"concurrency {level}: {reports[-1].output_tokens_per_s:.1f} output tok/s", file=sys.stderr)
        return reports, model


async def _served_model(client: httpx.AsyncClient, url: str) -> str:
    """The first model id of GET /v1/models; SystemExit naming the server and what it answered otherwise."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code in (401, 403):
        raise SystemExit(f"{url}/v1/models answered HTTP {response.status_code}: the server wants a key "
                         "(--api-key)" + (", and refused this one" if "authorization" in response.request.headers
                                          else "")) from None
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, LookupError, TypeError):  # not JSON, or no data[0].id
        raise SystemExit(f"{url}/v1/models (HTTP {response.status_code}) lists no model id: is --url an "
                         "OpenAI-compatible server? Name the model with --served-model-name") from None


def server_root(url: str) -> str:
    """The server's root URL, given it with or without the /v1 suffix (requests go to /v1/...)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


async def _run_level(client: httpx.AsyncClient, model: str, concurrency: int, prompts: list[tuple[str, int]],
                     outputs: list[int]) -> LevelReport:
    gate = asyncio.Semaphore(concurrency)

    async def limited(prompt: str, max_tokens: int) -> RequestResult:
        async with gate:
            return await _one_request(client, model, prompt, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p, n) for (p, _), n in zip(prompts, outputs)))
    total = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    for r in results:
        if r.error is not None:
            print(f"request failed: {r.error}", file=sys.stderr)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    num_out = sum(r.output_tokens for r in ok)
    return LevelReport(concurrency, len(results), len(results) - len(ok), total, num_out, num_out / total,
                       _ms(percentile(ttfts, 50)), _ms(percentile(ttfts, 99)), _ms(percentile(gaps, 50)),
                       _ms(percentile(gaps, 99)), sum(r.prompt_tokens for r in ok) / max(len(ok), 1))


async def _one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.gaps_s.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ---- reporting ----------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


TABLE_HEADERS = ["concurrency", "requests", "failed", "total s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
                 "ITL p50 ms", "ITL p99 ms"]


def table_rows(reports: list[LevelReport]) -> list[list]:
    return [[r.concurrency, r.num_requests, r.num_failed, r.total_time_s, r.output_tokens_per_s, r.ttft_p50_ms,
             r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms] for r in reports]


# ---- the sweep's plot ---------------------------------------------------------------------------------------------
def plot_path(args: argparse.Namespace) -> Path | None:
    """--plot, or with --sweep OUT/serve.png; None: no plot."""
    if args.plot is not None:
        return args.plot
    return args.out / "serve.png" if args.sweep is not None else None


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise FreeholdError("the plot of `freehold bench serve` needs matplotlib, which is not installed: "
                            "pip install 'freehold[inspect]'")


def plot_sweep(reports: list[LevelReport], path: Path, title: str = "") -> Path:
    """A PNG with two panels over concurrency (log2 x axis): output tok/s, and TTFT p50/p99 in seconds."""
    require_matplotlib()
    from matplotlib.figure import Figure  # Agg canvas through Figure.savefig; no pyplot global state

    levels = [r.concurrency for r in reports]
    fig = Figure(figsize=(9.0, 3.6))
    throughput, ttft = fig.subplots(1, 2)
    throughput.plot(levels, [r.output_tokens_per_s for r in reports], "o-", color="tab:blue")
    throughput.set_ylabel("output tokens/s")
    ttft.plot(levels, [r.ttft_p50_ms / 1000 for r in reports], "o-", color="tab:green", label="p50")
    ttft.plot(levels, [r.ttft_p99_ms / 1000 for r in reports], "s--", color="tab:red", label="p99")
    ttft.set_ylabel("time to first token (s)")
    ttft.legend()
    for ax in (throughput, ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# ---- a server of our own ------------------------------------------------------------------------------------------
def _start_server(args: argparse.Namespace) -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "freehold.server.main", "--port", str(port)]
    kv_cache_memory = args.kv_cache_memory or ("512M" if args.quick else None)
    for flag, value in (("--model", args.model), ("--kv-cache-memory", kv_cache_memory),
                        ("--max-num-seqs", args.max_num_seqs),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens), ("--api-key", args.api_key),
                        ("--kv-dtype", args.kv_dtype)):
        if value is not None:
            cmd += [flag, str(value)]
    process = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not become healthy within 300 s")


def _stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
