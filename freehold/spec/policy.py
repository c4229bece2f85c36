"""How many draft tokens to verify: per sequence from its measured acceptance, per step from measured step costs.

A draft token at depth i (the i-th of a proposal) becomes an output token only if it and every draft before it are
accepted: with a per-token acceptance rate a, it is worth a^i tokens on average. Verifying it costs one more row in
the step. With step time t(T) = fixed + per_token * T for T tokens in the step (fitted online from the engine's own
steps) and B tokens produced by the step without drafts, the step's rate is B / t(T); one more row is worth its cost
when it brings more tokens per second than the step already makes:

    a^i / per_token  >  B / t(T)        <=>        a^i  >  threshold = per_token * B / t(T)

So at batch 1 on a memory-bound step (t dominated by reading the weights) the threshold is small and drafts are long;
in a large, compute-bound batch it nears 1 and speculation switches itself off. A sequence whose drafts keep failing
drops to 0 drafts and probes with one draft every PROBE_INTERVAL steps, so it can come back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from freehold.spec.ngram import NgramIndex

DECAY = 0.8  # weight of the past in the acceptance estimate, per verification
PROBE_INTERVAL = 16  # steps between one-draft probes of a sequence whose estimate says "off"
COST_DECAY = 0.98  # weight of the past in the step-cost fit, per step
PRIOR_FIXED_S, PRIOR_PER_TOKEN_S = 1e-2, 1e-4  # the fit's starting point: a memory-bound step (1% per extra row)
MIN_RECORDS = 8  # a draft model drafts for the batch only once the target's step costs are this well measured


@dataclass
class SpecState:
    """One sequence's speculation: its n-gram index, acceptance estimate and counters."""

    index: NgramIndex = field(default_factory=NgramIndex)
    successes: float = 1.0  # decayed accepted drafts (a Beta(1, 1) prior: estimate 0.5 before any evidence)
    trials: float = 2.0  # decayed verified drafts, each failure counted once (later drafts are not tried)
    steps_off: int = 0  # steps since the last proposal while the estimate says "off"
    num_proposed: int = 0
    num_accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.successes / self.trials

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """After verification: drafts 1..num_accepted matched, draft num_accepted + 1 (if any) did not."""
        tried = num_accepted + (1 if num_accepted < num_drafts else 0)
        self.successes = DECAY * self.successes + num_accepted
        self.trials = DECAY * self.trials + tried
        self.num_proposed += num_drafts
        self.num_accepted += num_accepted

    def draft_length(self, threshold: float, max_tokens: int) -> int:
        """The most drafts worth verifying: depth i while acceptance^i > threshold (0..max_tokens)."""
        a = min(self.acceptance, 0.999)
        k = max_tokens if threshold <= 0 else int(math.log(threshold) / math.log(a)) if threshold < 1 else 0
        k = max(0, min(k, max_tokens))
        if k == 0:
            self.steps_off += 1
            if self.steps_off >= PROBE_INTERVAL:  # a probe keeps the estimate alive
                self.steps_off = 0
                return 1
        return k


class StepCosts:
    """t(T) = fixed + per_token * T, fitted by exponentially weighted least squares over the engine's steps."""

    def __init__(self, scale: float = 1.0):
        """`scale`: the prior step's cost relative to the target's (a draft model: its weight bytes over the
        target's, so that drafting is tried before its cost is measured)."""
        w, fixed, per_token = 4.0, PRIOR_FIXED_S * scale, PRIOR_PER_TOKEN_S * scale
        # the prior counts as a few steps at T = 1 and T = 9
        self._sw, self._st, self._sy = 2 * w, 10 * w, w * (2 * fixed + 10 * per_token)
        self._stt, self._sty = 82 * w, w * (fixed * 10 + per_token * 82)
        self.num_records = 0
        self._rw = self._rt = self._rtt = 0.0  # the recorded sizes alone (no prior), decayed like the fit

    @property
    def measured(self) -> bool:
        """Enough recent steps of the engine's own, of sizes spread at least 10% around their mean, that the fit's
        slope is the machine's and not the prior's or noise's (a one-row probe in steps of 64 rows says nothing
        about the slope, and older steps of other sizes decay away)."""
        if self.num_records < MIN_RECORDS:
            return False
        mean = self._rt / self._rw
        return max(self._rtt / self._rw - mean * mean, 0.0) ** 0.5 >= 0.1 * mean

    def record(self, num_tokens: int, seconds: float) -> None:
        self.num_records += 1
        d, t = COST_DECAY, float(num_tokens)
        self._rw, self._rt, self._rtt = d * self._rw + 1, d * self._rt + t, d * self._rtt + t * t
        self._sw, self._st, self._sy = d * self._sw + 1, d * self._st + t, d * self._sy + seconds
        self._stt, self._sty = d * self._stt + t * t, d * self._sty + t * seconds

    def fit(self) -> tuple[float, float]:
        """(fixed, per_token) seconds; per_token is kept positive (a drafted row is never free)."""
        var = self._sw * self._stt - self._st ** 2
        if var <= 1e-9:
            return self._sy / self._sw, PRIOR_PER_TOKEN_S
        per_token = (self._sw * self._sty - self._st * self._sy) / var
        fixed = (self._sy - per_token * self._st) / self._sw
        per_token = max(per_token, 1e-7)
        return max(fixed, 0.0), per_token

    def threshold(self, num_tokens: int, num_sampled: int) -> float:
        """The acceptance^depth a draft row must beat in a step of num_tokens tokens producing num_sampled tokens."""
        fixed, per_token = self.fit()
        return per_token * num_sampled / max(fixed + per_token * num_tokens, 1e-9)


def draft_depth(acceptance: float, num_running: int, num_drafting: int, verify: StepCosts, draft: StepCosts,
                max_depth: int) -> int:
    """A draft model's depth for this step: the k that maximizes tokens per second, 0 when none beats plain decoding.
    With R running sequences of which B draft k tokens each, per-token acceptance a:

        rate(k) = (R + B * (a + a^2 + ... + a^k)) / (k * t_draft(B) + t_verify(R + k * B))

    (a draft step costs the draft model's forward; k = 0 is plain decoding, rate R / t_verify(R))."""
    fixed_v, per_v = verify.fit()
    fixed_d, per_d = draft.fit()
    a = min(max(acceptance, 0.0), 0.999)
    best_k, best_rate = 0, num_running / (fixed_v + per_v * num_running)
    gained = 0.0
    for k in range(1, max_depth + 1):
        gained += a ** k
        seconds = k * (fixed_d + per_d * num_drafting) + fixed_v + per_v * (num_running + k * num_drafting)
        rate = (num_running + num_drafting * gained) / seconds
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k

