"""Batched sampling: penalties and masks, temperature / top-k / top-p / min-p, seeded draws, logprobs."""
from freehold.sampling.sampler import Sampler, SamplerOutput, SamplingRow, is_greedy
from freehold.sampling.seeding import SeededStream, make_generator
from freehold.sampling.transforms import transform_probs

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "SeededStream", "is_greedy", "make_generator",
           "transform_probs"]
