"""`freehold serve`: load a model, start the engine thread and serve the OpenAI API with uvicorn.

    python -m freehold.server.main [--model PATH] [--port 8000] [--api-key KEY] ...
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Callable

import torch
import uvicorn

from freehold.config import MAX_SPECULATIVE_TOKENS, EngineConfig, KVDtype, KVPolicy, SpeculativeMode
from freehold.quant.modes import WeightMode
from freehold.engine.async_engine import AsyncEngine
from freehold.errors import FreeholdError
from freehold.kernels import native
from freehold.memory.store import FILENAME as STORE_FILENAME
from freehold.memory.store import ConversationStore
from freehold.models.locate import DEFAULT_MODEL_NAME
from freehold.server.app import create_app
from freehold.server.connections import (connections_that_fit, install_log_rate_limit, protocol_class,
                                         raise_open_file_limit)
from freehold.server.conversations import Conversations
from freehold.server.cors import (DEFAULT_HEADERS, DEFAULT_METHODS, CorsPolicy, check_header, check_method,
                                  check_origin, split_list)
from freehold.server.embedding_worker import EmbeddingWorker
from freehold.server.limits import ServerLimits
from freehold.server.serving import Serving
from freehold.server.shutdown import DrainingServer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
API_KEY_ENV = "FREEHOLD_API_KEY"


def parse_size(text: str) -> int:
    """Bytes from '1073741824', '512M', '2G', '1.5GiB' (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 268435456, 512M, 2G)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _grace_seconds(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _template_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read the chat template {path!r}: {exc}") from None


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """`--speculative` and `--num-speculative-tokens` (serve, generate, chat)."""
    parser.add_argument("--speculative", choices=[m.value for m in SpeculativeMode], default="off",
                        help="speculative decoding: ngram = prompt lookup (drafts from the prompt and output so "
                             "far), draft = a draft model (--draft-model / --draft-weights); drafts are verified in "
                             "one forward pass and the output is unchanged. Default: off")
    parser.add_argument("--draft-model", default=None,
                        help="speculative draft: a model with the same tokenizer (default: the served model itself, "
                             "loaded with --draft-weights)")
    parser.add_argument("--draft-weights", choices=[m.value for m in WeightMode], default="int4",
                        help="how the draft model's weights are held (default int4: a quantized self-draft)")
    parser.add_argument("--num-speculative-tokens", type=_speculative_tokens, default=8,
                        help=f"the most draft tokens a sequence verifies per step (1..{MAX_SPECULATIVE_TOKENS}; "
                             "fewer when acceptance or the batch size makes them cost more than they save)")


def add_kv_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """`--kv-policy`, `--sink-tokens` and `--window` (serve, generate, chat): freehold.kv.sink."""
    parser.add_argument("--kv-policy", choices=[p.value for p in KVPolicy], default="full",
                        help="what a sequence keeps in the KV cache: full = every token up to the context length; "
                             "sink = the first --sink-tokens and the last --window tokens (StreamingLLM), so "
                             "generation runs past the context in constant memory, and tokens that leave the "
                             "window are gone (this is not memory). Requests may ask for sink with "
                             "\"kv_policy\": \"sink\" when the window fits. Default: full")
    parser.add_argument("--sink-tokens", type=int, default=4,
                        help="kv-policy sink: first tokens kept, rounded up to whole KV blocks (default 4)")
    parser.add_argument("--window", type=_positive_int, default=2048,
                        help="kv-policy sink: most recent tokens kept, rounded up to whole KV blocks "
                             "(default 2048)")


def _speculative_tokens(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SPECULATIVE_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SPECULATIVE_TOKENS}, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help=f"GGUF file or Hugging Face model directory (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--data-dir", default=default_data_dir(), metavar="DIR|none",
                        help="where uploaded files, vector stores, stored responses and conversations are kept, "
                             "durable across restarts; none: keep nothing (no vector stores, and responses are not "
                             "stored) (default: %(default)s)")
    parser.add_argument("--embedding-model", default=None, metavar="PATH|none",
                        help="sentence-transformers (BERT) folder served at /v1/embeddings; none: no embeddings "
                             "route (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the names clients may pass as `model`; responses use the one asked for, the first "
                             "when none is given (default: the model's file or directory name)")
    parser.add_argument("--chat-template", type=_template_file, default=None, metavar="FILE",
                        help="a Jinja chat template file to use instead of the model's own")
    parser.add_argument("--strict-api", action="store_true",
                        help="refuse request fields no OpenAI or vLLM document defines (a 400 naming the field); "
                             "by default they are ignored, logged, and listed in the response header "
                             "X-Freehold-Ignored-Fields")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 and /admin (or set {API_KEY_ENV})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--weights", choices=[m.value for m in WeightMode], default="auto",
                        help="auto keeps a GGUF's own quantization (int4/int8 kernels); fp32/bf16 dequantize; "
                             "fp32 is the one tested for parity with transformers (the reference)")
    parser.add_argument("--kv-cache-memory", type=parse_size, default=None,
                        help="KV cache size in bytes, e.g. 512M or 2G (default: a fraction of free memory)")
    parser.add_argument("--kv-dtype", choices=[d.value for d in KVDtype], default="auto",
                        help="what the KV cache stores: auto = bf16 on CPU (fp32 activations), else the "
                             "activation dtype; fp32 is exact; bf16/fp16 halve and int8 quarters fp32's bytes per "
                             "token, so the same memory holds 2x/4x the tokens")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=None,
                        help=f"sequences per step (default {EngineConfig.max_num_seqs})")
    parser.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                        help=f"token budget of one engine step (default {EngineConfig.max_num_batched_tokens})")
    parser.add_argument("--max-model-len", type=_positive_int, default=None,
                        help="context limit in tokens (default: the model's)")
    parser.add_argument("--max-waiting", type=_positive_int, default=256,
                        help="requests allowed to wait for their first token; more get 503 + Retry-After "
                             "(default: 256)")
    parser.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching")
    parser.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (the API is unchanged)")
    add_speculative_arguments(parser)
    add_kv_policy_arguments(parser)
    _add_limit_arguments(parser.add_argument_group("limits (what one client may cost the server)"))
    _add_cors_arguments(parser.add_argument_group(
        "browser access (CORS)", "Off by default: pages on other origins cannot read responses. A local server "
        "without an API key, open to every page a user visits, could be driven by any website, so the origins "
        "are named here (or * chosen knowingly). Values are comma-separated, and each flag may be repeated."))


def _add_limit_arguments(group: argparse._ArgumentGroup) -> None:
    d = ServerLimits()
    group.add_argument("--max-request-bytes", type=parse_size, default=d.max_request_bytes, metavar="SIZE",
                       help="largest request body; a larger one gets 413 before it is read whole (default: 8M)")
    group.add_argument("--request-read-timeout", type=_seconds, default=d.request_read_timeout_s, metavar="SECONDS",
                       help="time a client has to send a whole request, headers and body, from connecting (or, on "
                            "a kept-alive connection, from its first byte); then 408 and the connection closes "
                            f"(default: {d.request_read_timeout_s:g})")
    group.add_argument("--keep-alive-timeout", type=_seconds, default=d.keep_alive_timeout_s, metavar="SECONDS",
                       help=f"an idle connection closes after this long between requests "
                            f"(default: {d.keep_alive_timeout_s:g})")
    group.add_argument("--max-connections", type=_positive_int, default=d.max_connections, metavar="N",
                       help="open connections; beyond this new requests get 503, beyond twice this new connections "
                            "close at once (default: %(default)s, lowered to fit the open-file limit)")
    group.add_argument("--grammar-compile-workers", type=_positive_int, default=d.grammar_compile_workers, metavar="N",
                       help="structured-output grammars compiled at once, on their own threads so plain requests "
                            "never wait for them (default: %(default)s)")
    group.add_argument("--grammar-compile-queue", type=_non_negative_int, default=d.grammar_compile_queue, metavar="N",
                       help="compiles that may wait for a worker; more get 503 + Retry-After (default: %(default)s)")
    group.add_argument("--grammar-compile-timeout", type=_seconds, default=d.grammar_compile_timeout_s,
                       metavar="SECONDS", help="a request whose grammar takes longer gets 400 "
                                               "(grammar_compile_timeout); the compile finishes in the background and "
                                               f"is cached (default: {d.grammar_compile_timeout_s:g})")
    group.add_argument("--grammar-cache-memory", type=parse_size, default=d.grammar_cache_bytes, metavar="SIZE",
                       help="memory for compiled grammars kept for reuse, least recently used dropped first "
                            "(default: 256M)")
    group.add_argument("--shutdown-grace-seconds", type=_grace_seconds, default=d.shutdown_grace_s,
                       metavar="SECONDS", help="on SIGTERM, stop accepting and let requests in flight finish for this "
                                               "long; then each one left ends with 503 (a stream with an error event "
                                               f"and [DONE]) (default: {d.shutdown_grace_s:g})")


def _add_cors_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--allowed-origins", type=_list_of(check_origin), action="extend", default=None,
                       metavar="ORIGIN[,ORIGIN...]",
                       help="web origins whose pages may call the API from a browser, as the browser sends them "
                            "(e.g. http://localhost:3000); * allows every page (then set --api-key). The preflight "
                            "is answered without the API key, the request itself still needs it (default: none)")
    group.add_argument("--allowed-methods", type=_list_of(check_method, str.upper), action="extend", default=None,
                       metavar="METHOD[,METHOD...]",
                       help=f"methods those pages may use; * for any (default: {','.join(DEFAULT_METHODS)})")
    group.add_argument("--allowed-headers", type=_list_of(check_header), action="extend", default=None,
                       metavar="HEADER[,HEADER...]",
                       help="request headers those pages may send; * for any (default: *, since the OpenAI SDKs "
                            "send their own x-stainless-* headers besides Authorization and Content-Type)")


def _list_of(check: Callable[[str], str], normalize: Callable[[str], str] = str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        try:
            return [check(normalize(item)) for item in split_list(text)]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def cors_policy(args: argparse.Namespace) -> CorsPolicy | None:
    """The CORS policy of the flags; None (no CORS headers) without --allowed-origins."""
    if not args.allowed_origins:
        if args.allowed_methods or args.allowed_headers:
            raise ValueError("--allowed-methods and --allowed-headers need --allowed-origins")
        return None
    return CorsPolicy(tuple(args.allowed_origins), tuple(args.allowed_methods or DEFAULT_METHODS),
                      tuple(args.allowed_headers or DEFAULT_HEADERS))


def server_limits(args: argparse.Namespace, open_file_limit: int) -> ServerLimits:
    max_connections = connections_that_fit(args.max_connections, open_file_limit)
    if max_connections < args.max_connections:
        print(f"warning: --max-connections lowered to {max_connections} to fit the open-file limit "
              f"({open_file_limit})", file=sys.stderr)
    return ServerLimits(
        max_request_bytes=args.max_request_bytes, request_read_timeout_s=args.request_read_timeout,
        keep_alive_timeout_s=args.keep_alive_timeout, max_connections=max_connections,
        grammar_compile_workers=args.grammar_compile_workers, grammar_compile_queue=args.grammar_compile_queue,
        grammar_compile_timeout_s=args.grammar_compile_timeout, grammar_cache_bytes=args.grammar_cache_memory,
        shutdown_grace_s=args.shutdown_grace_seconds)


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the process exit code."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        cors = cors_policy(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        llm = _load(args)
        embedder = _load_embedder(args.embedding_model, args.device)
    except FreeholdError as exc:
        sock.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = args.served_model_name or [_default_name(args.model)]
    name = names[0]
    limits = server_limits(args, raise_open_file_limit())
    install_log_rate_limit()
    _log_to_stderr()
    engine = AsyncEngine(llm.engine)
    serving = Serving(engine, llm.tokenizer, names, args.max_waiting, limits, fingerprint=llm.fingerprint(),
                      strict_api=args.strict_api)
    serving.embeddings = EmbeddingWorker(embedder) if embedder is not None else None
    try:
        serving.retrieval = _open_retrieval(args.data_dir, embedder)
        serving.conversations = _open_conversations(args.data_dir)
    except (OSError, FreeholdError, sqlite3.Error) as exc:
        sock.close()
        print(f"error: cannot open the data directory {args.data_dir}: {exc}", file=sys.stderr)
        return 2
    app = create_app(serving, api_key, cors, ui=not args.no_ui)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(llm.describe())
    print(f"serving {name!r} at http://{host}:{sock.getsockname()[1]}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    if not args.no_ui:
        print(f"chat page at http://{host}:{sock.getsockname()[1]}/", flush=True)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key", file=sys.stderr)
    _report_cors(cors, api_key)
    config = uvicorn.Config(app, log_level="warning", access_log=False, http=protocol_class(limits),
                            timeout_keep_alive=limits.keep_alive_timeout_s)
    native.release_openmp_threads()  # torch work on this thread is done (retrieval may have embedded at startup)
    try:
        DrainingServer(config, serving, limits.shutdown_grace_s).run(sockets=[sock])
    finally:
        engine.shutdown()
        if serving.retrieval is not None:
            serving.retrieval.close()  # a file still ingesting stays uncommitted: the store discards it on open
        if serving.conversations is not None:
            serving.conversations.store.close()  # a turn still running was never committed: nothing of it is kept
    return 0


def _report_cors(cors: CorsPolicy | None, api_key: str | None) -> None:
    if cors is None:
        return
    print(f"browser pages from {', '.join(cors.allowed_origins)} may call the API (CORS)", flush=True)
    if cors.allows_any_origin and not api_key:
        print("warning: --allowed-origins * without an API key: any web page a user opens can use this server",
              file=sys.stderr)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _load(args: argparse.Namespace):
    from freehold.llm import LLM  # heavy import, after the socket is known to be free

    options = {"kv_cache_memory": args.kv_cache_memory, "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
               "kv_dtype": KVDtype(args.kv_dtype), "speculative": SpeculativeMode(args.speculative),
               "num_speculative_tokens": args.num_speculative_tokens, "kv_policy": KVPolicy(args.kv_policy),
               "sink_tokens": args.sink_tokens, "window": args.window}
    options = {k: v for k, v in options.items() if v is not None}
    if args.no_prefix_cache:
        options["enable_prefix_caching"] = False
    return LLM(args.model, dtype=DTYPES[args.dtype], device=args.device, weights=WeightMode(args.weights),
               progress=sys.stderr.isatty(), chat_template=args.chat_template, draft_model=args.draft_model,
               draft_weights=WeightMode(args.draft_weights), **options)


def _open_retrieval(data_dir: str, embedder):
    """Files and vector stores under `data_dir`: None (with a note) without an embedder or the retrieval extra."""
    if embedder is None or _no_data_dir(data_dir):
        return None
    try:
        from freehold.server.ingest import Retrieval
    except ImportError as exc:
        print(f"note: vector stores are off: {exc}", file=sys.stderr)
        return None
    return Retrieval(data_dir, embedder)


def _open_conversations(data_dir: str) -> Conversations | None:
    """Stored responses and conversations in `data_dir`/conversations.sqlite; None with --data-dir none."""
    if _no_data_dir(data_dir):
        return None
    return Conversations(ConversationStore(Path(data_dir) / STORE_FILENAME))


def _no_data_dir(data_dir: str) -> bool:
    return data_dir.strip().lower() == "none"


def default_data_dir() -> str:
    """Where vector stores and uploads live by default: $XDG_DATA_HOME/freehold (~/.local/share/freehold)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "freehold")


def _load_embedder(path: str | None, device: str):
    """The embedding model (`--embedding-model`): the bundled MiniLM by default, none for no embeddings route."""
    if path is not None and path.lower() == "none":
        return None
    from freehold.embed import Embedder
    return Embedder(path, device=device)


def _log_to_stderr() -> None:
    """The server's own log (ignored fields, request metadata) at INFO on stderr; uvicorn keeps its own."""
    logger = logging.getLogger("freehold")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _default_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="freehold serve", description="Serve a model over the OpenAI API.")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
