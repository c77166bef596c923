"""Who is admitted first: the Virtual Token Counter (VTC) or first come, first served.

VTC (Sheng et al., OSDI'24, "Fairness in Serving Large Language Models") keeps a counter c_u
per tenant u, the service it has received divided by its weight w_u. Service is
input_cost * prompt tokens + output_cost * generated tokens (1 and 2 by default). Admission
picks, among tenants with waiting requests, the one with the smallest counter (its oldest
request first) and charges it the prompt at once; each decode charges the token's owner.
When a tenant's queue goes from empty to non-empty its counter is lifted to the smallest
counter among tenants with waiting requests (to that of the tenant that last left the queue
if none wait), so idle time banks no credit. Nothing is held back while work waits: the
policy only orders admissions (work-conserving).

FCFS orders by arrival; the counters still run, so both policies report the same service.
Host only; the scheduler calls this module. No jax here.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable, Iterator

POLICIES = ("vtc", "fcfs")


class FairShare:
    def __init__(self, policy: str = "vtc", weights: dict[str, float] | None = None,
                 input_cost: float = 1.0, output_cost: float = 2.0):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy {policy!r} is not one of {POLICIES}")
        self.policy, self.input_cost, self.output_cost = policy, input_cost, output_cost
        self.weights: dict[str, float] = {}
        for tenant, w in (weights or {}).items():
            self.set_weight(tenant, w)
        self.counters: dict[str, float] = defaultdict(float)   # service / weight
        self.service: dict[str, float] = defaultdict(float)    # service, unweighted
        self.queued: Counter = Counter()                        # waiting requests per tenant
        self._last_left = 0.0

    def set_weight(self, tenant: str, weight: float) -> None:
        if not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"weight {weight!r} of tenant {tenant!r} must be a number > 0")
        self.weights[tenant] = float(weight)

    # ------------------------------------------------------------------ queue changes
    def arrive(self, tenant: str, new: bool = True) -> None:
        """A request of `tenant` joins the waiting queue (new: not a preempted one back)."""
        if new and self.queued[tenant] == 0:
            waiting = [self.counters[u] for u, n in self.queued.items() if n > 0]
            floor = min(waiting) if waiting else self._last_left
            self.counters[tenant] = max(self.counters[tenant], floor)
        self.queued[tenant] += 1

    def leave(self, tenant: str) -> None:
        """A waiting request of `tenant` was admitted or dropped."""
        self.queued[tenant] -= 1
        assert self.queued[tenant] >= 0, tenant
        if self.queued[tenant] == 0:
            del self.queued[tenant]
            self._last_left = self.counters[tenant]

    def charge(self, tenant: str, input_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.input_cost * input_tokens + self.output_cost * output_tokens
        self.service[tenant] += cost
        self.counters[tenant] += cost / self.weights.get(tenant, 1.0)

    # ------------------------------------------------------------------ order
    def order(self, waiting: Iterable) -> Iterator:
        """Waiting requests (given in arrival order) in admission order. Lazy: a tenant charged
        while the caller admits its request is ranked by its new counter from then on."""
        if self.policy == "fcfs":
            yield from list(waiting)
            return
        queues: dict[str, list] = {}
        for r in waiting:
            queues.setdefault(r.tenant, []).append(r)
        heap = [(self.counters[t], q[0].arrival, t, 0) for t, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            _, _, tenant, i = heapq.heappop(heap)
            queue = queues[tenant]
            yield queue[i]
            if i + 1 < len(queue):   # the caller may have charged this tenant: re-rank it
                heapq.heappush(heap, (self.counters[tenant], queue[i + 1].arrival, tenant,
                                      i + 1))
