"""Per-sequence grammar state and the per-step token bitmasks the sampler applies.

Bitmask layout (xgrammar's): int32 [rows, ceil(V / 32)]; bit (t % 32) of word t // 32 set = token t allowed.

A `GrammarState` follows a sequence's accepted output tokens: the engine feeds it each sampled token once, in
`Engine._update`, and nothing else.

The stop tokens are allowed only where the matcher reports the output so far complete (`is_completed()`), whatever
the bitmask says: xgrammar 0.2.9 lets a stop token through at the start of `[a-z<|>_]+` (an empty output) while
reporting the match incomplete, so this check keeps an output from ending where its language does not.

Preemption by recompute keeps the output tokens (only their KV is recomputed), so the state needs no rollback; `num_accepted == len(output_token_ids)` holds after every step.
"""
from __future__ import annotations

from collections.abc import Sequence

import functools
from types import ModuleType

import torch

from freehold.constrain.spec import Constraint


@functools.cache
def _xgr() -> ModuleType:
    """xgrammar, imported on first use: it imports transformers (~0.4 s and ~40 MB resident), which only
    constrained requests need."""
    import xgrammar
    return xgrammar


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.matcher = _xgr().GrammarMatcher(constraint.grammar)
        self.stop_token_ids = tuple(constraint.grammar.tokenizer_info.stop_token_ids)
        self.num_accepted = 0

    def try_accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar refuses it."""
        if not self.matcher.accept_token(token_id):
            return False
        self.num_accepted += 1
        return True

    def accept(self, token_id: int) -> None:
        """Advance by one token the grammar must accept (raises RuntimeError otherwise)."""
        if not self.try_accept(token_id):
            raise RuntimeError(f"grammar matcher refused token {token_id} after {self.num_accepted} tokens")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: the sequence ends here."""
        return self.matcher.is_terminated()


class BitmaskFiller:
    """Fills the next-token bitmasks of a step's constrained rows, several matchers in parallel."""

    def __init__(self, vocab_size: int, max_threads: int = 2):
        self.vocab_size = vocab_size
        self.max_threads = max_threads
        self._batch = None  # created with the first constrained row

    def fill(self, states: Sequence[GrammarState | None]) -> list[torch.Tensor | None]:
        """Per row: its bitmask (int32 [ceil(V / 32)], a view into one batch buffer), or None if unconstrained."""
        constrained = [i for i, s in enumerate(states) if s is not None]
        result: list[torch.Tensor | None] = [None] * len(states)
        if not constrained:
            return result
        if self._batch is None:
            self._batch = _xgr().BatchGrammarMatcher(self.max_threads)
        bitmask = _xgr().allocate_token_bitmask(len(constrained), self.vocab_size)
        if len(constrained) == 1:  # one row: no thread hand-off
            states[constrained[0]].matcher.fill_next_token_bitmask(bitmask, 0)
        else:
            self._batch.batch_fill_next_token_bitmask([states[i].matcher for i in constrained], bitmask)
        for j, i in enumerate(constrained):
            if not states[i].matcher.is_completed():
                clear_token_bits(bitmask[j], states[i].stop_token_ids)
            result[i] = bitmask[j]
        return result


def clear_token_bits(bitmask: torch.Tensor, token_ids: Sequence[int]) -> None:
    """Forbid `token_ids` in one row's bitmask (int32 [ceil(V / 32)]), in place."""
    for t in token_ids:
        word = int(bitmask[t // 32]) & 0xFFFFFFFF & ~(1 << (t % 32))  # as unsigned 32 bits
        bitmask[t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # back to a signed int32


def apply_token_bitmask(logits: torch.Tensor, bitmasks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """l[b, t] = -inf where bit t of row b's bitmask is clear; rows whose bitmask is None are untouched.
    logits: [B, V] fp32; returns new logits (the input is not modified)."""
    rows = [i for i, m in enumerate(bitmasks) if m is not None]
    if not rows:
        return logits
    full = _xgr().allocate_token_bitmask(len(bitmasks), logits.shape[-1])
    full[rows] = torch.stack([bitmasks[i] for i in rows])
    out = logits.clone()
    backend = "cpu" if out.device.type == "cpu" else "auto"
    _xgr().apply_token_bitmask_inplace(out, full.to(out.device, non_blocking=True), indices=rows, backend=backend)
    return out
