"""Prometheus metrics, named as vLLM names them so existing dashboards find them.

Each app gets its own registry (two apps in one process, as in tests, do not collide).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blipserve.engine.scheduler import Scheduler

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 90)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "blipserve_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "blipserve_e2e_request_latency_seconds",
            "Time from request to full response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "blipserve_time_to_first_token_seconds",
            "Time from queueing a sequence to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch(self, scheduler: Scheduler) -> None:
        """Read the scheduler's live numbers at each scrape."""
        self.registry.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector(Collector):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s, stats = self.scheduler, self.scheduler.stats
        yield GaugeMetricFamily(
            "blipserve_num_requests_waiting", "Sequences queued", value=s.num_waiting
        )
        yield GaugeMetricFamily(
            "blipserve_num_requests_running", "Sequences decoding", value=s.num_running
        )
        counters = {
            "blipserve_prompt_tokens": ("Prompt tokens prefilled", stats.prompt_tokens),
            "blipserve_generation_tokens": ("Tokens generated", stats.generated_tokens),
            "blipserve_image_cache_hits": (
                "Images whose prefix came from the cache",
                stats.prefix_cache_hits,
            ),
            "blipserve_image_cache_misses": (
                "Images run through the encoder",
                stats.prefix_cache_misses,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
