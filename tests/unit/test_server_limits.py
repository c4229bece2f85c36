"""The server's limits as units: the prompt-length bound never exceeds the real token count, the compile pool
is bounded (timeout, busy, joining a compile in flight, shutdown), and "Too many open files" is rate-limited."""
import asyncio
import errno
import logging
import random
import threading

import pytest

from freehold.constrain.spec import Regex
from freehold.errors import PromptTooLongError
from freehold.server.connections import RateLimitedFilter
from freehold.server.errors import GrammarCompilerBusyError, GrammarCompileTimeoutError, ServerShuttingDownError
from freehold.server.limits import PromptLengthBound
from freehold.server.workers import BoundedExecutor, GrammarCompiles, PoolFullError
from freehold.tokenizer import Tokenizer


# -- prompt length without tokenizing --------------------------------------------------------------------------------
def sample_texts(tokenizer: Tokenizer) -> list[str]:
    rng = random.Random(0)
    vocab = list(tokenizer.backend.get_vocab(with_added_tokens=True))
    longest = max(vocab, key=len)
    alphabet = "ab \n\t#-_.é漢字😀\u0301<|>"
    return ["", "hello " * 1000, "#" * 5000, " " * 3000, "\n" * 3000, "😀" * 500, "<|im_start|>" * 300,
            tokenizer.decode([tokenizer.token_to_id(longest)]) * 50,  # the tightest case: one token per L chars
            *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3000))) for _ in range(30)),
            *(" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(10))]


def test_the_bound_never_exceeds_the_real_token_count(tokenizer):
    bound = PromptLengthBound(tokenizer)
    assert bound.max_token_chars is not None
    for text in sample_texts(tokenizer):
        assert bound.min_tokens([text]) <= len(tokenizer.encode(text, add_special_tokens=False)), text[:40]


def test_a_prompt_whose_bound_reaches_the_context_is_refused(tokenizer):
    bound = PromptLengthBound(tokenizer)
    text = "x" * (2048 * bound.max_token_chars)
    with pytest.raises(PromptTooLongError, match="at least 2048 tokens") as info:
        bound.check([text], max_model_len=2048)
    assert info.value.limit == 2048
    bound.check([text[:-bound.max_token_chars]], max_model_len=2048)  # 2047 tokens might fit: tokenize it


# -- the compile pool ------------------------------------------------------------------------------------------------
def test_bounded_executor_refuses_beyond_capacity_until_a_job_finishes():
    release = threading.Event()
    pool = BoundedExecutor(max_workers=1, max_queued=1, name="test")
    futures = [pool.submit(release.wait), pool.submit(release.wait)]
    with pytest.raises(PoolFullError):
        pool.submit(release.wait)
    release.set()
    for f in futures:
        f.result(timeout=5)
    assert pool.submit(lambda: 7).result(timeout=5) == 7
    pool.shutdown()


class SlowCompiler:
    """Stands in for ConstraintCompiler: `compile` blocks until `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list = []
        self.done: dict = {}

    def lookup(self, spec):
        return self.done.get(spec)

    def compile(self, spec):
        self.calls.append(spec)
        self.release.wait(timeout=10)
        self.done[spec] = f"compiled {spec.pattern}"
        return self.done[spec]


def test_compile_timeout_busy_join_and_later_reuse():
    async def scenario():
        compiler = SlowCompiler()
        compiles = GrammarCompiles(compiler, workers=1, queue=1, timeout_s=0.2)  # type: ignore[arg-type]
        a, b, c = Regex("a"), Regex("b"), Regex("c")
        with pytest.raises(GrammarCompileTimeoutError) as timeout:
            await compiles.compile(a, "guided_regex")
        assert timeout.value.status == 400 and timeout.value.param == "guided_regex"
        with pytest.raises(GrammarCompileTimeoutError):
            await compiles.compile(a, "guided_regex")  # joins the compile in flight: no second one
        with pytest.raises(GrammarCompileTimeoutError):
            await compiles.compile(b, "guided_regex")  # queued behind a
        with pytest.raises(GrammarCompilerBusyError) as busy:
            await compiles.compile(c, "guided_regex")  # one running + one queued: full
        assert busy.value.status == 503
        compiler.release.set()
        for _ in range(100):
            if compiler.lookup(b) is not None:
                break
            await asyncio.sleep(0.05)
        assert await compiles.compile(a, "guided_regex") == "compiled a"  # finished in the background, reused
        assert compiler.calls == [a, b]
        compiler.release.clear()
        waiter = asyncio.ensure_future(compiles.compile(c, "guided_regex"))
        await asyncio.sleep(0.05)
        compiles.close()
        with pytest.raises(ServerShuttingDownError):
            await waiter
        compiler.release.set()
    asyncio.run(scenario())


# -- "Too many open files" -------------------------------------------------------------------------------------------
def emfile_record() -> logging.LogRecord:
    exc = OSError(errno.EMFILE, "Too many open files")
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource", None,
                             (OSError, exc, None))


def test_out_of_descriptors_is_logged_once_per_interval():
    now = [0.0]
    log_filter = RateLimitedFilter(interval_s=10.0, clock=lambda: now[0])
    passed = []
    for i in range(1000):
        now[0] = i * 0.005  # 1000 failed accepts in 5 s
        passed.append(log_filter.filter(emfile_record()))
    assert sum(passed) == 1
    assert log_filter.filter(logging.LogRecord("x", logging.ERROR, __file__, 1, "something else", None, None))
    now[0] = 11.0
    record = emfile_record()
    assert log_filter.filter(record) and "999 similar messages suppressed" in record.getMessage()
