"""The engine: owns the model, the KV cache, the scheduler and the sampler. One thread calls `step()`.

    step = schedule -> forward -> sample -> update

A request whose kv_policy is "sink" (freehold.kv.sink) keeps its sinks and a sliding window only: its prompt and
max_tokens may exceed the context length, it never drafts, and each step first re-rotates the window keys that the
scheduler's evictions moved.

A request with prompt logprobs gets them from the forward of its own prefill (freehold.engine.prompt_logprobs),
on its first output after the prompt; with max_tokens 0 it ends there ("length") without drawing a token.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from freehold.config import EngineConfig, KVPolicy, ModelConfig, SpeculativeMode
from freehold.constrain.matcher import BitmaskFiller, GrammarState
from freehold.engine.memory import KVBudget, create_kv_cache, plan_kv
from freehold.engine.runner import ForwardOutput, ModelRunner
from freehold.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from freehold.engine.sequence import Sequence
from freehold.engine.draft import DraftModel
from freehold.engine.speculation import Speculator
from freehold.errors import FreeholdError, InvalidRequestError, PromptTooLongError
from freehold.kv.block_pool import BlockPool
from freehold.kv.sink import SinkWindow
from freehold.layers.attention import KVCache
from freehold.models.llama import LlamaForCausalLM
from freehold.sampling.sampler import Sampler, SamplerOutput, SamplingRow
from freehold.sampling.seeding import make_generator
from freehold.types import CompletionOutput, FinishReason, RequestOutput, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens served from cache
    num_preemptions: int
    num_draft_tokens: int = 0  # speculative decoding: drafts verified, and how many were accepted
    num_accepted_tokens: int = 0
    num_verifications: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total


class Engine:
    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig, eos_token_ids: Seq[int],
                 config: EngineConfig = EngineConfig(), kv_cache: KVCache | None = None,
                 draft: tuple[LlamaForCausalLM, ModelConfig, float] | None = None):
        """`draft`: (model, config, relative cost) of a draft model for `speculative` "draft" (freehold.engine.draft);
        its KV cache holds as many tokens as the target's."""
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.budget: KVBudget = plan_kv(model_config, config)
        cache = kv_cache or create_kv_cache(model_config, config, self.budget.num_blocks)
        self.pool = BlockPool(self.budget.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, cache, self.device)
        self.sampler = Sampler(model_config.vocab_size, self.device, tuple(eos_token_ids), seed=config.seed)
        self.bitmasks = BitmaskFiller(model_config.vocab_size)
        self.context_len = min(config.max_model_len or model_config.max_position_embeddings,
                               model_config.max_position_embeddings)
        self.max_model_len = min(self.context_len, self.budget.num_tokens)  # one sequence must always fit
        draft_model = DraftModel(draft[0], draft[1], model_config, config, self.budget.num_blocks, draft[2]) \
            if draft is not None and config.speculative is SpeculativeMode.DRAFT else None
        self.speculator = Speculator(config, self.max_model_len, draft_model)
        self.sink, self.sink_error = self._plan_sink()
        if config.kv_policy is KVPolicy.SINK and self.sink is None:
            raise InvalidRequestError(f"kv_policy 'sink': {self.sink_error}", param="window")
        self.requests: dict[str, list[Sequence]] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # -- public API ---------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises PromptTooLongError / InvalidRequestError for what can never run."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        sink = self.sink if self.kv_policy(params) is KVPolicy.SINK else None
        seqs = [Sequence(request_id, i, list(prompt_token_ids), params, next(self._arrivals),
                         make_generator(params.seed, i),
                         grammar=GrammarState(params.constraint) if params.constraint is not None else None, sink=sink)
                for i in range(params.n)]
        for sibling in seqs[1:]:
            sibling.parent = seqs[0]
        if params.prompt_logprobs is not None:  # the prompt is shared: completion 0 computes its logprobs
            seqs[0].prompt_logprobs = [None]  # the first token has no context
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt has token ids outside the vocabulary: {bad[:5]}", param="prompt")
        sink = self.kv_policy(params) is KVPolicy.SINK
        if sink and self.sink is None:
            raise InvalidRequestError(f"kv_policy 'sink' is not available on this engine: {self.sink_error}",
                                      param="kv_policy")
        if sink and params.num_speculative_tokens:
            raise InvalidRequestError("kv_policy 'sink' runs without speculative decoding: leave "
                                      "num_speculative_tokens unset or 0", param="num_speculative_tokens")
        generated = 0 if params.max_tokens == 0 else 1  # a prompt-only request (prompt logprobs) may fill the context
        if n + generated > self.max_model_len and not sink:  # a sink sequence streams any length
            limit = "the model context length" if self.max_model_len == self.context_len else "the KV cache budget"
            plus = " plus at least one generated token" if generated else ""
            raise PromptTooLongError(
                f"prompt has {n} tokens but {limit} allows {self.max_model_len} tokens (prompt{plus})", n,
                self.max_model_len)
        self.sampler.check_params(params)
        self._check_speculation(params.num_speculative_tokens)
        if params.constraint is not None and params.constraint.vocab_size != self.model_config.vocab_size:
            raise InvalidRequestError(f"the constraint was compiled for a vocabulary of {params.constraint.vocab_size} "
                                      f"tokens, the model has {self.model_config.vocab_size}", param="constraint")

    def kv_policy(self, params: SamplingParams) -> KVPolicy:
        """The request's KV policy: its own, else the engine's."""
        return params.kv_policy or self.config.kv_policy

    def _plan_sink(self) -> tuple[SinkWindow | None, str | None]:
        """The engine's sink + window shape if it fits the KV budget and the RoPE positions; else why not."""
        c = self.config
        sink = SinkWindow.from_tokens(c.sink_tokens, c.window, c.block_size)
        if sink.max_blocks > self.budget.num_blocks:
            return None, (f"sink_tokens {c.sink_tokens} + window {c.window} need {sink.max_blocks} blocks of "
                          f"{c.block_size} tokens per sequence (sinks and window in whole blocks, plus an eviction "
                          f"step of {sink.evict_tokens} tokens), above the KV budget of {self.budget.num_blocks} "
                          f"blocks ({self.budget.num_tokens} tokens)")
        if sink.max_cache_len > self.context_len:
            return None, (f"sink_tokens {c.sink_tokens} + window {c.window} put tokens at positions up to "
                          f"{sink.max_cache_len - 1}, beyond the context length of {self.context_len}")
        return sink, None

    def _check_speculation(self, k: int | None) -> None:
        """A request may lower its draft length or turn speculation off; it may not turn on what the engine runs
        without, or draft deeper than the engine's setting."""
        if not k:
            return
        if self.config.speculative is SpeculativeMode.OFF:
            raise InvalidRequestError(f"num_speculative_tokens={k} asks for speculative decoding, which this engine "
                                      "runs without (start it with --speculative ngram or draft)",
                                      param="num_speculative_tokens")
        if k > self.config.num_speculative_tokens:
            raise InvalidRequestError(f"num_speculative_tokens must be in [0, {self.config.num_speculative_tokens}] "
                                      f"(the engine's --num-speculative-tokens), got {k}",
                                      param="num_speculative_tokens")

    def abort_request(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.ABORT

    def stop_sequence(self, request_id: str, index: int) -> None:
        """End one completion early with finish_reason "stop" (a stop string matched in the text layer)."""
        seqs = self.requests.get(request_id, [])
        for seq in seqs:
            if seq.index == index and not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.STOP
        if seqs and all(s.finished for s in seqs):
            del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.speculator.propose(self.scheduler.running)  # draft tokens, verified by this step's forward
        batch = self.scheduler.schedule()
        self.num_preemptions += len(batch.preempted)
        if batch.empty:
            return []
        self.runner.shift_keys(batch.evictions)  # sink sequences: kept window keys follow their new positions
        started = time.perf_counter()
        forward = self.runner.forward(batch.chunks)
        sampled = self.sampler.sample(forward.logits, self._sampling_rows(forward.sampling_chunks), overwrite=True)
        self.speculator.record_step(batch.chunks, time.perf_counter() - started)
        outputs = self._update(batch, forward, sampled)
        self.speculator.forget_finished()  # a draft model's copies of sequences that ended
        return outputs

    def stats(self) -> EngineStats:
        spec = self.speculator
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.pool.num_blocks,
                           self.pool.num_blocks - self.pool.num_free, self.pool.num_queries, self.pool.num_hits,
                           self.num_preemptions, spec.num_draft_tokens, spec.num_accepted_tokens,
                           spec.num_verifications)

    def check_integrity(self) -> None:
        """The pool agrees with the block tables (BlockPool.check_integrity); a running sink sequence holds exactly
        the blocks its cache needs, at most its max_blocks, and no window block of it is in the prefix cache."""
        self.pool.check_integrity(self.scheduler.block_tables())
        bs = self.pool.block_size
        for seq in self.scheduler.running:
            if seq.sink is None:
                continue
            held, needed = len(seq.block_table), -(-seq.cache_len // bs)
            assert held == needed <= seq.sink.max_blocks, (
                f"sink sequence {seq.request_id}/{seq.index} holds {held} blocks for {seq.cache_len} cached tokens "
                f"(needs {needed}, at most {seq.sink.max_blocks})")
            keyed = [b for b in seq.block_table[seq.sink.num_sink_blocks:] if self.pool.keys[b] is not None]
            assert not keyed, f"sink sequence {seq.request_id}/{seq.index}: window blocks {keyed} in the prefix cache"

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()

    # -- private ------------------------------------------------------------------------------------------
    def _sampling_rows(self, chunks: tuple[ScheduledChunk, ...]) -> list[SamplingRow]:
        seqs = [c.seq for c in chunks]
        bitmasks = self.bitmasks.fill([seq.grammar for seq in seqs])
        rows = []
        for chunk, bitmask in zip(chunks, bitmasks):
            seq = chunk.seq
            rows.append(SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator,
                                    token_bitmask=bitmask))
            rows += self.speculator.draft_rows(chunk, rows[-1])  # verification rows (no grammar: never drafts)
        return rows

    def _update(self, batch: SchedulerOutput, forward: ForwardOutput, sampled: SamplerOutput) -> list[RequestOutput]:
        """Fold a step's sampled tokens into its sequences. A row that failed on its own request's input (nothing
        to draw, a grammar refusing the token) ends that request with the error; the other rows go on."""
        touched = self._advance(batch, forward)
        failed: dict[str, FreeholdError] = {}
        row = 0
        for chunk in forward.sampling_chunks:
            rows, row = range(row, row + chunk.num_sampled_rows), row + chunk.num_sampled_rows
            seq = chunk.seq
            if seq.request_id in failed:
                continue
            error = self._keep_sampled(chunk, rows, sampled)
            if error is not None:
                failed[seq.request_id] = error
            touched[seq.request_id] = None
        return [self._fail(request_id, failed[request_id]) if request_id in failed else self._collect(request_id)
                for request_id in touched]

    def _advance(self, batch: SchedulerOutput, forward: ForwardOutput) -> dict[str, None]:
        """Count the step's computed tokens, keep its prompt logprobs, end prefill-only (max_tokens 0) sequences
        whose prompt is done; -> the requests that have something to report so far."""
        touched: dict[str, None] = {}
        for seq, values in forward.prompt_logprobs:
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs += values
        for chunk in batch.chunks:
            seq = chunk.seq  # drafts count once accepted; a sink sequence may skip from its sinks to its window
            seq.num_computed_tokens = seq.resume_point(seq.num_computed_tokens + chunk.num_tokens - chunk.num_drafts)
            self._register_full_blocks(chunk.seq)
            if chunk.completes and not chunk.samples:
                chunk.seq.finish_reason = FinishReason.LENGTH
                self.scheduler.finish(chunk.seq)
                touched[chunk.seq.request_id] = None
        return touched

    def _keep_sampled(self, chunk: ScheduledChunk, rows: range, sampled: SamplerOutput) -> FreeholdError | None:
        """Append the chunk's sampled token, or with drafts the verified run (freehold.engine.speculation): row j's
        token is kept, and the next row's too while it followed an accepted draft (t_j == d_{j+1}), whose KV then
        counts as computed. Stops at the sequence's finish; frees the rejected drafts' blocks."""
        seq, drafts = chunk.seq, chunk.seq.draft_token_ids[:chunk.num_drafts]
        num_accepted = 0
        for j, row in enumerate(rows):
            error = sampled.failed.get(row) or self._append(seq, sampled.token_ids[row], sampled.logprobs[row])
            if error is not None or seq.finished or j == len(drafts) or sampled.token_ids[row] != drafts[j]:
                break
            seq.num_computed_tokens += 1
            num_accepted += 1
        self.speculator.record_verification(seq, len(drafts), num_accepted)
        seq.draft_token_ids = []
        if drafts and not seq.finished:
            self.scheduler.release_unused_blocks(seq)
            self._register_full_blocks(seq)
        return error

    def _append(self, seq: Sequence, token: int, logprob) -> InvalidRequestError | None:
        """Append a sampled token (and advance the grammar); returns the request's error instead if any."""
        if seq.grammar is not None and not seq.grammar.try_accept(token):
            return InvalidRequestError(f"the structured-output grammar reached a state where token {token} was "
                                       f"drawn but not accepted, after {len(seq.output_token_ids)} tokens")
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        seq.finish_reason = self._finish_reason(seq, token)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
        return None

    def _fail(self, request_id: str, error: FreeholdError) -> RequestOutput:
        """End every sequence of the request (their blocks are freed) and report `error` as its last output."""
        seqs = self.requests.pop(request_id)
        for seq in seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.ABORT
        return RequestOutput(request_id, seqs[0].prompt_token_ids, [], seqs[0].num_cached_tokens, error=error)

    def _register_full_blocks(self, seq: Sequence) -> None:
        seq.update_block_keys(self.pool.block_size)
        num_full = min(seq.num_computed_tokens // self.pool.block_size, len(seq.block_keys))
        if seq.sink is not None:  # only the sinks: window blocks are rotated in place
            num_full = min(num_full, seq.sink.num_sink_blocks)
        for i in range(num_full):
            self.pool.register(seq.block_table[i], seq.block_keys[i])

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if seq.grammar is not None and seq.grammar.terminated:
            return FinishReason.STOP  # the grammar is complete and its stop token was drawn (even with ignore_eos)
        if len(seq.output_token_ids) >= p.min_tokens:
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens or (seq.sink is None and seq.num_tokens >= self.max_model_len):
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
        """The prompt logprobs once they are complete, on one output only."""
        done = seq.prompt_logprobs is not None and seq.next_prompt_logprob_position is None
        if not done or seq.prompt_logprobs_reported:
            return None
        seq.prompt_logprobs_reported = True
        return seq.prompt_logprobs

    def _collect(self, request_id: str) -> RequestOutput:
        """New tokens of each of the request's sequences since the last report; forgets finished requests."""
        seqs = self.requests[request_id]
        outputs = []
        for seq in seqs:
            new = slice(seq.num_emitted, len(seq.output_token_ids))
            logprobs = seq.output_logprobs[new] if seq.params.logprobs is not None else None
            outputs.append(CompletionOutput(seq.index, seq.output_token_ids[new], logprobs, seq.finish_reason))
            seq.num_emitted = len(seq.output_token_ids)
        out = RequestOutput(request_id, seqs[0].prompt_token_ids, outputs, seqs[0].num_cached_tokens,
                            prompt_logprobs=self._take_prompt_logprobs(seqs[0]))
        if out.finished:
            del self.requests[request_id]
        return out
