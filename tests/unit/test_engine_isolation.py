"""One request's failure stays that request's: on the tiny random Llama, requests whose grammar dead-ends or refuses
a drawn token end with their own error while every other request in the same steps finishes with the tokens it gets
alone; an engine bug fails the requests in flight without leaking their details and the engine serves on; /health's
source (`AsyncEngine.health`) reports a dead or stuck engine thread; stop tokens need a complete grammar."""
import asyncio
import threading
import time

import pytest
import torch

from freehold.constrain.matcher import BitmaskFiller, GrammarState
from freehold.engine.async_engine import AsyncEngine, EngineDeadError
from freehold.errors import InvalidRequestError
from freehold.types import SamplingParams
from tests.conftest import TINY_EOS, tiny_engine, tiny_model
from tests.unit.test_constrain_engine import VOCAB, reference_greedy, regex

GREEDY = dict(temperature=0.0, ignore_eos=True)


def run(engine, requests):
    """request id -> tokens of completion 0, or the error the request ended with."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                out[o.request_id] = o.error
            else:
                out[o.request_id] += o.outputs[0].token_ids
        engine.check_integrity()
    return out


def test_a_request_whose_grammar_dead_ends_fails_alone():
    model = tiny_model()
    engine = tiny_engine(model, max_num_batched_tokens=64)
    normal = {str(i): ([3 + i, 40, 41 + i, 7] * (i + 1), SamplingParams(max_tokens=12, **GREEDY)) for i in range(4)}
    poison = {"dead-end": ([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.0, constraint=regex(r"a[^\s\S]"))),
              "dead-end-sampled": ([9, 9], SamplingParams(max_tokens=12, temperature=1.0, seed=3,
                                                          constraint=regex(r"a[^\s\S]")))}
    out = run(engine, {**normal, **poison})
    for rid, (prompt, _) in normal.items():
        assert out[rid] == reference_greedy(model, prompt, 12), f"request {rid} differs from its solo run"
    for rid in poison:
        assert isinstance(out[rid], InvalidRequestError) and "exclude every token" in str(out[rid])
        assert "row" not in str(out[rid])
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.requests


def test_a_token_the_grammar_refuses_fails_that_request_only(monkeypatch):
    """The sampler draws under the grammar's bitmask, so a refusal means the grammar engine disagrees with
    itself; it must not take the batch down."""
    model = tiny_model()
    engine = tiny_engine(model)
    refuse_after = 2
    original = GrammarState.try_accept

    def flaky(self, token_id):
        return False if self.num_accepted == refuse_after else original(self, token_id)

    monkeypatch.setattr(GrammarState, "try_accept", flaky)
    prompt = [10, 20, 30]
    out = run(engine, {"free": (prompt, SamplingParams(max_tokens=8, **GREEDY)),
                       "refused": ([4, 4], SamplingParams(max_tokens=8, temperature=0.0, constraint=regex("[a-z]+")))})
    assert out["free"] == reference_greedy(model, prompt, 8)
    assert isinstance(out["refused"], InvalidRequestError) and "after 2 tokens" in str(out["refused"])
    assert engine.pool.num_free == engine.pool.num_blocks


async def _collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    tokens = []
    try:
        async for out in engine.generate(rid, prompt, params):
            tokens += out.outputs[0].token_ids
    except Exception as exc:  # noqa: BLE001 - the test inspects what each request got
        return exc
    return tokens


def test_an_engine_bug_fails_the_requests_in_flight_without_details_and_serving_goes_on(monkeypatch):
    model = tiny_model()
    engine = tiny_engine(model)
    calls = {"n": 0}
    original = engine.step

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("batch row 1: secret detail of another request")
        return original()

    monkeypatch.setattr(engine, "step", broken_once)
    async_engine = AsyncEngine(engine)
    try:
        async def scenario():
            params = SamplingParams(max_tokens=10, **GREEDY)
            first = await asyncio.gather(*[_collect(async_engine, f"r{i}", [i + 1, 2, 3], params) for i in range(3)])
            after = await _collect(async_engine, "after", [7, 8, 9], params)
            return first, after

        first, after = asyncio.run(scenario())
        assert all(isinstance(r, EngineDeadError) for r in first)
        assert all("secret" not in str(r) and "row" not in str(r) for r in first)
        assert after == reference_greedy(model, [7, 8, 9], 10)
        assert async_engine.health().ok
    finally:
        async_engine.shutdown()
    assert not async_engine.health().ok and "not running" in async_engine.health().reason


def test_health_reports_a_stuck_step(monkeypatch):
    engine = tiny_engine()
    release = threading.Event()
    original = engine.step

    def slow_step():
        release.wait(10)
        return original()

    monkeypatch.setattr(engine, "step", slow_step)
    async_engine = AsyncEngine(engine)
    try:
        async def scenario():
            task = asyncio.create_task(_collect(async_engine, "slow", [1, 2], SamplingParams(max_tokens=2, **GREEDY)))
            await asyncio.sleep(0.5)
            stuck = async_engine.health(stuck_after_s=0.2)
            release.set()
            await task
            return stuck

        stuck = asyncio.run(scenario())
        assert not stuck.ok and "running for" in stuck.reason
        assert async_engine.health(stuck_after_s=0.2).ok
    finally:
        release.set()
        async_engine.shutdown()


def test_fail_all_ends_every_request_with_the_given_error():
    async_engine = AsyncEngine(tiny_engine())
    try:
        async def scenario():
            tasks = [asyncio.create_task(_collect(async_engine, f"r{i}", [1, 2, 3],
                                                  SamplingParams(max_tokens=400, **GREEDY))) for i in range(3)]
            await asyncio.sleep(0.2)
            async_engine.fail_all(InvalidRequestError("the server is shutting down"))
            return await asyncio.gather(*tasks)

        results = asyncio.run(scenario())
        assert all(isinstance(r, InvalidRequestError) and "shutting down" in str(r) for r in results)
        deadline = time.monotonic() + 5
        while async_engine.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not async_engine.engine.has_unfinished()
    finally:
        async_engine.shutdown()


def test_stop_tokens_need_a_complete_grammar_whatever_the_bitmask_says():
    """The guard against grammar engines that allow a stop token where the output is incomplete (xgrammar 0.2.9
    on `[a-z<|>_]+`): a filler whose batch fill allows every token still forbids the stop token until complete."""

    class AllowEverything:
        def batch_fill_next_token_bitmask(self, matchers, bitmask):
            bitmask.fill_(-1)

    filler = BitmaskFiller(VOCAB)
    filler._batch = AllowEverything()
    state, other = GrammarState(regex("[a-z]+")), GrammarState(regex("[a-z]+"))  # two rows: the batch fill
    bits = lambda mask: ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:VOCAB]  # noqa
    first = bits(filler.fill([state, other])[0])
    assert first[TINY_EOS] == 0 and first[:TINY_EOS].all()
    state.accept(ord("a") - 32)
    rows = filler.fill([state, other])
    assert bits(rows[0])[TINY_EOS] == 1 and bits(rows[1])[TINY_EOS] == 0  # complete: the stop token may end it


@pytest.mark.parametrize("penalty", [1e-300, 0.0, 1e-3, 1e6, float("nan")])
def test_repetition_penalty_is_bounded(penalty):
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)


def test_a_dead_engine_thread_answers_every_caller_at_once(monkeypatch):
    """An error outside a step (here: applying a stop command) stops the engine thread: the request in flight, and
    every later request or admin call, get EngineDeadError at once instead of waiting forever; /health says so."""
    engine = tiny_engine()
    async_engine = AsyncEngine(engine)

    def broken(request_id, index):
        raise RuntimeError("bookkeeping bug")

    monkeypatch.setattr(engine, "stop_sequence", broken)
    try:
        async def scenario():
            running = asyncio.create_task(_collect(async_engine, "r", [1, 2, 3],
                                                   SamplingParams(max_tokens=500, **GREEDY)))
            await asyncio.sleep(0.2)
            async_engine.stop_sequence("r", 0)
            in_flight = await asyncio.wait_for(running, 10)
            later = await asyncio.wait_for(_collect(async_engine, "later", [4, 5], SamplingParams(max_tokens=2)), 10)
            try:
                await asyncio.wait_for(async_engine.call(lambda e: e.stats()), 10)
                call_error = None
            except EngineDeadError as exc:
                call_error = exc
            return in_flight, later, call_error

        in_flight, later, call_error = asyncio.run(scenario())
        assert isinstance(in_flight, EngineDeadError) and isinstance(later, EngineDeadError)
        assert isinstance(call_error, EngineDeadError) and "bookkeeping" not in str(call_error)
        assert not async_engine.health().ok
    finally:
        async_engine.shutdown()


def test_an_admin_call_that_raises_fails_only_that_call():
    async_engine = AsyncEngine(tiny_engine())
    try:
        async def scenario():
            with pytest.raises(ZeroDivisionError):
                await async_engine.call(lambda e: 1 / 0)
            return await _collect(async_engine, "after", [1, 2], SamplingParams(max_tokens=3, **GREEDY))

        assert len(asyncio.run(scenario())) == 3
        assert async_engine.health().ok
    finally:
        async_engine.shutdown()


def test_the_creating_thread_releases_its_openmp_workers_before_the_engine_thread_starts(monkeypatch):
    """The model was loaded on the creating thread: its OpenMP pool would make libgomp put the engine thread's
    workers to sleep after every kernel call (kernels/native.py, release_openmp_threads)."""
    from freehold.engine import async_engine as module
    calls = []
    monkeypatch.setattr(module.native, "release_openmp_threads",
                        lambda: calls.append((threading.current_thread(), threading.active_count())))
    before = threading.active_count()
    engine = AsyncEngine(tiny_engine())
    try:
        assert calls == [(threading.current_thread(), before)]  # on this thread, before the engine's thread exists
    finally:
        engine.shutdown()
