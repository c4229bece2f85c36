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
    11. draw                         inverse CDF with one uniform per row from the row's generator (draw.py)

Logprobs are log_softmax of the RAW model logits (before any of the above), as OpenAI and vLLM report them; a row
with `processed_logprobs` also gets them from the distribution of 7-10 over the logits of 1-5 (logprobs.py).

A row whose scores after stages 1-5 leave nothing to draw (every token at -inf) or are not numbers (NaN, +inf)
fails alone: `SamplerOutput.failed` names it with the reason, its drawn token is meaningless, and the other rows
are drawn as if it were not there (each row's draw depends only on its own logits and uniform).

Stages are tensor ops over the batch; a per-row parameter is a Python number when every row shares it, else
a [B, 1] tensor, and a stage no row needs is skipped. Penalties touch only the (row, token) pairs seen in
prompt and output. Stages 6-11 split the rows in three groups, each a few passes over its logits:
    greedy rows               a two-level argmax                                     (chunked.py)
    rows with top-k / top-p   top-K candidates, filtered, drawn in vocabulary order  (transforms.py)
    the other sampled rows    softmax(l / T), min-p, the two-level inverse-CDF draw  (draw.py)
A seeded row draws its uniform from its own generator and therefore picks the same token alone or in any
batch; unseeded rows share the sampler's generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from freehold.constrain.matcher import apply_token_bitmask
from freehold.errors import InvalidRequestError
from freehold.sampling.chunked import argmax_rows
from freehold.sampling.logprobs import processed_logprobs, token_logprobs
from freehold.sampling.seeding import SeededStream
from freehold.sampling.draw import draw_inverse_cdf, draw_inverse_cdf_chunked
from freehold.sampling.penalties import (Penalized, apply_allowed_mask, apply_logit_bias, apply_penalties,
                                         mask_tokens, per_key, token_keys)
from freehold.sampling.transforms import (CANDIDATES, Column, apply_temperature, apply_top_k_top_p,
                                          filter_candidates, is_greedy_temperature, min_p_weights)
from freehold.types import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of the batch at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: SeededStream | None = None  # a seeded request's stream; None: draw from the sampler's shared generator
    allowed_token_mask: torch.Tensor | None = None  # bool [V], True = allowed; None: all allowed
    token_bitmask: torch.Tensor | None = None  # int32 [ceil(V / 32)], bit t set = t allowed (xgrammar's layout)


class SamplerOutput(NamedTuple):
    token_ids: list[int]  # a failed row's entry is meaningless
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs
    failed: dict[int, InvalidRequestError]  # row -> why nothing could be drawn for it (usually empty)


NOTHING_ALLOWED = ("no token can be generated next: the structured-output grammar, the allowed tokens and "
                   "min_tokens exclude every token")
NOT_FINITE = ("the next-token scores became NaN or infinite under this request's sampling parameters "
              "(repetition_penalty, logit_bias, temperature)")


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
        self.max_candidates = 4096  # top-p rows not covered by this many candidates take the full sort
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

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow], overwrite: bool = False) -> SamplerOutput:
        """logits: [B, V] next-token logits (any float dtype, on the sampler's device). `overwrite`: the caller
        will not read `logits` again (the engine's per-step tensor), so the penalties may work in place when no
        row asks for logprobs (which read the raw values) — one [B, V] copy less per step."""
        assert logits.shape == (len(rows), self.vocab_size), f"logits {tuple(logits.shape)} vs {len(rows)} rows"
        assert logits.device == self.device, f"logits on {logits.device}, sampler on {self.device}"
        raw = logits.float()
        in_place = overwrite and all(r.params.logprobs is None for r in rows)
        processed = self.process_logits(raw, rows, in_place)
        failed = _unusable_rows(processed)
        if failed:  # rare: give failed rows harmless scores so the batched draw stays defined
            processed = processed.clone()
            processed[list(failed)] = 0.0
        kept = {i: processed[i].clone() for i, r in enumerate(rows) if r.params.processed_logprobs}  # before draws
        tokens = self._draw(processed, rows)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, tokens, rows, kept), failed)

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                       in_place: bool = False) -> torch.Tensor:
        """Stages 1-5 (bias, min_tokens, penalties, allowed mask, grammar bitmask) on fp32 logits [B, V];
        returns new logits (`in_place`: the penalties may write into `logits`)."""
        logits = self._apply_logit_bias(logits, rows)
        logits = self._apply_min_tokens(logits, rows)
        logits = self._apply_penalties(logits, rows, in_place)
        logits = self._apply_allowed_masks(logits, rows)
        return apply_token_bitmask(logits, [r.token_bitmask for r in rows])

    # -- stages --------------------------------------------------------------------------------------------

    def _apply_logit_bias(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        triples = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
        if not triples:
            return logits
        row_idx, tok_idx, bias = zip(*triples)
        return apply_logit_bias(logits, self._long(row_idx), self._long(tok_idx),
                                torch.tensor(bias, dtype=torch.float32, device=logits.device))

    def _apply_min_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        pairs = [(i, t) for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens
                 for t in self._stop_ids(r.params)]
        if not pairs:
            return logits
        row_idx, tok_idx = zip(*pairs)
        return mask_tokens(logits, self._long(row_idx), self._long(tok_idx))

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        eos = () if params.ignore_eos else self.eos_token_ids
        return tuple(params.stop_token_ids) + eos

    def _apply_penalties(self, logits: torch.Tensor, rows: Sequence[SamplingRow], in_place: bool) -> torch.Tensor:
        params = [r.params for r in rows]
        needs_rep = [p.repetition_penalty != 1.0 for p in params]
        needs_pf = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if not any(needs_rep) and not any(needs_pf):
            return logits
        seen = self._seen_tokens(rows, needs_rep) if any(needs_rep) else None
        counted = self._output_counts(rows, needs_pf) if any(needs_pf) else None
        return apply_penalties(logits, seen, counted, in_place)

    def _seen_tokens(self, rows: Sequence[SamplingRow], needs: list[bool]) -> Penalized:
        """Every prompt and output token of the rows with a repetition penalty (a key may repeat)."""
        keys = torch.cat([token_keys([r.prompt_token_ids if n else () for r, n in zip(rows, needs)],
                                     self.vocab_size, self.device),
                          token_keys([r.output_token_ids if n else () for r, n in zip(rows, needs)],
                                     self.vocab_size, self.device)])
        return Penalized(keys, None, (per_key([r.params.repetition_penalty for r in rows], needs, keys,
                                              self.vocab_size),))

    def _output_counts(self, rows: Sequence[SamplingRow], needs: list[bool]) -> Penalized:
        """Each distinct output token of the rows with a presence / frequency penalty, with its count."""
        outputs = token_keys([r.output_token_ids if n else () for r, n in zip(rows, needs)], self.vocab_size,
                             self.device)
        keys, counts = torch.unique(outputs, return_counts=True)
        presence = per_key([r.params.presence_penalty for r in rows], needs, keys, self.vocab_size)
        frequency = per_key([r.params.frequency_penalty for r in rows], needs, keys, self.vocab_size)
        return Penalized(keys, counts, (presence, frequency))

    def _apply_allowed_masks(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        masks = [r.allowed_token_mask for r in rows]
        if all(m is None for m in masks):
            return logits
        everything = torch.ones(self.vocab_size, dtype=torch.bool, device=logits.device)
        allowed = torch.stack([everything if m is None else m.to(logits.device) for m in masks])
        return apply_allowed_mask(logits, allowed)

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Stages 6-11: each group of rows (greedy, top-k / top-p, the rest) is drawn on its own logits."""
        greedy = [is_greedy(r.params) for r in rows]
        uniforms = self._uniforms(rows, greedy)
        filtered = [not g and self._has_top_k_or_top_p(r.params) for r, g in zip(rows, greedy)]
        plain = [not g and not f for g, f in zip(greedy, filtered)]
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for selected, draw in ((greedy, self._draw_greedy), (filtered, self._draw_filtered),
                               (plain, self._draw_plain)):
            index = [i for i, s in enumerate(selected) if s]
            if len(index) == len(rows):
                return draw(logits, rows, uniforms)
            if index:
                at = self._long(index)
                tokens[at] = draw(logits[at], [rows[i] for i in index], uniforms[at])
        return tokens

    def _draw_greedy(self, logits: torch.Tensor, rows: Sequence[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
        return argmax_rows(logits)

    def _draw_plain(self, logits: torch.Tensor, rows: Sequence[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
        """Temperature and min-p only: p = softmax(l / T) over the vocabulary, two-level draw."""
        if any(r.params.temperature != 1.0 for r in rows):
            logits = apply_temperature(logits, self._column([r.params.temperature for r in rows]))
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0.0 for r in rows):
            probs = min_p_weights(probs, self._column([r.params.min_p for r in rows]))
        return draw_inverse_cdf_chunked(probs, uniforms)

    def _draw_filtered(self, logits: torch.Tensor, rows: Sequence[SamplingRow], uniforms: torch.Tensor,
                       num_candidates: int | None = None) -> torch.Tensor:
        """Rows with top-k or top-p: drawn among the top candidates where those provably hold every kept token.
        Top-p rows that reach further retry with max_candidates, then take the full sort."""
        filters = self._filters(rows)
        num = num_candidates or self._num_candidates(rows)
        candidates = filter_candidates(logits, *filters, num)
        # draw in vocabulary order, as over the full vocabulary: the token for a given u then depends on
        # neither the number of candidates (other rows' top-k) nor the order of tied candidates
        order = candidates.token_ids.argsort(dim=-1)
        token_ids = candidates.token_ids.gather(1, order)
        position = draw_inverse_cdf(candidates.weights.gather(1, order), uniforms)
        tokens = token_ids.gather(1, position.unsqueeze(1)).squeeze(1)
        if candidates.covered is None or bool(candidates.covered.all()):
            return tokens
        missing = (~candidates.covered).nonzero().squeeze(1)  # top-p rows only: top-k rows are always covered
        left = [rows[i] for i in missing.tolist()]
        if num < self.max_candidates:
            tokens[missing] = self._draw_filtered(logits[missing], left, uniforms[missing], self.max_candidates)
        else:
            tokens[missing] = self._draw_sorted(logits[missing], left, uniforms[missing])
        return tokens

    def _num_candidates(self, rows: Sequence[SamplingRow]) -> int:
        """The largest top-k; CANDIDATES if some row has top-p without top-k."""
        top_ks = [r.params.top_k for r in rows if self._has_top_k(r.params)]
        return max(top_ks + [CANDIDATES if len(top_ks) < len(rows) else 1])

    def _draw_sorted(self, logits: torch.Tensor, rows: Sequence[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
        """The reference path: temperature, a full sort for top-k / top-p, min-p, two-level draw."""
        temperature, top_k, top_p, min_p = self._filters(rows)
        probs = apply_top_k_top_p(apply_temperature(logits, temperature), top_k, top_p).softmax(dim=-1)
        return draw_inverse_cdf_chunked(probs if min_p is None else min_p_weights(probs, min_p), uniforms)

    def _filters(self, rows: Sequence[SamplingRow]) -> tuple[Column, Column | None, Column | None, Column | None]:
        """(temperature, top_k, top_p, min_p) as columns; a filter no row uses is None. Off values inside a
        column: top_k = V, top_p = 1.0, min_p = 0.0."""
        params = [r.params for r in rows]
        top_k = [min(p.top_k, self.vocab_size) if self._has_top_k(p) else self.vocab_size for p in params]
        return (self._column([p.temperature for p in params]),
                self._column(top_k) if any(k < self.vocab_size for k in top_k) else None,
                self._column([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
                self._column([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None)

    def _column(self, values: Sequence[float] | Sequence[int]) -> Column:
        """One number when every row shares it (the op then takes a scalar), else a [R, 1] tensor."""
        first = values[0]
        if all(v == first for v in values):
            return first
        dtype = torch.long if isinstance(first, int) else torch.float32
        return torch.tensor(values, dtype=dtype, device=self.device).unsqueeze(1)

    def _has_top_k(self, params: SamplingParams) -> bool:
        return params.top_k is not None and params.top_k < self.vocab_size

    def _has_top_k_or_top_p(self, params: SamplingParams) -> bool:
        return self._has_top_k(params) or params.top_p < 1.0

    def _uniforms(self, rows: Sequence[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        """u ~ U[0, 1) [B]: one draw per row per step, seeded rows from their own generator (so the row's
        stream does not depend on the batch), unseeded rows in one draw from the shared generator."""
        shared = [i for i, (r, g) in enumerate(zip(rows, greedy)) if not g and r.generator is None]
        seeded = [i for i, (r, g) in enumerate(zip(rows, greedy)) if not g and r.generator is not None]
        if len(shared) == len(rows):
            return torch.rand(len(rows), device=self.device, generator=self.generator)
        own = torch.tensor([rows[i].generator.uniform() for i in seeded], device=self.device)
        if len(seeded) == len(rows):
            return own
        u = torch.zeros(len(rows), device=self.device)
        if shared:
            u[self._long(shared)] = torch.rand(len(shared), device=self.device, generator=self.generator)
        if seeded:
            u[self._long(seeded)] = own
        return u

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow],
                  processed: dict[int, torch.Tensor]) -> list[TokenLogprob | None]:
        """log_softmax of the raw logits: the chosen token's value and the top-k, most likely first; rows in
        `processed` (their logits after stages 1-5) also get the processed ones."""
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(rows)
        if not wanted:
            return result
        index = self._long(wanted)
        values = token_logprobs(raw[index], tokens[index], [rows[i].params.logprobs for i in wanted])
        for i, value in zip(wanted, values):
            if i in processed:
                k = rows[i].params.logprobs or 0
                value = replace(value, processed=processed_logprobs(processed[i], value.token_id, rows[i].params, k))
            result[i] = value
        return result

    def _long(self, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _unusable_rows(logits: torch.Tensor) -> dict[int, InvalidRequestError]:
    """Rows of processed logits [B, V] with nothing to draw, with the reason: max = -inf (every token masked),
    NaN (amax propagates it) or +inf. One pass over the logits."""
    peak = logits.amax(dim=-1)  # NaN if the row holds a NaN
    bad = ~torch.isfinite(peak)
    if not bool(bad.any()):
        return {}
    rows = bad.nonzero().squeeze(1).tolist()
    reasons = torch.isneginf(peak).tolist()
    return {row: InvalidRequestError(NOTHING_ALLOWED if reasons[row] else NOT_FINITE) for row in rows}


def _canonical_device(device: torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>', so it compares equal to the device of a tensor allocated there."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
