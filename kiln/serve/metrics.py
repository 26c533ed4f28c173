"""The server's Prometheus metrics (GET /metrics), in a registry of its own so that several servers in one process
(tests) do not collide. Gauges of the engine's state, and the counters of its steps, are read when scraped."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from kiln.engine.step_stats import KINDS

# Latency buckets (seconds): a CPU toy model's steps take milliseconds, a 132B model's prefill seconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
            20.0, 40.0)


class ServerMetrics:
    """Counters and histograms the request handlers update; `bind_engine` attaches the gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests", "HTTP requests finished, by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "tokens generated and sent", registry=r)
        self.time_to_first_token = Histogram("kiln_time_to_first_token_seconds", "arrival to first token",
                                             buckets=_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("kiln_inter_token_latency_seconds", "gap between a request's steps",
                                             buckets=_BUCKETS, registry=r)
        self.queue_length = Gauge("kiln_queue_length", "requests admitted but not yet running in the engine",
                                  registry=r)
        self.running = Gauge("kiln_running_sequences", "sequences in the engine's running batch", registry=r)
        self.waiting = Gauge("kiln_waiting_sequences", "sequences the engine's scheduler has not started (or "
                             "preempted)", registry=r)
        self.kv_blocks_used = Gauge("kiln_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.kv_blocks_total = Gauge("kiln_kv_blocks_total", "KV cache blocks of the engine", registry=r)

    def bind_engine(self, queue_length: Callable[[], float], running: Callable[[], float],
                    waiting: Callable[[], float], blocks_used: Callable[[], float], blocks_total: int,
                    step_stats: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        self.queue_length.set_function(queue_length)
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_blocks_used.set_function(blocks_used)
        self.kv_blocks_total.set(blocks_total)
        self.registry.register(StepCounters(step_stats))


class StepCounters:
    """The engine's StepStats (kiln/engine/step_stats.py) as counters by step kind, from the latest summary the engine
    process sent (`read()`; None before the first: zeros). They are totals kept in the engine, hence a collector
    rather than Counters incremented here."""

    _PER_KIND = (("steps", "kiln_engine_steps", "engine step() calls, by the kind of model step each launched"),
                 ("seconds", "kiln_engine_step_seconds", "host wall time inside the engine's step() calls"),
                 ("seqs", "kiln_engine_step_sequences", "sequences of the model steps launched"),
                 ("prefill_tokens", "kiln_engine_step_prefill_tokens", "prompt (prefill) tokens of the model steps "
                  "launched"))

    def __init__(self, read: Callable[[], dict[str, Any] | None]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        summary = self.read()
        kinds = summary["kinds"] if summary else {}
        for field, name, doc in self._PER_KIND:
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in KINDS:
                family.add_metric([kind], kinds.get(kind, {}).get(field, 0))
            yield family
        yield CounterMetricFamily("kiln_engine_between_steps_seconds", "host time between the engine's step() calls "
                                  "while it had work (its step loop's own work)",
                                  value=summary["between_seconds"] if summary else 0.0)
