"""The serving engine: owns the devices and runs one jitted step per iteration.

Each iteration: take in new requests and cancellations, expire deadlines, let the
scheduler plan the step, build the step's one batch pytree (`make_batch`), dispatch the
step program compiled for its bucket, and only then read back the previous step's tokens
(detokenize, check stops, stream). Decode tokens never round-trip through the host: the step
reads each sequence's last token from a device array that the previous step wrote, so the
device always has the next step queued while Python works on the last one.

Programs are compiled for every (decode, prefill) bucket at start-up; serving never compiles.
Adapters (`engine.adapters`, serving/adapter_store.py) are registered by name, many more than
the bank has GPU slots; a loader thread brings them to a slot when a request needs one, and
each step only dispatches the finished loads' in-place writes. Admission order is the
fairness policy's (VTC per tenant, or FCFS).
The engine knows nothing about gRPC; requests arrive through `submit` from any thread.
Bad input is refused at `submit`; should a step still fail (a bug, a device error), every
request then in the engine ends with "error" and the loop goes on; `close()` ends those left
with "cancelled". No stream is left waiting.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapters import GROUPS
from jlora.generate import Prompt, encode_prompt
from jlora.loader import Model
from jlora.paged import init_pages
from jlora.sampling import SamplingParams, seed_key
from jlora.tokenizer import IncrementalDecoder
from pallas_kernels import default_impl
from pallas_kernels.lora import POOL_SLACK_ROWS, LoraBlocks, fused_fits
from serving import sharding
from serving.adapter_cache import AdapterCache, UnknownAdapter
from serving.adapter_store import HOST_MEMORY, AdapterStore, make_bank
from serving.fairness import FairShare
from serving.kv_cache import PageAllocator
from serving.metrics import EngineMetrics
from serving.request import Request, RequestOutput, RequestStream, Status
from serving.scheduler import Plan, Scheduler, SchedulerConfig
from serving.step import StepBatch, engine_step, make_batch, pack

log = logging.getLogger(__name__)

LORA_KERNELS = ("split", "fused", "gemm")


class QueueFull(Exception):
    """The engine's queue is at its limit; the request was not accepted."""


class DuplicateRequest(ValueError):
    """A request of that id is still in the engine."""


@dataclass(frozen=True)
class EngineConfig:
    max_seqs: int = 64            # sequences running at once (decode rows)
    page_size: int = 16           # Z: tokens per KV page
    num_pages: int = 0            # P; 0: enough for max_seqs full-length sequences, within
                                  # kv_memory_gb (0: 90% of the free device memory, 2 GB on CPU)
    kv_memory_gb: float = 0.0
    max_seq_len: int = 0          # 0: the model's
    prefill_budget: int = 256     # padded prefill tokens per step
    piece: int = 16               # Q: prefill tokens per attention block
    max_queue: int = 1024         # waiting requests before submit refuses
    # Step shapes compiled at start-up: every (decode count, padded prefill tokens) pair but
    # (0, 0). Counts are rounded up to the next bucket.
    decode_buckets: tuple[int, ...] = ()   # (): 0, 1, 4, 16, ... and max_seqs
    prefill_buckets: tuple[int, ...] = ()  # (): 0, Q, 4Q, 16Q, ... and the budget
    impl: str | None = None       # "pallas" or "xla"; None: Pallas on a GPU
    lora_kernel: str = "gemm"     # Pallas LoRA on the step's tokens: "split" (shrink, then
                                  # expand), "fused" (both in one launch; ranks <= 64) or
                                  # "gemm" (shrink, then the base matmul in Pallas with the
                                  # expand in the same launch, on lora_blocks.gemm_groups:
                                  # q/k/v and down; steps of <= 32 tokens, larger ones and
                                  # prefill take "split")
    lora_blocks: LoraBlocks = LoraBlocks()  # the Pallas LoRA kernels' tiling (per GPU tuning)
    tp: int = 1                   # devices the model is split over (serving/sharding.py)
    # Adapters: GPU slots in the bank (0: the bank the model was given by load_adapter, if
    # any, else as many as lora_memory_gb holds, else none: base model only), host tier
    max_loras: int = 0
    max_lora_rank: int = 64
    lora_memory_gb: float = 0.0
    lora_slot_ranks: tuple[int, ...] = ()   # each slot's rank capacity, instead of max_loras
                                            # slots of max_lora_rank: small ones cost less
    host_lora_gb: float = 8.0     # host memory for adapters off the GPU (LRU by bytes)
    host_lora_memory: str = "pinned"   # where the host tier keeps slot-ready rows: "pinned"
                                  # (page-locked: a load's copy is a DMA) or "pageable"
    adapter_dir: str = ""         # register every adapter directory in it at start-up
    policy: str = "vtc"           # admission order: "vtc" (fair per tenant) or "fcfs"
    tenant_weights: tuple[tuple[str, float], ...] = ()   # VTC weights, default 1
    # start() collects garbage and freezes the heap built so far (compiled programs, adapters
    # registered at start-up: hundreds of thousands of objects) out of Python's cyclic GC,
    # whose full collections otherwise stall both threads for 100+ ms. Process-wide, so off
    # unless the engine owns the process (`jlora serve` turns it on).
    freeze_gc: bool = False

    def scheduler_config(self, max_seq_len: int) -> SchedulerConfig:
        def pow2s(lo, hi):  # lo, 4 lo, 16 lo, ... below hi: padding rows cost little on a
            # memory-bound GPU step, and every bucket is two programs to compile
            return tuple(itertools.takewhile(lambda n: n < hi, (lo << 2 * i for i in range(32))))
        decode = self.decode_buckets or (0, *pow2s(1, self.max_seqs), self.max_seqs)
        prefill = self.prefill_buckets or (0, *pow2s(self.piece, self.prefill_budget),
                                           self.prefill_budget)
        for name, b in (("decode_buckets", decode), ("prefill_buckets", prefill)):
            if not b or list(b) != sorted(set(b)) or b[0] < 0:
                raise ValueError(f"{name}={b} must be ascending, distinct and >= 0")
        if decode[-1] < self.max_seqs:
            raise ValueError(f"decode_buckets={decode} must reach max_seqs={self.max_seqs}")
        if self.piece < 1 or self.piece & (self.piece - 1):
            raise ValueError(f"piece={self.piece} must be a power of two")
        if any(n % self.piece for n in prefill):
            raise ValueError(f"prefill_buckets={prefill} must be multiples of piece="
                             f"{self.piece}")
        return SchedulerConfig(self.max_seqs, max_seq_len, self.piece, tuple(decode),
                               tuple(prefill))


class Engine:
    """Continuous batching over a paged KV cache for one model (and its adapter bank).

    Drive it from one thread with `step()` (tests, benchmarks) or `start()` a background
    loop; `submit`, `cancel` and the returned streams are safe from any thread.
    """

    def __init__(self, model: Model, config: EngineConfig = EngineConfig(), clock=time.monotonic,
                 devices=None):
        self.model, self.config, self.clock = model, config, clock
        self.mesh = sharding.make_mesh(config.tp, devices) if config.tp > 1 else None
        self.bank = make_bank(model, config)
        if self.mesh is not None:
            self._shard_model()
        cfg = model.config
        self.impl = config.impl or default_impl()
        if config.lora_kernel not in LORA_KERNELS:
            raise ValueError(f"lora_kernel={config.lora_kernel!r} is not one of {LORA_KERNELS}")
        if config.host_lora_memory not in HOST_MEMORY:
            raise ValueError(f"host_lora_memory={config.host_lora_memory!r} is not one of "
                             f"{HOST_MEMORY}")
        if not isinstance(config.lora_blocks, LoraBlocks):
            raise ValueError(f"lora_blocks must be a LoraBlocks, got {config.lora_blocks!r}")
        unknown = set(config.lora_blocks.gemm_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"lora_blocks.gemm_groups names {sorted(unknown)}; the projection "
                             f"groups are {tuple(GROUPS)}")
        self.lora_blocks = replace(config.lora_blocks, fused_tokens=config.lora_kernel == "fused",
                                   gemm=config.lora_kernel == "gemm")
        if self.lora_blocks.fused_tokens and self.bank is not None and \
                not fused_fits(self.bank.max_rank, self.lora_blocks):
            raise ValueError(f"lora_kernel='fused' serves ranks up to {POOL_SLACK_ROWS}; this "
                             f"bank's slots hold rank {self.bank.max_rank} (lower "
                             f"max_lora_rank, or use lora_kernel='split')")
        max_len = min(config.max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.sched_config = config.scheduler_config(max_len)
        num_pages = config.num_pages or self._default_pages(max_len)   # after the bank
        self.pages = PageAllocator(num_pages, config.page_size)
        self.adapters, cache = None, None
        if self.bank is not None:
            cache = AdapterCache(self.bank.n_slots - 1, int(config.host_lora_gb * 1e9),
                                 self.bank.slot_ranks[1:])
            self.adapters = AdapterStore(self.bank, model.params, cache,
                                         config.host_lora_memory)
            if model.bank is not None:
                self.adapters.adopt(model.bank)
            if config.adapter_dir:
                self.adapters.scan(config.adapter_dir)
        self.scheduler = Scheduler(self.sched_config, self.pages, cache,
                                   FairShare(config.policy, dict(config.tenant_weights)))
        self.metrics = EngineMetrics(extra=self._adapter_metrics)
        self.kv = init_pages(cfg, num_pages, config.page_size, model.dtype)
        self.last_tokens = jnp.zeros(config.max_seqs, jnp.int32)
        if self.mesh is not None:
            self.kv = sharding.put(self.kv, sharding.kv_specs(self.kv), self.mesh)
            self.last_tokens = sharding.put(self.last_tokens, sharding.P(), self.mesh)
        self.programs = self._compile()
        self._inbox: list = []
        self._lock = threading.Condition()
        self._requests: dict[str, Request] = {}
        self._pending = None          # the dispatched step not yet read back
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stalled = False         # the last step had nothing to run: all waiting is on loads
        if self.adapters is not None:   # (or pages); a finished load wakes the loop
            wake = weakref.WeakMethod(self._wake)   # the store must not keep the engine alive
            self.adapters.on_done = lambda: (f := wake()) is not None and f()
            self.adapters.start()

    def close(self) -> None:
        """Stop the background loop and the adapter loader thread; requests still in the
        engine end with "cancelled"."""
        self.stop()
        self._end_all("cancelled")
        if self.adapters is not None:
            self.adapters.stop()

    def _default_pages(self, max_len: int) -> int:
        cfg, c = self.model.config, self.config
        wanted = c.max_seqs * -(-max_len // c.page_size) + 1
        page_bytes = (2 * cfg.n_layers * cfg.n_kv_heads * c.page_size * cfg.head_dim
                      * jnp.dtype(self.model.dtype).itemsize)
        budget = c.kv_memory_gb * 1e9
        if not budget:
            stats = jax.devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            budget = 0.9 * free * (c.tp or 1) if free > 0 else 2e9
        return max(2, min(wanted, int(budget // page_bytes)))

    def _shard_model(self) -> None:
        """Take over the model: its params re-laid out for the mesh and split across it."""
        m, mesh = self.model, self.mesh
        params, m.config = sharding.relayout(m.params, m.config, self.config.tp)
        m.params = sharding.put(params, sharding.param_specs(params), mesh)
        for bank in {id(b): b for b in (m.bank, self.bank) if b is not None}.values():
            bank.cfg = m.config
            bank.arrays = sharding.put(bank.arrays, sharding.bank_specs(bank.arrays), mesh)

    # ---------------------------------------------------------------- compilation
    def _compile(self) -> dict:
        """One executable per (decode, prefill) bucket pair and sampler mode, compiled now."""
        sc, cfg = self.sched_config, self.model.config
        if self.adapters is not None:
            self.adapters.warm_up()
        bank = self._bank_arrays()
        programs = {}
        for Bd in sc.decode_buckets:
            for Np in sc.prefill_buckets:
                if Bd == Np == 0:
                    continue
                batch, _ = make_batch(Plan(decode_bucket=Bd, prefill_bucket=Np), sc, self.pages)
                packed, layout = pack(batch)
                for mode in ("greedy", "sample"):
                    program = engine_step.lower(
                        self.model.params, bank, self.kv, self.last_tokens, packed, cfg=cfg,
                        impl=self.impl, mesh=self.mesh, layout=layout, mode=mode,
                        lora_blocks=self.lora_blocks).compile()
                    # and run once on the empty batch: a GPU program's first run loads its
                    # kernels and records its CUDA graphs (tens of ms, paid now rather than
                    # by the first request of each shape). No request holds a page yet, so
                    # what the padding writes there is never read.
                    self.kv, self.last_tokens, out = program(
                        self.model.params, bank, self.kv, self.last_tokens, packed)
                    programs[Bd, Np, mode] = program
        jax.block_until_ready(out)
        return programs

    # ---------------------------------------------------------------- requests
    def submit(self, prompt: Prompt, params: SamplingParams = SamplingParams(), *,
               adapter: str | None = None, tenant: str | None = None,
               request_id: str | None = None, timeout: float | None = None,
               chat: bool = True) -> RequestStream:
        """Queue a request; returns its stream. Raises ValueError for bad input (naming the
        value), UnknownAdapter (a ValueError) for an adapter not registered, and QueueFull
        when max_queue requests are waiting. `tenant` (default: the adapter's name, "" for
        the base model) is whom the fairness policy and the metrics count it for."""
        model, limit = self.model, self.sched_config.max_seq_len
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt, str):
            prompt = list(prompt)   # once: a generator would be empty the second time
        if not prompt:
            raise ValueError("the prompt is empty")
        ids = encode_prompt(model, prompt, chat)
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} "
                             f"exceeds the context of {limit} tokens")
        pages = self.pages.pages_for(len(ids) + params.max_tokens)
        if pages > self.pages.capacity:   # it could never run to the end, even alone
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} needs {pages} "
                f"KV pages of {self.pages.page_size} tokens; the cache holds "
                f"{self.pages.capacity} (num_pages={self.pages.num_pages}, one reserved)")
        if params.stop and model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if adapter and self.adapters is None:
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded; this engine serves the "
                                 "base model only (max_loras=0)")
        tenant = (adapter or "") if tenant is None else tenant
        if not isinstance(tenant, str) or len(tenant) > 200:
            raise ValueError(f"tenant {tenant!r} must be a string of at most 200 characters")
        if timeout is not None and (isinstance(timeout, bool) or not (
                isinstance(timeout, (int, float)) and timeout > 0)):
            raise ValueError(f"timeout={timeout!r} must be a number of seconds > 0")
        if request_id is not None and not (isinstance(request_id, str) and request_id):
            raise ValueError(f"request_id={request_id!r} must be a non-empty string")
        with self._lock:
            if request_id is None:   # the next generated id no caller has taken
                request_id = next(i for i in (f"req-{n}" for n in self._ids)
                                  if i not in self._requests)
            if request_id in self._requests:
                raise DuplicateRequest(f"request id {request_id!r} is already in use")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting")
            entry = self.adapters.cache.bind(adapter) if adapter else None
            now = self.clock()
            r = Request(request_id, ids, params, seed_key(params.seed), lora=entry,
                        tenant=tenant, adapter=adapter or None, arrival=now,
                        deadline=None if timeout is None else now + timeout,
                        stream=RequestStream(request_id))
            r.decoder = IncrementalDecoder(model.tokenizer) if model.tokenizer else None
            self._requests[request_id] = r
            self._inbox.append(r)
            self._lock.notify_all()
        return r.stream

    def cancel(self, request_id: str) -> bool:
        """Stop a request at the next step (its stream ends with "cancelled")."""
        with self._lock:
            r = self._requests.get(request_id)
            if r is None:
                return False
            r.cancel_requested = True
            self._lock.notify_all()
            return True

    # ---------------------------------------------------------------- the loop
    def step(self) -> bool:
        """Plan and dispatch one step, then read back the previous one. Returns whether
        any work is left (queued, running or in flight)."""
        t0 = time.perf_counter()
        if self.adapters is not None and self.adapters.needs_commit():
            self._commit_adapters()
        with self._lock:
            for r in self._inbox:
                self.scheduler.add(r)
                if r.lora is not None:   # prefetch: start its load now if a slot is idle
                    self.adapters.cache.want(r.lora, evict_wanted=False)
            self._inbox.clear()
        self._expire()
        plan = self.scheduler.schedule()
        batch, samples = make_batch(plan, self.sched_config, self.pages)
        t1 = time.perf_counter()
        pending = self._dispatch(plan, batch, samples) if not plan.empty else None
        t2 = time.perf_counter()
        wait = 0.0
        if self._pending is not None:
            wait = self._read_back(*self._pending)
        self._stalled = pending is None and self._pending is None
        self._pending = pending
        self._update_gauges(plan)
        with self.metrics.lock:   # where the host's time goes, per step
            self.metrics.host_phases.append((t1 - t0, t2 - t1, wait,
                                             time.perf_counter() - t2 - wait))
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending
                    or self._inbox)

    def run_until_idle(self) -> None:
        while self.step():
            self._idle(busy=True, timeout=0.01)

    def _idle(self, busy: bool, timeout: float) -> None:
        """Wait (up to timeout) for something to do if the last step found nothing it could
        run. A loop that spun instead would hold the GIL the loader thread needs to finish
        the very loads the waiting requests wait for (the first load after an idle spell
        took ~100 ms on an H200 this way, against ~15)."""
        with self._lock:
            if (not self._stop and not self._inbox and (not busy or self._stalled)
                    and not (self.adapters is not None and self.adapters.pending())):
                self._lock.wait(timeout)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _bank_arrays(self):
        return self.bank.arrays if self.bank is not None else None

    def _commit_adapters(self) -> None:
        """Dispatch the finished adapter loads' slot writes; a failed load ends the requests
        waiting for it (running ones never wait for a load)."""
        holders = {r.slot: r.lora for r in self.scheduler.running if r.lora is not None}
        with self.adapters.cache.lock:
            before = {e.slot: e for e in self.adapters.cache.slots.values() if not e.on_gpu}
        failed = self.adapters.commit()
        for slot, entry in before.items():   # a slot being written is no running request's
            assert holders.get(slot, entry) is entry, f"slot {slot} overwritten while in use"
        if before and self.mesh is not None:   # keep the layout the programs were built for
            self.bank.arrays = sharding.put(self.bank.arrays,
                                            sharding.bank_specs(self.bank.arrays), self.mesh)
        for entry, error in failed:
            for r in [r for r in self.scheduler.waiting if r.lora is entry]:
                self._finish(r, "error", error=error)

    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        """The tenant's VTC weight (default 1): its share of service is proportional to it."""
        self.scheduler.fair.set_weight(tenant, weight)

    def _dispatch(self, plan: Plan, batch: StepBatch, samples: list):
        bank = self._bank_arrays()
        greedy = all(r is None or r.params.temperature == 0 for r in samples)
        program = self.programs[plan.decode_bucket, plan.prefill_bucket,
                                "greedy" if greedy else "sample"]
        self.kv, self.last_tokens, out = program(
            self.model.params, bank, self.kv, self.last_tokens, pack(batch)[0])
        out.copy_to_host_async()          # lands while the host prepares the next step
        return samples, out

    def _read_back(self, samples: list, out) -> float:
        """Take in a step's tokens; returns the seconds spent waiting for them."""
        t = time.perf_counter()
        out = np.asarray(out)                                             # [2, Ns]
        wait = time.perf_counter() - t
        tokens, logprobs = out[0], out[1].view(np.float32)
        now = self.clock()
        new: dict[Request, list] = {}
        for i, r in enumerate(samples):
            if r is None:
                continue
            r.in_flight -= 1
            if r.status is not Status.FINISHED:
                new.setdefault(r, []).append((int(tokens[i]), float(logprobs[i])))
        for r, items in new.items():
            self._accept(r, items, now)
        with self.metrics.lock:
            self.metrics.steps += 1
        return wait

    def _accept(self, r: Request, items: list, now: float) -> None:
        """Append a request's new tokens, check its stops, stream the update."""
        m, ids, lps, reason = self.metrics, [], [], None
        for token, logprob in items:
            with m.lock:
                tenant = m.tenant(r.tenant)
                if r.first_token_time is None:
                    r.first_token_time = now
                    m.ttft.append(now - r.arrival)
                    m.prompt_tokens += len(r.prompt_ids)
                    tenant["prompt_tokens"] += len(r.prompt_ids)
                else:
                    m.itl.append(now - r.last_token_time)
                m.generation_tokens += 1
                tenant["generation_tokens"] += 1
            r.last_token_time = now
            r.generated.append(token)
            r.logprobs.append(logprob)
            ids.append(token)
            lps.append(logprob)
            try:
                if r.decoder is not None:
                    r.decoder.push(token)
            except Exception as e:  # a decode error ends this request only
                return self._finish(r, "error", ids, lps, f"detokenization failed: {e}")
            reason = self._stop_reason(r, token)
            if reason is not None:
                break
        self._emit(r, ids, lps, reason)

    def _stop_reason(self, r: Request, token: int) -> str | None:
        p = r.params
        if token in p.stop_token_ids or (not p.ignore_eos
                                        and token in self.model.config.eos_token_ids):
            return "stop"
        if p.stop and any(s in r.decoder.text[max(0, r.text_sent - len(s)):] for s in p.stop):
            return "stop"
        if len(r.generated) >= p.max_tokens or \
                len(r.prompt_ids) + len(r.generated) >= self.sched_config.max_seq_len:
            return "length"
        return None

    def _emit(self, r: Request, ids: list, lps: list, reason: str | None) -> None:
        """Stream new text; while running, hold back text that could start a stop string."""
        if reason is not None:
            return self._finish(r, reason, ids, lps)
        r.stream.put(RequestOutput(r.request_id, ids, self._new_text(r, final=False), lps))

    def _new_text(self, r: Request, final: bool) -> str:
        """The decoded text not yet streamed, cut before any stop string; unless final, less
        the tail that could be the start of one."""
        text = r.decoder.text if r.decoder is not None else ""
        hits = [i for i in (text.find(s) for s in r.params.stop) if i >= 0]
        if hits:
            text = text[:min(hits)]
        end = len(text)
        if not final and r.params.stop:
            end = max(r.text_sent, end - max(map(len, r.params.stop)) + 1)
        delta, r.text_sent = text[r.text_sent:end], max(r.text_sent, end)
        return delta

    def _finish(self, r: Request, reason: str, ids=(), lps=(),
                error: str | None = None) -> None:
        """End a request for any reason: its resources freed, its last output (with the text
        held back so far) streamed."""
        if r.decoder is not None:
            try:
                r.decoder.flush()
            except Exception:  # noqa: BLE001 (a decode error: the text so far stands)
                pass
        text = self._new_text(r, final=True)
        self.scheduler.finish(r, reason)
        now = self.clock()
        r.finish_time = now
        with self.metrics.lock:
            self.metrics.finished[reason] += 1
            self.metrics.e2e.append(now - r.arrival)
            self.metrics.tenant(r.tenant)["requests"] += 1
        with self._lock:
            self._requests.pop(r.request_id, None)
        timings = dict(arrival=r.arrival, first_token=r.first_token_time, finished=now,
                       prompt_tokens=len(r.prompt_ids), generated_tokens=len(r.generated),
                       preemptions=r.preemptions)
        r.stream.put(RequestOutput(r.request_id, list(ids), text, list(lps), True, reason,
                                   error, timings))

    def _expire(self) -> None:
        now = self.clock()
        for r in [*self.scheduler.running, *self.scheduler.waiting]:
            if r.cancel_requested:
                self._finish(r, "cancelled")
            elif r.deadline is not None and now >= r.deadline:
                self._finish(r, "deadline")

    def _adapter_metrics(self) -> dict:
        """Adapter residency and LoRA request gauges, for `metrics.snapshot()` (any thread)."""
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        out = dict(max_loras=self.bank.n_slots - 1 if self.bank is not None else 0,
                   running_adapters=sorted({r.adapter for r in running if r.adapter}),
                   waiting_adapters=sorted({r.adapter for r in waiting if r.adapter}),
                   adapters={})
        if self.adapters is not None:
            out.update(self.adapters.metrics())
        return out

    def _update_gauges(self, plan: Plan) -> None:
        with self.metrics.lock:
            self.metrics.num_waiting = len(self.scheduler.waiting) + len(self._inbox)
            self.metrics.num_running = len(self.scheduler.running)
            self.metrics.kv_usage = self.pages.usage
            self.metrics.preemptions += len(plan.preempted)

    # ---------------------------------------------------------------- background loop
    def start(self) -> None:
        """Run the loop in a background thread until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stop = False
        if self.config.freeze_gc:
            gc.collect()
            gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="jlora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                busy = self.step()
            except Exception as e:  # a bug or a device error: end every request, go on
                log.exception("engine step failed; ending every request in the engine")
                self._end_all("error", f"engine step failed: {type(e).__name__}: {e}")
                busy = False
            self._idle(busy, timeout=0.05)
            if self._stop:
                return

    def _end_all(self, reason: str, error: str | None = None) -> None:
        """Finish every request the engine holds (queued, waiting, running) with `reason`;
        a step in flight is dropped."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        self._pending = None
        for r in [*inbox, *self.scheduler.running, *self.scheduler.waiting]:
            if r.status is not Status.FINISHED:
                self._finish(r, reason, error=error)

    # ---------------------------------------------------------------- offline helper
    def generate(self, prompts: Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 adapters: Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Submit all prompts, run the loop here until they finish; their final outputs."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        if not len(params) == len(adapters) == len(prompts):
            raise ValueError(f"{len(prompts)} prompts, {len(params)} sampling params and "
                             f"{len(adapters)} adapters: give one of each per prompt")
        streams = [self.submit(p, sp, adapter=a) for p, sp, a in zip(prompts, params, adapters)]
        if self._thread is None:
            self.run_until_idle()
        return [s.result() for s in streams]
