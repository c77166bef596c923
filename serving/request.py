"""A request's host-side life: its state in the engine and the stream its caller reads.

`Request` is what the scheduler and engine track (tokens, pages' worth of progress, status);
`RequestStream` is what `Engine.submit` returns: iterate it (plainly or with `async for`) to
receive `RequestOutput`s as tokens are produced, the last one with `finished=True`. The
engine thread pushes outputs; any thread or event loop may read them. No jax here.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from dataclasses import dataclass, field

import numpy as np

from jlora.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"        # queued, or preempted and waiting to be recomputed
    RUNNING = "running"        # holds a row and pages: prefilling or decoding
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")


@dataclass
class RequestOutput:
    """One streamed update: the tokens (and their text) produced since the last one."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finished: bool = False
    finish_reason: str | None = None   # one of FINISH_REASONS when finished
    error: str | None = None           # what went wrong, when finish_reason is "error"
    timings: dict | None = None        # on the last output: engine-clock times and counts


@dataclass(eq=False)
class Request:
    """Engine-side state. Positions 0..computed-1 of `context` have K/V in the cache (or in a
    step already dispatched); generated tokens are appended when read back from the device."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    key: np.ndarray                    # PRNG key data from the seed; token n uses fold_in(n)
    slot: int = 0                      # adapter slot in the bank (0: base model), set
    adapter: str | None = None         # at each admission
    lora: object = None                # its serving.adapter_cache.Entry (None: base model)
    tenant: str = ""                   # whose service it counts as (fairness, metrics)
    charged: bool = False              # its prompt was charged to the tenant
    deadline: float | None = None      # engine clock time after which it stops
    arrival: float = 0.0
    status: Status = Status.WAITING
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    context: list[int] = field(default_factory=list)  # what prefill computes (prompt, or
    computed: int = 0                                  # prompt + generated after preemption)
    in_flight: int = 0                 # tokens sampled by dispatched steps, not yet read back
    row: int | None = None             # device row of its last token while RUNNING
    finish_reason: str | None = None
    cancel_requested: bool = False
    preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    text_sent: int = 0                 # characters of decoded text already streamed
    decoder: object = None             # jlora.tokenizer.IncrementalDecoder, with a tokenizer
    finish_time: float | None = None
    stream: RequestStream | None = None

    @property
    def num_sampled(self) -> int:
        """Tokens generated so far, counting those still on their way back."""
        return len(self.generated) + self.in_flight

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.context)


class RequestStream:
    """The caller's view of one request: iterate for `RequestOutput`s, or call `result()`."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._outputs: list[RequestOutput] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- engine side
    def put(self, output: RequestOutput) -> None:
        with self._cond:
            self._outputs.append(output)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:   # that reader's event loop has closed: no one to wake
                pass

    # -- caller side
    @property
    def finished(self) -> bool:
        with self._cond:
            return bool(self._outputs) and self._outputs[-1].finished

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._outputs) > i)
                batch = self._outputs[i:]
            for out in batch:
                yield out
                if out.finished:
                    return
            i += len(batch)

    async def __aiter__(self):
        i = 0
        while True:
            with self._cond:
                batch = self._outputs[i:]
                if not batch:
                    waiter = (asyncio.get_running_loop(), asyncio.Event())
                    self._waiters.append(waiter)
            if not batch:
                try:
                    await waiter[1].wait()
                finally:   # woken, or the reader gave up (its task cancelled)
                    with self._cond:
                        if waiter in self._waiters:
                            self._waiters.remove(waiter)
                continue
            for out in batch:
                yield out
                if out.finished:
                    return
            i += len(batch)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until finished; all tokens, text and logprobs in one output."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._outputs and self._outputs[-1].finished,
                                       timeout):
                raise TimeoutError(f"request {self.request_id!r} not finished in {timeout} s")
            outs = list(self._outputs)
        return RequestOutput(self.request_id, [t for o in outs for t in o.token_ids],
                             "".join(o.text for o in outs),
                             [lp for o in outs for lp in o.logprobs], True,
                             outs[-1].finish_reason, outs[-1].error, outs[-1].timings)
