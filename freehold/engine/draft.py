"""A draft model: a smaller model with the target's vocabulary, or the target itself at int4 (a quantized
self-draft), proposing drafts greedily on its own KV cache. Greedy drafts are point-mass proposals, so verification
is the engine's usual rule (freehold.engine.speculation) and the output stays the target's.

Each drafting sequence has a mirror here: the same tokens, its own block table. Before a step the mirror catches up
with the tokens the target appended since (the accepted drafts' KV is already there: they were the mirror's own
tokens), then k batched greedy steps of the draft model propose d1..dk. The first step's chunk is [tokens the mirror
lacks, last token]; the next ones are one token each. Mirrors of sequences that finished or were preempted are freed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from freehold.config import EngineConfig, ModelConfig
from freehold.engine.memory import create_kv_cache
from freehold.engine.runner import ModelRunner
from freehold.engine.scheduler import ScheduledChunk
from freehold.engine.sequence import Sequence, SequenceStatus
from freehold.errors import InvalidRequestError
from freehold.kv.block_pool import BlockPool
from freehold.models.llama import LlamaForCausalLM
from freehold.spec.policy import StepCosts


CATCH_UP_TOKENS = 512  # tokens the draft model computes per step to catch up with its targets (beyond the drafts)


@dataclass
class _Mirror:
    target: Sequence
    seq: Sequence  # the draft's copy: the target's tokens, then its own proposals
    synced: int  # outputs known equal to the target's (those before the last proposals)


class DraftModel:
    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig, target_config: ModelConfig,
                 engine_config: EngineConfig, num_blocks: int, relative_cost: float = 1.0):
        """`relative_cost`: a draft step's expected cost relative to the target's (weight bytes ratio), the prior of
        the cost model until draft steps are measured."""
        if model_config.vocab_size != target_config.vocab_size:
            raise InvalidRequestError(f"the draft model's vocabulary has {model_config.vocab_size} tokens but the "
                                      f"target's has {target_config.vocab_size}: a draft must share the target's "
                                      "tokenizer", param="draft_model")
        self.pool = BlockPool(num_blocks, engine_config.block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, create_kv_cache(model_config, engine_config, num_blocks),
                                  torch.device(engine_config.device))
        self.mirrors: dict[int, _Mirror] = {}  # id(target) ->
        self.costs = StepCosts(relative_cost)  # one greedy draft step vs the sequences in it

    def propose(self, seqs: list[Sequence], k: int) -> None:
        """Set each sequence's draft_token_ids: k greedy tokens of the draft model (fewer near its limits; none for
        a sequence whose mirror cannot get KV blocks)."""
        self.forget_finished()
        active = [self._synced(seq) for seq in seqs]
        for step in range(k):
            going = [m for m in active if len(m.target.draft_token_ids) == step and self._grow(m.seq)]
            if not going:
                return
            chunks = tuple(ScheduledChunk(m.seq, m.seq.num_computed_tokens, m.seq.num_tokens - m.seq.num_computed_tokens)
                           for m in going)
            started = time.perf_counter()
            tokens = self.runner.forward(chunks).logits.argmax(dim=-1).tolist()
            self.costs.record(sum(c.num_tokens for c in chunks), time.perf_counter() - started)
            for m, chunk, token in zip(going, chunks, tokens):
                m.seq.num_computed_tokens += chunk.num_tokens
                m.seq.output_token_ids.append(token)
                m.target.draft_token_ids.append(token)

    def lag(self, seq: Sequence) -> int:
        """The tokens the draft model would compute before drafting for `seq` (its whole length without a mirror; at
        least 1, the last token, as `_synced` leaves it)."""
        m = self.mirrors.get(id(seq))
        return seq.num_tokens - (min(m.seq.num_computed_tokens, seq.num_tokens - 1) if m is not None else 0)

    def within_catch_up_budget(self, seqs: list[Sequence]) -> list[Sequence]:
        """The sequences to draft for this step: the draft model computes each one's missing tokens first (a whole
        prompt, the first time), so those are bounded per step (CATCH_UP_TOKENS, least behind first); the others
        catch up in later steps."""
        chosen, spent = [], 0
        for lag, seq in sorted(((self.lag(seq), seq) for seq in seqs), key=lambda pair: pair[0]):
            if spent and spent + lag > CATCH_UP_TOKENS:
                break
            chosen.append(seq)
            spent += lag
        return chosen

    def _synced(self, seq: Sequence) -> _Mirror:
        """The sequence's mirror with the target's tokens; its KV kept up to the tokens both still share."""
        m = self.mirrors.get(id(seq))
        if m is None:
            m = self.mirrors[id(seq)] = _Mirror(seq, Sequence(seq.request_id, seq.index, seq.prompt_token_ids,
                                                              seq.params, arrival=0), 0)
        real, mine = seq.output_token_ids, m.seq.output_token_ids
        keep = m.synced + len(os.path.commonprefix([mine[m.synced:], real[m.synced:len(mine)]]))
        del mine[keep:]
        mine += real[keep:]
        m.synced = len(mine)
        m.seq.num_computed_tokens = min(m.seq.num_computed_tokens, len(seq.prompt_token_ids) + keep,
                                        m.seq.num_tokens - 1)
        self._release_past_computed(m.seq)
        seq.draft_token_ids = []
        return m

    def _grow(self, mirror: Sequence) -> bool:
        need = -(-(mirror.num_tokens) // self.pool.block_size) - len(mirror.block_table)
        if need > 0:
            if not self.pool.can_allocate(need):
                return False
            mirror.block_table += self.pool.allocate(need)
        return True

    def _release_past_computed(self, mirror: Sequence) -> None:
        keep = -(-mirror.num_computed_tokens // self.pool.block_size)
        if len(mirror.block_table) > keep:
            self.pool.free(mirror.block_table[keep:])
            del mirror.block_table[keep:]

    def forget_finished(self) -> None:
        """Free the mirrors of sequences that finished or were preempted."""
        for key, m in list(self.mirrors.items()):
            if m.target.status is not SequenceStatus.RUNNING:
                self.pool.free(m.seq.block_table)
                del self.mirrors[key]
