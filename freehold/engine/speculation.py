"""The engine's side of speculative decoding (freehold.spec proposes): drafts before the step, verification after.

A sequence with draft tokens d1..dk is scheduled as one chunk [last, d1, ..., dk]; each of its k + 1 rows is a decode
row attending to the sequence up to itself, so row j's logits are the ones plain decoding would compute after
d1..dj. Each row is then sampled exactly as plain decoding samples (every sampling control, penalties counting
d1..dj as generated): t_j ~ p_j. The kept tokens are t_0, t_1, ... up to and including the first t_j != d_{j+1}:

    draft d_{j+1} is accepted  <=>  t_j == d_{j+1}

This is the rejection rule for a point-mass proposal q = [d_{j+1}]: accept with probability min(1, p(d)/q(d)) = p(d),
and on rejection draw from the residual max(0, p - q), which is p without d, renormalized; drawing t ~ p and
keeping it either way does both at once. So each kept token has exactly the distribution plain decoding gives it,
and greedy rows (t_j = argmax p_j) keep exactly the tokens plain decoding would. A seeded row draws k + 1 numbers
from its stream per step, so its samples (not their distribution) differ from plain decoding's.

Proposers: prompt lookup (`ngram`: freehold.spec.ngram, drafts per sequence from its acceptance and the measured
step costs, freehold.spec.policy) and a draft model (`draft`: freehold.engine.draft, one depth per step for every
drafting sequence, the one that maximizes the tokens per second the cost models predict).

Rejected drafts' KV is dropped: the sequence's computed count moves only over accepted tokens, and blocks past it
are freed before any is registered in the prefix cache (they never are). Rows whose grammar constrains them, or
whose prompt logprobs are pending, do not speculate.
"""
from __future__ import annotations

from freehold.config import EngineConfig, SpeculativeMode
from freehold.engine.draft import DraftModel
from freehold.engine.scheduler import ScheduledChunk
from freehold.engine.sequence import Sequence
from freehold.errors import InvalidRequestError
from freehold.sampling.sampler import SamplingRow
from freehold.spec.policy import PROBE_INTERVAL, SpecState, StepCosts, draft_depth


class Speculator:
    def __init__(self, config: EngineConfig, max_model_len: int, draft: DraftModel | None = None):
        if config.speculative is SpeculativeMode.DRAFT and draft is None:
            raise InvalidRequestError("speculative 'draft' needs a draft model (LLM(draft_model=...) or "
                                      "--draft-model / --draft-weights)", param="speculative")
        self.enabled = config.speculative is not SpeculativeMode.OFF
        self.draft = draft if config.speculative is SpeculativeMode.DRAFT else None
        self.max_drafts = config.num_speculative_tokens
        self.steps_off = 0  # draft model: steps since the last draft while the cost model said "off"
        self.max_model_len = max_model_len
        self.costs = StepCosts()
        self.num_draft_tokens = 0  # verified drafts (metrics: acceptance rate = accepted / drafts)
        self.num_accepted_tokens = 0
        self.num_verifications = 0  # chunks that carried drafts (mean accepted length = accepted / verifications)

    def propose(self, running: list[Sequence]) -> None:
        """Give each running sequence that is about to decode its drafts for this step (maybe none)."""
        if not self.enabled or not running:
            return
        candidates = []
        for seq in running:
            seq.draft_token_ids = []
            if seq.num_uncomputed == 1 and seq.grammar is None and seq.next_prompt_logprob_position is None \
                    and seq.sink is None and self._room(seq) > 0:  # a sink sequence never drafts
                seq.spec = seq.spec or SpecState()
                candidates.append(seq)
        if self.draft is not None:
            self._propose_from_draft_model(candidates, len(running))
            return
        threshold = self.costs.threshold(len(running), len(running))
        for seq in candidates:
            k = seq.spec.draft_length(threshold, self._room(seq))  # type: ignore[union-attr]
            if k:
                seq.draft_token_ids = seq.spec.index.propose(seq.token_ids, seq.num_tokens, k)  # type: ignore[union-attr]

    def _room(self, seq: Sequence) -> int:
        """The most drafts the sequence may verify: within its request's num_speculative_tokens (default: the
        engine's), max_tokens and the context after the bonus token."""
        limit = self.max_drafts if seq.params.num_speculative_tokens is None else seq.params.num_speculative_tokens
        return min(limit, seq.params.max_tokens - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens - 1)

    def _propose_from_draft_model(self, candidates: list[Sequence], num_running: int) -> None:
        """One depth for the step (the draft model runs it for all candidates at once), from the cost models, once
        the target's step costs are measured; until then, and while the depth is 0, one sequence drafts one token
        every PROBE_INTERVAL steps (measuring both models and the acceptance at the cost of one row): the one the
        draft model is least behind, since a sequence it has not seen costs it the whole prompt first."""
        if not candidates:
            return
        acceptance = sum(s.spec.acceptance for s in candidates) / len(candidates)  # type: ignore[union-attr]
        k = draft_depth(acceptance, num_running, len(candidates), self.costs, self.draft.costs,  # type: ignore
                        self.max_drafts) if self.costs.measured else 0
        if k == 0:
            self.steps_off += 1
            if self.steps_off < PROBE_INTERVAL:
                return
            k, candidates = 1, [min(candidates, key=self.draft.lag)]  # type: ignore[union-attr]
        self.steps_off = 0
        self.draft.propose(self.draft.within_catch_up_budget(candidates), k)  # type: ignore[union-attr]
        for seq in candidates:
            del seq.draft_token_ids[self._room(seq):]

    def forget_finished(self) -> None:
        if self.draft is not None:
            self.draft.forget_finished()

    def record_step(self, chunks: tuple[ScheduledChunk, ...], seconds: float) -> None:
        """Fit the step-cost model on decode-only steps (a prompt chunk's rows cost what drafted rows do not)."""
        if self.enabled and all(c.num_tokens - c.num_drafts == 1 for c in chunks):
            self.costs.record(sum(c.num_tokens for c in chunks), seconds)

    @staticmethod
    def draft_rows(chunk: ScheduledChunk, first: SamplingRow) -> list[SamplingRow]:
        """The sampling rows after each of the chunk's drafts (row j: d1..dj counted as generated)."""
        seq = chunk.seq
        return [SamplingRow(first.params, first.prompt_token_ids, seq.output_token_ids + seq.draft_token_ids[:j],
                            first.generator) for j in range(1, chunk.num_drafts + 1)]

    def record_verification(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        if num_drafts and seq.spec is not None:
            seq.spec.record(num_drafts, num_accepted)
            self.num_draft_tokens += num_drafts
            self.num_accepted_tokens += num_accepted
            self.num_verifications += 1
