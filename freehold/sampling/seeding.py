"""Seeded random streams: a request with a `seed` draws its uniforms from its own stream, so what it samples does
not depend on the batch it shares steps with.

The whole 64-bit seed counts. torch's CPU generator keeps only the low 32 bits of a seed (seeds 0 and 2**32 give
the same numbers), so a stream is numpy's PCG64 seeded through a SeedSequence of (seed mod 2**64, completion
index): distinct (seed, index) pairs give distinct streams, and completion 1 of seed s is not completion 0 of s + 1.
"""
from __future__ import annotations

import numpy as np

_MASK = 2**64 - 1


class SeededStream:
    """One completion's uniforms u ~ U[0, 1), one per sampled token."""

    def __init__(self, seed: int, index: int = 0):
        self.seed = seed
        self.index = index
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & _MASK, index])))

    def uniform(self) -> float:
        """The next u in [0, 1), a float32 value (24 random bits), as the sampler's tensors hold it."""
        return float(self._rng.random(dtype=np.float32))


def make_generator(seed: int | None, index: int = 0) -> SeededStream | None:
    """The stream of completion `index` of a request seeded with `seed` (keep it for the request's lifetime);
    None when no seed was given (the row draws from the sampler's shared generator)."""
    return None if seed is None else SeededStream(seed, index)
