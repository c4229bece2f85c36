"""Model runner: packs scheduled chunks into one flat batch (`prepare_*`), runs the model, returns the logits
of the sequences that sample this step and the prompt logprobs the batch's prefill rows yield
(freehold.engine.prompt_logprobs). It tells the packed layers each row's kind (freehold.quant.compute):
decode rows (a generated token's, a short prompt's, every logits row) or prompt rows (a long prompt's), so a row's
matmul path never depends on what else is in the batch. Where the native attention kernel runs (CPU, fp32
activations), the rows of every prompt under SDPA_MIN_ROWS_X_CONTEXT attend through it, each to its sequence up to
itself, so a row's attention does not depend on how its prompt was split into chunks either (SDPA's results do, in
the last bits, and a bf16 KV cache turns such bits into bf16 roundings that can change a greedy token:
docs/performance.md, issue 19)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from freehold.config import MAX_SPECULATIVE_TOKENS
from freehold.engine import prompt_logprobs
from freehold.engine.prompt_logprobs import PromptLogprobRows
from freehold.engine.scheduler import Eviction, ScheduledChunk
from freehold.engine.sequence import Sequence
from freehold.kernels import native
from freehold.kv import sink
from freehold.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from freehold.models.llama import LlamaForCausalLM
from freehold.quant.compute import GEMM_MIN_PROMPT_TOKENS, RowKind, row_kinds
from freehold.types import TokenLogprob


MAX_DECODE_ROWS = 1 + MAX_SPECULATIVE_TOKENS  # generated tokens computed together as decode rows, at most
# Where rows could attend alone, a prompt whose (tokens to compute at first admission) x (prompt tokens) reaches this
# attends through SDPA, chunk by chunk: the kernel's vector dot products cost more than SDPA's GEMMs there (2 threads,
# prompt time through the kernel vs SDPA, new tokens after cached ones: 128 after 0 0.92x, 512/0 0.91x, 1,536/0 1.05x,
# 2,020/0 1.22x, 20/2,000 0.62x, 100/7,000 0.80x, 600/1,000 0.98x, 500/4,000 1.17x, 900/2,000 1.18x). So every
# prompt under 1,024 tokens attends alone.
SDPA_MIN_ROWS_X_CONTEXT = 1 << 20


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [B] rows of the flat batch whose logits are needed (a chunk's drafts' rows too)
    decode_rows: torch.Tensor  # [T] bool: decode rows (freehold.quant.compute), the rest prompt rows
    sampling_chunks: tuple[ScheduledChunk, ...]  # the B chunks, in logit_rows order
    prompt_logprob_rows: list[PromptLogprobRows]  # prefill rows that score prompt tokens


class ForwardOutput(NamedTuple):
    logits: torch.Tensor  # [B, V] fp32: per sampling chunk, its num_sampled_rows rows (1 + its drafts)
    sampling_chunks: tuple[ScheduledChunk, ...]
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]]  # new prompt logprobs per sequence, in order


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: KVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.rows_attend_alone = (device.type == "cpu" and model.model.norm.weight.dtype == torch.float32
                                  and native.paged_attention() is not None and cache.native_view(0) is not None)

    @torch.inference_mode()
    def forward(self, chunks: tuple[ScheduledChunk, ...]) -> ForwardOutput:
        """-> fp32 logits [B, V] for the chunks that sample, those chunks, and the batch's prompt logprobs."""
        inp = self.prepare_input(chunks)
        with row_kinds(inp.decode_rows):
            hidden = self.model(inp.input_ids, inp.positions, self.cache, inp.meta)
        scored = prompt_logprobs.compute(self.model, hidden, inp.prompt_logprob_rows) if inp.prompt_logprob_rows else []
        with row_kinds(RowKind.DECODE):  # every row the engine asks logits for is sampled from
            return ForwardOutput(self.model.compute_logits(hidden[inp.logit_rows]), inp.sampling_chunks, scored)

    def shift_keys(self, evictions: tuple[Eviction, ...]) -> None:
        """Re-rotate the window keys that sink sequences keep after this step's evictions (freehold.kv.sink)."""
        for eviction in evictions:
            sink.shift_keys(self.cache, self.model.rope, list(eviction.blocks), eviction.shift)

    def prepare_input(self, chunks: tuple[ScheduledChunk, ...]) -> ModelInput:
        """Chunks whose rows attend alone (`_attends_alone`: each token a decode row attending to the sequence up to
        itself, the same computation as decoding it alone) first, then prefill chunks. Slots, RoPE positions and
        context lengths are cache indices (`Sequence.cache_index`: the token positions, unless a sink sequence
        evicted tokens)."""
        alone = [self._attends_alone(c) for c in chunks]
        decodes = [c for c, a in zip(chunks, alone) if a]
        prefills = [c for c, a in zip(chunks, alone) if not a]
        ids, positions, slots, decode_rows = [], [], [], []
        for c in decodes + prefills:
            ids += _chunk_ids(c)
            first = c.seq.cache_index(c.start)  # a chunk never spans evicted tokens
            pos = list(range(first, first + c.num_tokens))
            positions += pos
            decode_rows += self._decode_rows(c.seq, list(range(c.start, c.start + c.num_tokens)))
            table = c.seq.block_table
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in pos]
        decode_lens = [p + 1 for c in decodes for p in range(c.seq.cache_index(c.start),
                                                             c.seq.cache_index(c.start) + c.num_tokens)]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots), num_decode=len(decode_lens),
            decode_block_tables=self._decode_tables(decodes, decode_lens) if decodes else None,
            decode_context_lens=self._tensor(decode_lens) if decodes else None,
            decode_runs=self._tensor(list(itertools.accumulate((c.num_tokens for c in decodes), initial=0)))
            if decodes else None,
            prefills=self._prefill_chunks(prefills, len(decode_lens)))
        rows, sampling, scored, row = [], [], [], 0
        for c in decodes + prefills:
            selected = prompt_logprobs.select_rows(c, row)
            if selected is not None:
                scored.append(selected)
            row += c.num_tokens
            if c.samples:
                rows += range(row - c.num_sampled_rows, row)
                sampling.append(c)
        return ModelInput(self._tensor(ids), self._tensor(positions), meta, self._tensor(rows),
                          torch.tensor(decode_rows, dtype=torch.bool, device=self.device), tuple(sampling), scored)

    # -- private ------------------------------------------------------------------------------------------
    def _attends_alone(self, c: ScheduledChunk) -> bool:
        """Whether the chunk's rows go to the decode attention, each row on its own: decode chunks, and where the
        native kernel runs every chunk of a prompt under SDPA_MIN_ROWS_X_CONTEXT (counted at first admission, so
        fixed for the sequence)."""
        if _decodes(c):
            return True
        num_prompt = len(c.seq.prompt_token_ids)
        return self.rows_attend_alone and (num_prompt - c.seq.num_cached_tokens) * num_prompt < SDPA_MIN_ROWS_X_CONTEXT

    @staticmethod
    def _decode_rows(seq: Sequence, positions: list[int]) -> list[bool]:
        """A generated token's row, or any row of a prompt short enough (counted at first admission, so fixed for
        the sequence) that reading each weight once per row beats dequantizing it for a GEMM."""
        num_prompt = len(seq.prompt_token_ids)
        if num_prompt - seq.num_cached_tokens < GEMM_MIN_PROMPT_TOKENS:
            return [True] * len(positions)
        return [p >= num_prompt for p in positions]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _decode_tables(self, decodes: list[ScheduledChunk], decode_lens: list[int]) -> torch.Tensor:
        """One block table per decode row (a chunk's other rows repeat its sequence's table)."""
        width = -(-max(decode_lens) // self.block_size)
        tables = self._tensor([c.seq.block_table[:width] + [0] * (width - len(c.seq.block_table[:width]))
                               for c in decodes])
        if all(c.num_tokens == 1 for c in decodes):
            return tables
        return tables.repeat_interleave(self._tensor([c.num_tokens for c in decodes]), dim=0,
                                        output_size=len(decode_lens))

    def _prefill_chunks(self, prefills: list[ScheduledChunk], first_row: int) -> tuple[PrefillChunk, ...]:
        out, row = [], first_row
        for c in prefills:
            context = c.seq.cache_index(c.start) + c.num_tokens
            table = self._tensor(c.seq.block_table[:-(-context // self.block_size)])
            out.append(PrefillChunk(row, row + c.num_tokens, context, table))
            row += c.num_tokens
        return tuple(out)


def _decodes(c: ScheduledChunk) -> bool:
    """Whether the chunk's tokens run as decode rows (each attending to the sequence up to itself, as decoding it
    alone would): one real token (plus drafts), or a few generated tokens at once (a draft model catching up with the
    tokens its target accepted). Otherwise a prompt chunk runs as a prefill (SDPA over the chunk), unless
    ModelRunner._attends_alone sends it to the native kernel."""
    if c.num_tokens - c.num_drafts == 1:
        return True
    return c.start >= len(c.seq.prompt_token_ids) and c.num_tokens <= MAX_DECODE_ROWS


def _chunk_ids(c: ScheduledChunk) -> list[int]:
    """The chunk's token ids: the sequence's own, then its draft tokens."""
    real = c.seq.token_ids(c.start, c.start + c.num_tokens - c.num_drafts)
    return real + c.seq.draft_token_ids[:c.num_drafts] if c.num_drafts else real

