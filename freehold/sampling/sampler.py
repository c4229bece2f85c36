"""The batched sampler: next-token logits [B, V] and one SamplingRow per row -> token ids and logprobs.

Order of operations (vLLM's):
    1. logit_bias                    l[t] += bias[t]
    2. min_tokens                    EOS and stop ids -> -inf while fewer than min_tokens tokens are generated
    3. repetition penalty            seen in prompt + output: l / r if l > 0 else l * r
    4. presence / frequency          output tokens only: l -= frequency * count + presence * [count > 0]
    5. allowed_token_mask            disallowed -> -inf
       token_bitmask                 tokens the row's grammar forbids -> -inf (structured outputs)
    6. greedy rows (temperature 0)   argmax of the result of 1-5; they skip 7-11
    7. temperature                   l / T
    8. top-k   9. top-p   10. min-p  (see transforms.py)
    11. draw                         inverse CDF with one uniform per row from the row's generator

Logprobs are log_softmax of the RAW model logits (before any of the above), as OpenAI and vLLM report them.

Every stage is a tensor op over the whole [B, V] batch with per-row parameter tensors built once per call;
a stage no row needs is skipped, so a plain greedy or temperature-only batch costs one argmax or one
noise draw. A seeded row draws its noise from its own generator and therefore picks the same token alone or
in any batch; unseeded rows share the sampler's generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from freehold.constrain.matcher import apply_token_bitmask
from freehold.errors import InvalidRequestError
from freehold.sampling.penalties import (apply_allowed_mask, apply_logit_bias, apply_presence_frequency_penalties,
                                         apply_repetition_penalty, count_tokens, mask_tokens)
from freehold.sampling.transforms import (CANDIDATES, apply_min_p, apply_temperature, apply_top_k_top_p,
                                          draw_inverse_cdf, is_greedy_temperature,
                                          top_k_top_p_candidates)
from freehold.types import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of the batch at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # None: draw from the sampler's shared generator
    allowed_token_mask: torch.Tensor | None = None  # bool [V], True = allowed; None: all allowed
    token_bitmask: torch.Tensor | None = None  # int32 [ceil(V / 32)], bit t set = t allowed (xgrammar's layout)


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs


class NoAllowedTokenError(InvalidRequestError):
    """Every token of a row is masked (its constraint mask and min_tokens leave nothing to draw)."""

    def __init__(self, message: str, row: int):
        super().__init__(message, param="min_tokens")
        self.row = row


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for one request (keep it for the request's lifetime); None when no seed was given."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def is_greedy(params: SamplingParams) -> bool:
    return is_greedy_temperature(params.temperature)


class Sampler:
    """Stateless apart from the shared generator. `seed` fixes the shared generator (tests); None seeds it
    from OS entropy."""

    def __init__(self, vocab_size: int, device: torch.device | str, eos_token_ids: Sequence[int] = (),
                 seed: int | None = None):
        self.vocab_size = vocab_size
        self.device = _canonical_device(torch.device(device))
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_candidates = 4096  # above this many top-k candidates a full sort is as cheap
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def check_params(self, params: SamplingParams) -> None:
        """Reject token ids outside the vocabulary (call when a request is added, not per step)."""
        for name, ids in (("logit_bias", params.logit_bias.keys()), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"{name} has token ids outside [0, {self.vocab_size}): {bad[:5]}",
                                          param=name)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits: [B, V] next-token logits (any float dtype, on the sampler's device)."""
        assert logits.shape == (len(rows), self.vocab_size), f"logits {tuple(logits.shape)} vs {len(rows)} rows"
        assert logits.device == self.device, f"logits on {logits.device}, sampler on {self.device}"
        raw = logits.float()
        processed = self.process_logits(raw, rows)
        greedy = [is_greedy(r.params) for r in rows]
        tokens = processed.argmax(dim=-1) if all(greedy) else self._draw(processed, rows, greedy)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, tokens, rows))

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Stages 1-5 (bias, min_tokens, penalties, allowed mask, grammar bitmask) on fp32 logits [B, V];
        returns new logits."""
        logits = self._apply_logit_bias(logits, rows)
        logits, min_tokens_masked = self._apply_min_tokens(logits, rows)
        logits = self._apply_penalties(logits, rows)
        logits, allowed_masked = self._apply_allowed_masks(logits, rows)
        bitmasks = [r.token_bitmask for r in rows]
        logits = apply_token_bitmask(logits, bitmasks)
        if min_tokens_masked or allowed_masked or any(m is not None for m in bitmasks):
            _check_something_allowed(logits)
        return logits

    # -- stages --------------------------------------------------------------------------------------------

    def _apply_logit_bias(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        triples = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
        if not triples:
            return logits
        row_idx, tok_idx, bias = zip(*triples)
        return apply_logit_bias(logits, self._long(row_idx), self._long(tok_idx),
                                torch.tensor(bias, dtype=torch.float32, device=logits.device))

    def _apply_min_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, bool]:
        pairs = [(i, t) for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens
                 for t in self._stop_ids(r.params)]
        if not pairs:
            return logits, False
        row_idx, tok_idx = zip(*pairs)
        return mask_tokens(logits, self._long(row_idx), self._long(tok_idx)), True

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        eos = () if params.ignore_eos else self.eos_token_ids
        return tuple(params.stop_token_ids) + eos

    def _apply_penalties(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        needs_rep = [p.repetition_penalty != 1.0 for p in params]
        needs_pf = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if not any(needs_rep) and not any(needs_pf):
            return logits
        # Rows that need no penalty contribute no tokens: their counts stay 0 and their parameters are neutral.
        outputs = [r.output_token_ids if rep or pf else () for r, rep, pf in zip(rows, needs_rep, needs_pf)]
        output_counts = count_tokens(outputs, self.vocab_size, logits.device)
        if any(needs_rep):
            prompts = [r.prompt_token_ids if rep else () for r, rep in zip(rows, needs_rep)]
            seen = (count_tokens(prompts, self.vocab_size, logits.device) + output_counts) > 0
            logits = apply_repetition_penalty(logits, seen, self._float([p.repetition_penalty for p in params]))
        if any(needs_pf):
            logits = apply_presence_frequency_penalties(logits, output_counts,
                                                        self._float([p.presence_penalty for p in params]),
                                                        self._float([p.frequency_penalty for p in params]))
        return logits

    def _apply_allowed_masks(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, bool]:
        masks = [r.allowed_token_mask for r in rows]
        if all(m is None for m in masks):
            return logits, False
        everything = torch.ones(self.vocab_size, dtype=torch.bool, device=logits.device)
        allowed = torch.stack([everything if m is None else m.to(logits.device) for m in masks])
        return apply_allowed_mask(logits, allowed), True

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        """Stages 6-11. Greedy rows get neutral parameters here and their argmax is put back at the end."""
        sampled = [p for p, g in zip((r.params for r in rows), greedy) if not g]
        scaled = logits
        if any(p.temperature != 1.0 for p in sampled):
            scaled = apply_temperature(logits, self._float([1.0 if g else r.params.temperature
                                                            for r, g in zip(rows, greedy)]))
        top_k = top_p = None
        if any(p.top_k is not None and p.top_k < self.vocab_size for p in sampled):
            top_k = self._long([self.vocab_size if g or r.params.top_k is None
                                else min(r.params.top_k, self.vocab_size) for r, g in zip(rows, greedy)])
        if any(p.top_p < 1.0 for p in sampled):
            top_p = self._float([1.0 if g else r.params.top_p for r, g in zip(rows, greedy)])
        if top_k is not None or top_p is not None:
            scaled = self._filter_top_k_top_p(scaled, top_k, top_p)
        if any(p.min_p > 0.0 for p in sampled):
            scaled = apply_min_p(scaled, self._float([0.0 if g else r.params.min_p for r, g in zip(rows, greedy)]))
        tokens = draw_inverse_cdf(scaled, self._uniforms(rows, greedy))
        if any(greedy):
            tokens = torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(dim=-1), tokens)
        return tokens

    def _filter_top_k_top_p(self, logits: torch.Tensor, top_k: torch.Tensor | None,
                            top_p: torch.Tensor | None) -> torch.Tensor:
        """Top-K candidates when they provably hold every kept token, else a full sort (same result)."""
        k = top_k if top_k is not None else self._long([self.vocab_size] * logits.shape[0])
        p = top_p if top_p is not None else self._float([1.0] * logits.shape[0])
        k_set = [v for v in k.tolist() if v < self.vocab_size]
        num = max([*k_set, CANDIDATES if top_p is not None else 1])
        fast = top_k_top_p_candidates(logits, k, p, num) if num <= self.max_candidates else None
        return fast if fast is not None else apply_top_k_top_p(logits, top_k, top_p)

    def _uniforms(self, rows: Sequence[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        """u ~ U[0, 1) [B]: one draw per row per step, seeded rows from their own generator (so the row's
        stream does not depend on the batch), unseeded rows in one draw from the shared generator."""
        u = torch.zeros(len(rows), device=self.device)
        shared = [i for i, (r, g) in enumerate(zip(rows, greedy)) if not g and r.generator is None]
        if shared:
            u[shared] = torch.rand(len(shared), device=self.device, generator=self.generator)
        for i, (r, g) in enumerate(zip(rows, greedy)):
            if not g and r.generator is not None:
                u[i] = torch.rand(1, device=self.device, generator=r.generator)[0]
        return u

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor,
                  rows: Sequence[SamplingRow]) -> list[TokenLogprob | None]:
        """log_softmax of the raw logits: the chosen token's value and the top-k, most likely first."""
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return result
        index = self._long(wanted)
        logprobs = torch.log_softmax(raw[index], dim=-1)
        chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
        k = max(rows[i].params.logprobs for i in wanted)
        top_values, top_ids = (v.tolist() for v in logprobs.topk(k, dim=-1))
        chosen_ids = tokens[index].tolist()
        for j, i in enumerate(wanted):
            k_i = rows[i].params.logprobs
            top = tuple(zip(top_ids[j][:k_i], top_values[j][:k_i]))
            result[i] = TokenLogprob(token_id=chosen_ids[j], logprob=chosen[j], top=top)
        return result

    def _long(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _float(self, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)


def _check_something_allowed(logits: torch.Tensor) -> None:
    """Raise if masking left a row with every logit -inf (nothing could be drawn)."""
    empty = torch.isneginf(logits).all(dim=-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise NoAllowedTokenError(f"batch row {row}: every token is masked (the allowed-token mask, the "
                                  "grammar and min_tokens exclude every token)", row=row)


def _canonical_device(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>', so it compares equal to the device of a tensor allocated there."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
