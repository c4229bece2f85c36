"""Prometheus metrics for `GET /metrics`, in a registry of their own (no process-global state).

Engine state (running/waiting requests, KV usage, prefix cache, preemptions) is read from the engine's latest
`EngineStats` when scraped; latencies and token counts are recorded by the HTTP layer as requests stream.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from freehold.engine.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], EngineStats], num_pending: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter("freehold_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("freehold_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("freehold_requests", "Finished engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.time_to_first_token = Histogram("freehold_time_to_first_token_seconds",
                                             "From admission to the first generated token", registry=r,
                                             buckets=_LATENCY_BUCKETS)
        self.inter_token_latency = Histogram("freehold_inter_token_latency_seconds",
                                             "Time between consecutive tokens of one completion", registry=r,
                                             buckets=_LATENCY_BUCKETS)
        self.request_latency = Histogram("freehold_e2e_request_latency_seconds",
                                         "From admission to the last token", registry=r, buckets=_LATENCY_BUCKETS)
        self.embedding_requests = Counter("freehold_embedding_requests", "Answered /v1/embeddings requests",
                                          registry=r)
        self.embedding_tokens = Counter("freehold_embedding_tokens", "Tokens embedded (after truncation)", registry=r)
        self.embedding_latency = Histogram("freehold_embedding_request_latency_seconds",
                                           "From queueing to the vectors of one embeddings request", registry=r,
                                           buckets=_LATENCY_BUCKETS)
        r.register(_EngineCollector(engine_stats, num_pending))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, engine_stats: Callable[[], EngineStats], num_pending: Callable[[], int]):
        self._engine_stats = engine_stats
        self._num_pending = num_pending

    def collect(self) -> Iterator[Metric]:
        s = self._engine_stats()
        yield _gauge("freehold_num_requests_running", "Sequences the scheduler is running", s.num_running)
        yield _gauge("freehold_num_requests_waiting", "Sequences queued in the scheduler", s.num_waiting)
        yield _gauge("freehold_num_requests_pending", "HTTP requests admitted that have no token yet",
                     self._num_pending())
        yield _gauge("freehold_kv_cache_usage_ratio", "Fraction of KV blocks referenced by sequences", s.kv_usage)
        yield _gauge("freehold_kv_blocks_used", "KV blocks referenced by sequences", s.kv_blocks_used)
        yield _gauge("freehold_kv_blocks_total", "KV blocks in the cache", s.kv_blocks_total)
        yield _counter("freehold_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       s.prefix_cache_queries)
        yield _counter("freehold_prefix_cache_hits", "Prompt tokens served from the prefix cache",
                       s.prefix_cache_hits)
        yield _counter("freehold_num_preemptions", "Sequences preempted (recomputed later)", s.num_preemptions)
        yield _counter("freehold_spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified",
                       s.num_draft_tokens)
        yield _counter("freehold_spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted",
                       s.num_accepted_tokens)
        yield _counter("freehold_spec_decode_num_verifications", "Speculative decoding: steps in which a sequence "
                       "verified drafts", s.num_verifications)
        yield _gauge("freehold_spec_decode_acceptance_rate", "Accepted / verified draft tokens since start "
                     "(0 before any)", s.num_accepted_tokens / s.num_draft_tokens if s.num_draft_tokens else 0.0)
        yield _gauge("freehold_spec_decode_mean_accepted_length", "Draft tokens accepted per verification since "
                     "start (0 before any)", s.num_accepted_tokens / s.num_verifications if s.num_verifications else 0.0)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
