"""What one client may cost the server: `ServerLimits` (the `freehold serve` flags that bound bodies, connections,
grammar compiles and shutdown), `BodySizeLimit`, the ASGI middleware that enforces the body size, and
`PromptLengthBound`, which rejects a prompt too long for the context before tokenizing it.

`BodySizeLimit` refuses a declared Content-Length over the limit before reading a byte, and counts the bytes of a
body as they arrive (chunked uploads declare no length), answering 413 in OpenAI's error shape as soon as the
count passes the limit: an oversized body is never held in memory whole.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers.models import BPE

from freehold.errors import PromptTooLongError
from freehold.server.errors import error_response
from freehold.tokenizer import Tokenizer

MiB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    # A full context of text is a few hundred KiB even as \uXXXX escapes (8k tokens x ~4 characters x 6 bytes),
    # and a large JSON schema a few MiB: 8 MiB fits both with room, and bounds what one request can make us hold.
    max_request_bytes: int = 8 * MiB
    request_read_timeout_s: float = 30.0  # from a connection's first byte (or its opening) to its whole request
    keep_alive_timeout_s: float = 5.0  # an idle connection between requests
    max_connections: int = 1024  # open connections; beyond it new requests get 503 (see connections.py)
    grammar_compile_workers: int = 2  # grammar compiles running at once, on their own threads
    grammar_compile_queue: int = 16  # compiles allowed to wait for a worker; beyond them, 503
    grammar_compile_timeout_s: float = 30.0  # a request waits this long for its grammar, then gets a 400
    grammar_cache_bytes: int = 256 * MiB  # compiled grammars kept for reuse (one huge enum can take 100+ MiB)
    shutdown_grace_s: float = 20.0  # after SIGTERM, requests in flight get this long to finish

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_connections", "grammar_compile_workers", "grammar_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grammar_compile_queue < 0:
            raise ValueError(f"grammar_compile_queue must be >= 0, got {self.grammar_compile_queue}")
        for name in ("request_read_timeout_s", "keep_alive_timeout_s", "grammar_compile_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a body passes the limit. FastAPI passes HTTPExceptions raised while it reads a
    body on to the app's error handler (413 in OpenAI's shape); `BodySizeLimit` answers it itself otherwise."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(freehold serve --max-request-bytes)")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLargeError(self.max_bytes)
        if _declared_length(scope) > self.max_bytes:
            await error_response(413, too_large.detail)(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLargeError:
            if started:
                raise
            await error_response(413, too_large.detail)(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the HTTP parser rejects a malformed length itself
    return 0


class PromptLengthBound:
    """A lower bound on a prompt's token count, from its length alone: each token stands for at most L characters,
    L the longest token's spelling (a byte-level token spells one byte per character, and a character is at least
    one byte; an added token is matched as written), so C characters need at least ceil(C / L) tokens. A prompt
    whose bound already reaches the context is rejected without tokenizing it: tokenizing a long text costs
    seconds and many times its size in memory.

    Counted after the tokenizer's normalizer (which may shorten text). A model whose unknown characters fuse into
    one token (`fuse_unk` without byte fallback) has no such bound, and every prompt is tokenized."""

    def __init__(self, tokenizer: Tokenizer):
        backend = tokenizer.backend
        model = backend.model
        fuses_unknowns = isinstance(model, BPE) and model.fuse_unk and not model.byte_fallback
        self.max_token_chars = None if fuses_unknowns or not isinstance(model, BPE) else \
            max(len(token) for token in backend.get_vocab(with_added_tokens=True))
        self._normalizer = backend.normalizer

    def min_tokens(self, texts: Iterable[str]) -> int:
        if self.max_token_chars is None:
            return 0
        num_chars = sum(len(self._normalizer.normalize_str(t) if self._normalizer else t) for t in texts)
        return -(-num_chars // self.max_token_chars)

    def check(self, texts: Iterable[str], max_model_len: int, generated: int = 1) -> None:
        """PromptTooLongError if the texts need more than `max_model_len - generated` tokens (no room left for the
        tokens to generate: 1, or 0 for a prompt-only request)."""
        texts = list(texts)
        at_least = self.min_tokens(texts)
        if at_least + generated > max_model_len:
            plus = " plus at least one generated token" if generated else ""
            raise PromptTooLongError(
                f"prompt has at least {at_least} tokens ({sum(map(len, texts))} characters) but this server allows "
                f"{max_model_len} tokens (prompt{plus})", at_least, max_model_len)
