"""Batched sampling: penalties and masks, temperature / top-k / top-p / min-p, seeded draws, logprobs."""
from freehold.sampling.sampler import (NoAllowedTokenError, Sampler, SamplerOutput, SamplingRow, is_greedy,
                                       make_generator)
from freehold.sampling.transforms import transform_probs

__all__ = ["NoAllowedTokenError", "Sampler", "SamplerOutput", "SamplingRow", "is_greedy", "make_generator",
           "transform_probs"]
