"""Speculative decoding: proposers of draft tokens (`ngram`), the per-sequence and per-step policy that decides how
many to propose (`policy`). The engine verifies drafts in one forward pass of the target (freehold.engine)."""
