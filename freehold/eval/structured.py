"""`freehold eval structured`: JSON-schema-constrained generation over JSONSchemaBench-style folders (one JSON
Schema per file): how many schemas compile, how many constrained outputs finish, how many of those parse and
validate with `jsonschema`, and what the constraint costs per decoded token.

Every compiled schema gets one chat request ("write an instance of this schema") and all of them run together on
the engine. The cost is measured by running the same prompts again without the constraint, each forced to the
length its constrained output had (EOS ignored), so both runs decode the same tokens in the same batches and
differ only by the grammar. Time per token is the median duration of the decode-only engine steps (no prompt
chunk in the step): the time between two tokens of every sequence in that step. The median keeps a shared
machine's hiccups out.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from freehold.constrain.compiler import ConstraintCompiler
from freehold.constrain.spec import Constraint, JsonSchema
from freehold.errors import InvalidRequestError, PromptTooLongError
from freehold.types import FinishReason, SamplingParams

SYSTEM = "You are a helpful assistant that answers with JSON only."


@dataclass(frozen=True)
class Settings:
    """Greedy decoding; a frequency penalty keeps a small model out of repetition loops (more outputs finish)."""

    max_tokens: int = 256
    frequency_penalty: float = 0.0

    def params(self, max_tokens: int, **fields) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, frequency_penalty=self.frequency_penalty,
                              **fields)


@dataclass(frozen=True)
class SchemaCase:
    name: str
    schema: Any


@dataclass
class CaseResult:
    name: str
    compiled: bool
    compile_ms: float
    error: str | None = None  # why it did not compile or run
    finished: bool = False  # ended with finish_reason "stop" (the grammar completed)
    valid: bool = False  # parses and validates against the schema
    num_tokens: int = 0
    text: str = ""
    run: _Run | None = None  # what was generated (None: not compiled, or the prompt does not fit)


class _Run(NamedTuple):
    schema: Any
    prompt: list[int]
    constraint: Constraint


@dataclass(frozen=True)
class SubsetReport:
    subset: str
    num_schemas: int
    num_compiled: int
    num_finished: int
    num_valid: int  # among the finished
    median_compile_ms: float  # of the schemas that compiled
    ms_per_token: float  # median decode step, constrained
    ms_per_token_free: float  # median decode step, same prompts and lengths unconstrained

    def row(self) -> list:
        pct = lambda a, b: 100.0 * a / b if b else 0.0  # noqa: E731
        overhead = pct(self.ms_per_token - self.ms_per_token_free, self.ms_per_token_free)
        return [self.subset, self.num_schemas, self.num_compiled, pct(self.num_compiled, self.num_schemas),
                self.num_finished, self.num_valid, pct(self.num_valid, self.num_finished), self.median_compile_ms,
                self.ms_per_token, self.ms_per_token_free, overhead]


HEADERS = ["subset", "schemas", "compiled", "compiled %", "finished", "valid", "valid % of finished",
           "compile ms (median)", "ms/token constrained", "ms/token free", "overhead %"]


def load_schemas(directory: Path, limit: int | None) -> list[SchemaCase]:
    """The first `limit` schema files of a folder, by name."""
    if not directory.is_dir():
        raise InvalidRequestError(f"schema folder not found: {directory}")
    files = sorted(directory.glob("*.json"))[:limit]
    return [SchemaCase(f.stem, json.loads(f.read_text(encoding="utf-8"))) for f in files]


def messages_for(schema: Any) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Write one JSON instance of this JSON schema:\n{json.dumps(schema)}"}]


def evaluate_subset(llm, compiler: ConstraintCompiler, subset: str, cases: list[SchemaCase],
                    settings: Settings) -> tuple[SubsetReport, list[CaseResult]]:
    """Compile, generate (batched), validate; then rerun the same lengths unconstrained for the timing."""
    results = [_prepare(llm, compiler, case, settings.max_tokens) for case in cases]
    runs = [r for r in results if r.run is not None]
    constrained = _generate(llm, [(r.run.prompt, settings.params(settings.max_tokens, constraint=r.run.constraint))
                                  for r in runs])
    for r, tokens, reason, error in zip(runs, constrained.tokens, constrained.reasons, constrained.errors):
        _judge(llm, r, tokens, reason)
        r.error = error or r.error
    free = _generate(llm, [(r.run.prompt, settings.params(max(r.num_tokens, 1), ignore_eos=True)) for r in runs])
    return _report(subset, results, constrained.ms_per_token, free.ms_per_token), results


def report_details(results: list[CaseResult], settings: Settings) -> dict:
    """What the result file keeps beside the table row: the settings and every case's outcome and text."""
    details = [{"name": r.name, "compiled": r.compiled, "compile_ms": r.compile_ms, "finished": r.finished,
                "valid": r.valid, "num_tokens": r.num_tokens, "error": r.error, "text": r.text} for r in results]
    return {"settings": settings, "temperature": 0.0, "cases": details}


# ---- private ------------------------------------------------------------------------------------------------------
def _prepare(llm, compiler: ConstraintCompiler, case: SchemaCase, max_tokens: int) -> CaseResult:
    t0 = time.perf_counter()
    try:
        constraint = compiler.compile(JsonSchema.from_value(case.schema))
    except InvalidRequestError as exc:
        return CaseResult(case.name, False, (time.perf_counter() - t0) * 1000, error=str(exc))
    result = CaseResult(case.name, True, (time.perf_counter() - t0) * 1000)
    prompt = llm.chat_prompt(messages_for(case.schema))
    try:
        llm.engine.check_request(prompt, SamplingParams(max_tokens=max_tokens, constraint=constraint))
    except PromptTooLongError as exc:
        result.error = str(exc)
        return result
    result.run = _Run(case.schema, prompt, constraint)
    return result


class _Generated(NamedTuple):
    tokens: list[list[int]]  # per request
    reasons: list[FinishReason]
    errors: list[str | None]  # a request that failed on its own input (say, its grammar dead-ended): why
    ms_per_token: float  # median duration of the decode-only steps


def _generate(llm, requests: list[tuple[list[int], SamplingParams]]) -> _Generated:
    """Run all requests together, from an empty prefix cache (both runs do the same prefill work)."""
    engine = llm.engine
    engine.reset_prefix_cache()
    ids = [f"eval-structured-{i}" for i in range(len(requests))]
    for request_id, (prompt, params) in zip(ids, requests):
        engine.add_request(request_id, prompt, params)
    seqs = [seq for request_id in ids for seq in engine.requests[request_id]]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    reasons: dict[str, FinishReason] = {}
    errors: dict[str, str] = {}
    decode_steps: list[float] = []
    while engine.has_unfinished():
        computed = sum(seq.num_computed_tokens for seq in seqs)
        t0 = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - t0
        new = [o for out in outputs for o in out.outputs]
        if sum(seq.num_computed_tokens for seq in seqs) - computed == sum(len(o.token_ids) for o in new):
            decode_steps.append(seconds)  # every token the step computed was a sequence's last one: no prefill
        for out in outputs:
            if out.error is not None:
                reasons[out.request_id], errors[out.request_id] = FinishReason.ABORT, f"failed: {out.error}"
                continue
            tokens[out.request_id] += out.outputs[0].token_ids
            if out.outputs[0].finish_reason is not None:
                reasons[out.request_id] = out.outputs[0].finish_reason
    ms = 1000 * statistics.median(decode_steps) if decode_steps else float("nan")
    return _Generated([tokens[i] for i in ids], [reasons[i] for i in ids], [errors.get(i) for i in ids], ms)


def _judge(llm, result: CaseResult, tokens: list[int], reason: FinishReason) -> None:
    import jsonschema  # the `eval` extra: only this evaluation needs it (commands.py checks it up front)

    result.num_tokens = len(tokens)
    result.text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
    result.finished = reason is FinishReason.STOP
    if not result.finished:
        return
    try:
        jsonschema.validate(json.loads(result.text), result.run.schema)
    except json.JSONDecodeError as exc:
        result.error = f"not JSON: {exc}"
    except jsonschema.ValidationError as exc:
        result.error = f"invalid: {exc.message}"
    else:
        result.valid = True


def _report(subset: str, results: list[CaseResult], ms_per_token: float, ms_per_token_free: float) -> SubsetReport:
    compiled = [r for r in results if r.compiled]
    finished = [r for r in compiled if r.finished]
    return SubsetReport(
        subset=subset, num_schemas=len(results), num_compiled=len(compiled), num_finished=len(finished),
        num_valid=sum(r.valid for r in finished),
        median_compile_ms=statistics.median([r.compile_ms for r in compiled]) if compiled else 0.0,
        ms_per_token=ms_per_token, ms_per_token_free=ms_per_token_free)
