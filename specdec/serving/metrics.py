"""``GET /metrics``: the engine's figures (`specdec.step.metrics.EngineMetrics`) and the server's
refusals in Prometheus' text format, through ``prometheus_client`` (a registry per app, read at
scrape time: nothing is counted twice and nothing global is touched)."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from specdec.step.metrics import Histogram


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    cumulative = np.cumsum(histogram.counts).tolist()
    buckets = [(repr(float(bound)), count) for bound, count in zip(histogram.bounds, cumulative)]
    buckets.append(("+Inf", cumulative[-1]))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.total)


class ServerCollector:
    """Collects the served decoder's `EngineMetrics` and the server's own ``refused`` counts (by
    reason) when Prometheus scrapes; nothing while the model is still loading but the refusals."""

    def __init__(self, served) -> None:
        self.served = served

    def collect(self):
        refused = CounterMetricFamily("specdec_requests_refused", "Requests refused at once, by reason",
                                      labels=["reason"])
        decoder, counts = self.served.decoder, dict(self.served.refused)
        counts["queue_full"] += decoder.metrics.refused if decoder is not None else 0  # at submission
        for reason, count in sorted(counts.items()):
            refused.add_metric([reason], count)
        yield refused
        if decoder is None:
            return
        metrics = decoder.metrics
        yield GaugeMetricFamily("specdec_requests_running", "Requests holding a cache row (prefilling or decoding)",
                                value=decoder.running)
        yield GaugeMetricFamily("specdec_requests_queued", "Requests waiting for a cache row", value=decoder.queued)
        yield GaugeMetricFamily("specdec_kv_cache_bytes", "Bytes the KV cache holds now (sized to the rows live now)",
                                value=decoder.cache.bytes)
        ended = CounterMetricFamily("specdec_requests_finished", "Requests ended, by how they ended", labels=["end"])
        for end, count in sorted(metrics.ended.items()):
            ended.add_metric([end], count)
        yield ended
        yield CounterMetricFamily("specdec_prompt_tokens", "Prompt tokens of admitted requests",
                                  value=metrics.prompt_tokens)
        yield CounterMetricFamily("specdec_generation_tokens", "Tokens generated", value=metrics.generated_tokens)
        yield CounterMetricFamily("specdec_verify_steps", "Decode steps (verify forwards) run",
                                  value=metrics.verify_steps)
        yield CounterMetricFamily("specdec_prefill_chunks", "Prefill forwards run", value=metrics.prefill_chunks)
        drafted = CounterMetricFamily("specdec_draft_tokens", "Draft tokens verified, by drafter", labels=["drafter"])
        accepted = CounterMetricFamily("specdec_accepted_tokens", "Draft tokens accepted, by drafter",
                                       labels=["drafter"])
        for name in sorted(metrics.drafted):
            drafted.add_metric([name], metrics.drafted[name])
            accepted.add_metric([name], metrics.accepted.get(name, 0))
        yield drafted
        yield accepted
        yield _histogram("specdec_step_seconds", "Wall time of one decode step", metrics.step_seconds)
        yield _histogram("specdec_time_to_first_token_seconds", "From submission to the first generated tokens",
                         metrics.ttft_seconds)


def registry_for(served) -> CollectorRegistry:
    """A registry of its own holding the collector of ``served`` (a `specdec.serving.server.Served`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(served))
    return registry
