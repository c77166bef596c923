"""Prometheus export of the server's metrics, named as vLLM names them.

Dashboards and LoRA-aware routers (the Gateway API Inference Extension reads
`vllm:lora_requests_info`) work unchanged. Gauges and counters are read from
`engine.metrics.snapshot()` at each scrape; the latency histograms are observed by the
server as requests stream (the engine keeps only recent samples, and a histogram's counts
must never go down). jlora's own series (adapter residency and loads, per-tenant tokens)
carry the `jlora:` prefix.

This module reads metrics; it never changes the engine.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
RESIDENCIES = ("gpu", "loading", "host", "disk")


class ServingMetrics:
    """One server's registry: histograms the server observes, the engine's state at scrape.

    `snapshot` is a callable returning the engine's metrics snapshot (or None while the
    engine is warming up)."""

    def __init__(self, model_name: str, snapshot):
        self.model_name, self.snapshot = model_name, snapshot
        self.registry = CollectorRegistry()
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time to the first token, seconds", buckets=_LATENCY_BUCKETS,
                              **labels).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between a request's consecutive tokens, seconds",
                             buckets=_LATENCY_BUCKETS, **labels).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Request latency from arrival to finish, seconds",
                             buckets=_LATENCY_BUCKETS, **labels).labels(model_name)
        self.registry.register(_EngineCollector(self))

    def observe_tokens(self, gap_seconds: float, tokens: int) -> None:
        """A streamed update of `tokens` tokens, `gap_seconds` after the request's last one."""
        for _ in range(tokens):
            self.itl.observe(gap_seconds / tokens)

    def observe_finish(self, timings: dict | None) -> None:
        if not timings:
            return
        if timings.get("first_token") is not None:
            self.ttft.observe(timings["first_token"] - timings["arrival"])
        self.e2e.observe(timings["finished"] - timings["arrival"])

    def serve_http(self, host: str, port: int):
        """Serve /metrics on host:port in a background thread; returns the HTTP server."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return server


class _EngineCollector:
    def __init__(self, owner: ServingMetrics):
        self.owner = owner

    def collect(self):
        snap = self.owner.snapshot()
        if snap is None:
            return
        model = [self.owner.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(model, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(model, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests running (prefill or decode)",
                    snap["num_running"])
        yield gauge("vllm:num_requests_waiting", "Requests waiting to run", snap["num_waiting"])
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1)",
                    snap["kv_usage"])
        yield counter("vllm:prompt_tokens", "Prompt tokens prefilled", snap["prompt_tokens"])
        yield counter("vllm:generation_tokens", "Tokens generated", snap["generation_tokens"])
        yield counter("vllm:num_preemptions", "Requests preempted (KV pages taken back)",
                      snap["preemptions"])
        done = CounterMetricFamily("vllm:request_success", "Finished requests by reason",
                                   labels=["model_name", "finished_reason"])
        for reason, n in sorted(snap["finished"].items()):
            done.add_metric([*model, reason], n)
        yield done
        info = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of running and waiting "
                                 "requests (value: the time of this reading)",
                                 labels=["max_lora", "running_lora_adapters",
                                         "waiting_lora_adapters"])
        info.add_metric([str(snap.get("max_loras", 0)),
                         ",".join(sorted(set(snap.get("running_adapters", ())))),
                         ",".join(sorted(set(snap.get("waiting_adapters", ()))))], time.time())
        yield info
        evictions = CounterMetricFamily("jlora:adapter_evictions", "Adapters moved off the "
                                        "device to make room for others")
        evictions.add_metric([], snap.get("adapter_evictions", 0))
        yield evictions
        yield from _adapter_families(snap.get("adapters", {}))
        yield from _tenant_families(snap.get("tenants", {}))


def _adapter_families(adapters: dict):
    residency = GaugeMetricFamily("jlora:adapter_residency", "1 for the tier an adapter is in",
                                  labels=["adapter", "residency"])
    loads = CounterMetricFamily("jlora:adapter_loads", "Copies of an adapter to the device",
                                labels=["adapter"])
    hits = CounterMetricFamily("jlora:adapter_hits", "Requests that found their adapter on "
                               "the device", labels=["adapter"])
    misses = CounterMetricFamily("jlora:adapter_misses", "Requests that waited for their "
                                 "adapter to be loaded", labels=["adapter"])
    latency = SummaryMetricFamily("jlora:adapter_load_seconds", "Adapter load latency, seconds",
                                  labels=["adapter"])
    for name, a in sorted(adapters.items()):
        for tier in RESIDENCIES:
            residency.add_metric([name, tier], float(a.get("residency") == tier))
        loads.add_metric([name], a.get("loads", 0))
        hits.add_metric([name], a.get("hits", 0))
        misses.add_metric([name], a.get("misses", 0))
        seconds = a.get("load_seconds", ())
        latency.add_metric([name], len(seconds), float(sum(seconds)))
    yield from (residency, loads, hits, misses, latency)


def _tenant_families(tenants: dict):
    families = {key: CounterMetricFamily(f"jlora:tenant_{key}", doc, labels=["tenant"])
                for key, doc in (("requests", "Requests served per tenant"),
                                 ("prompt_tokens", "Prompt tokens served per tenant"),
                                 ("generation_tokens", "Tokens generated per tenant"))}
    for tenant, counts in sorted(tenants.items()):
        for key, family in families.items():
            family.add_metric([tenant], counts.get(key, 0))
    yield from families.values()
