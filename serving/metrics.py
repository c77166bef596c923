"""Engine metrics: counters, gauges and latency samples kept for the server to export.

The engine thread records; any thread may `snapshot()`. Latencies are kept as the most recent
samples (bounded), from which the server issue builds Prometheus histograms. No jax here.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

_KEEP = 100_000   # latency samples kept per series


def _samples() -> deque:
    return deque(maxlen=_KEEP)


@dataclass
class EngineMetrics:
    num_waiting: int = 0
    num_running: int = 0
    kv_usage: float = 0.0                 # fraction of KV pages in use
    prompt_tokens: int = 0                # prefilled prompt tokens (recomputes not counted)
    generation_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    finished: Counter = field(default_factory=Counter)   # finish reason -> requests
    ttft: deque = field(default_factory=_samples)        # seconds, arrival -> first token
    itl: deque = field(default_factory=_samples)         # seconds between a request's tokens
    e2e: deque = field(default_factory=_samples)         # seconds, arrival -> finish
    # per step: seconds to plan (schedule, batch), dispatch, wait for the previous step's
    # tokens, take them in (stops, detokenize, stream)
    host_phases: deque = field(default_factory=_samples)
    # tenant -> requests finished, prompt and generated tokens served
    tenants: dict = field(default_factory=dict)
    extra: Callable[[], dict] | None = None   # the engine's adapter gauges, read on snapshot
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tenant(self, name: str) -> dict:
        """The tenant's counters (call with the lock held)."""
        if name not in self.tenants:
            self.tenants[name] = dict(requests=0, prompt_tokens=0, generation_tokens=0)
        return self.tenants[name]

    def snapshot(self) -> dict:
        with self.lock:
            snap = dict(num_waiting=self.num_waiting, num_running=self.num_running,
                        kv_usage=self.kv_usage, prompt_tokens=self.prompt_tokens,
                        generation_tokens=self.generation_tokens, steps=self.steps,
                        preemptions=self.preemptions, finished=dict(self.finished),
                        ttft=list(self.ttft), itl=list(self.itl), e2e=list(self.e2e),
                        host_phases=list(self.host_phases),
                        tenants={t: dict(c) for t, c in self.tenants.items()})
        if self.extra is not None:
            snap.update(self.extra())
        return snap
