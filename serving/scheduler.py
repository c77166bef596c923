"""Who runs in the next engine step: continuous batching with chunked prefill (host only).

Each step, `schedule()` returns a `Plan`:
  1. every running sequence that still wants tokens decodes one (its next page is allocated
     here); when pages run out, the latest-arrived running sequence is preempted: its pages,
     row and adapter slot are freed and it waits to be recomputed from its prompt plus the
     tokens it has already produced (so it later finishes with the same output);
  2. the prefill token budget goes first to sequences part-way through their prompt, then
     to waiting requests in the fairness policy's order (serving/fairness.py: VTC by
     tenant, or FCFS) while a row and pages are free. A request whose adapter is not on the
     GPU is passed over (its adapter is sent for, serving/adapter_cache.py) and the next
     one is tried; a request short of pages stops admission, so nobody overtakes it. A prompt
     longer than the budget is prefilled in chunks over several steps.
Shapes are bucketed: the decode count and the padded prefill tokens are rounded up to the
configured buckets, so the engine runs one of a fixed set of compiled programs.

The scheduler changes request state, the page allocator and adapter slot holds; it never
touches a device. No jax here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from serving.adapter_cache import AdapterCache
from serving.fairness import FairShare
from serving.kv_cache import PageAllocator
from serving.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_seqs: int                    # rows: sequences running at once
    max_seq_len: int                 # longest context (prompt + generated)
    piece: int                       # Q: prefill tokens are padded to pieces of Q
    decode_buckets: tuple[int, ...]  # allowed decode counts, ascending
    prefill_buckets: tuple[int, ...]  # allowed padded prefill token counts, ascending

    @property
    def prefill_budget(self) -> int:
        return self.prefill_buckets[-1]


@dataclass
class PrefillChunk:
    request: Request
    start: int         # position of the chunk's first token
    length: int
    last: bool         # completes the context: the step samples the next token


@dataclass
class Plan:
    decodes: list[Request] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    decode_bucket: int = 0
    prefill_bucket: int = 0

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


def round_up(n: int, buckets: tuple[int, ...]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} is beyond the largest bucket {buckets[-1]}")
    return buckets[i]


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: PageAllocator,
                 adapters: AdapterCache | None = None, fair: FairShare | None = None):
        self.config, self.pages, self.adapters = config, pages, adapters
        self.fair = fair or FairShare()
        self.waiting: list[Request] = []   # arrival order
        self.running: list[Request] = []   # arrival order; hold a row, pages, an adapter slot
        self._free_rows = list(range(config.max_seqs - 1, -1, -1))

    def add(self, request: Request, new: bool = True) -> None:
        request.status = Status.WAITING
        _insert(self.waiting, request)
        self.fair.arrive(request.tenant, new)

    def finish(self, request: Request, reason: str) -> None:
        """Take a request out for good: pages, row and adapter freed at once."""
        self._release(request)
        if request in self.waiting:
            self.waiting.remove(request)
            self.fair.leave(request.tenant)
        if request.lora is not None and request.status is not Status.FINISHED:
            self.adapters.unbind(request.lora)
        request.status, request.finish_reason = Status.FINISHED, reason

    def preempt(self, request: Request) -> None:
        self._release(request)
        request.preemptions += 1
        self.add(request, new=False)

    def _release(self, request: Request) -> None:
        self.pages.free(request)
        if request in self.running:
            self.running.remove(request)
            if request.lora is not None:
                self.adapters.release(request.lora)
        if request.row is not None:
            self._free_rows.append(request.row)
            request.row = None

    def wants_decode(self, r: Request) -> bool:
        return (r.status is Status.RUNNING and not r.prefilling
                and r.num_sampled < r.params.max_tokens
                and r.computed + 2 <= self.config.max_seq_len)  # the new token still fits

    def schedule(self) -> Plan:
        plan = Plan()
        if self.adapters is not None:
            self.adapters.begin_step()
        self._schedule_decodes(plan)
        budget = self.config.prefill_budget
        used = 0
        for r in [r for r in self.running if r.prefilling]:
            used += self._chunk(r, budget - used, plan)
        room = self.waiting and self._free_rows and used < budget
        for r in self.fair.order(list(self.waiting)) if room else ():
            if used >= budget or not self._free_rows:
                break
            if r.in_flight or r in plan.preempted:
                continue   # its last tokens are not read back yet: recompute them later
            if r.lora is not None and not self.adapters.ready(r.lora):
                self.adapters.want(r.lora)
                continue   # its adapter is on its way; the others need not wait for it
            if self.pages.pages_for(min(len(r.prompt_ids) + len(r.generated),
                                        self.config.piece)) > self.pages.num_free:
                break      # nobody overtakes a request waiting for pages
            self._admit(r)
            used += self._chunk(r, budget - used, plan)
        if self.adapters is not None:
            self.adapters.end_step()
        plan.decode_bucket = round_up(len(plan.decodes), self.config.decode_buckets)
        plan.prefill_bucket = round_up(used, self.config.prefill_buckets)
        return plan

    def _schedule_decodes(self, plan: Plan) -> None:
        for r in list(self.running):
            if not self.wants_decode(r):
                continue
            while not self.pages.can_grow(r, r.computed + 1):
                victim = self.running[-1]
                self.preempt(victim)
                plan.preempted.append(victim)
                if victim is r:
                    break
            if r.status is not Status.RUNNING:
                continue
            self.pages.grow(r, r.computed + 1)
            r.computed += 1
            r.in_flight += 1
            plan.decodes.append(r)
            self.fair.charge(r.tenant, output_tokens=1)

    def _admit(self, r: Request) -> None:
        self.waiting.remove(r)
        self.fair.leave(r.tenant)
        if not r.charged:   # a preempted request is not charged its prompt again
            self.fair.charge(r.tenant, input_tokens=len(r.prompt_ids))
            r.charged = True
        if r.lora is not None:
            r.slot = self.adapters.acquire(r.lora)
        r.status, r.row = Status.RUNNING, self._free_rows.pop()
        r.context = r.prompt_ids + r.generated
        r.computed = 0
        _insert(self.running, r)

    def _chunk(self, r: Request, room: int, plan: Plan) -> int:
        """Schedule the next chunk of r's context in `room` padded tokens; returns tokens used."""
        Q, Z = self.config.piece, self.pages.page_size
        have = len(self.pages.tables.get(r, ())) + self.pages.num_free
        n = min(len(r.context) - r.computed, room // Q * Q, have * Z - r.computed)
        if n <= 0:
            return 0
        self.pages.grow(r, r.computed + n)
        last = r.computed + n == len(r.context)
        plan.prefills.append(PrefillChunk(r, r.computed, n, last))
        r.computed += n
        r.in_flight += last
        if last:
            self.fair.charge(r.tenant, output_tokens=1)
        return -(-n // Q) * Q


def _insert(queue: list[Request], r: Request) -> None:
    keys = [x.arrival for x in queue]
    queue.insert(bisect.bisect_right(keys, r.arrival), r)
