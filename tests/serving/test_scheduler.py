"""The scheduler on its own (host only, no device): chunking, buckets, admission, preemption."""

import numpy as np
import pytest

from jlora.sampling import SamplingParams
from serving.kv_cache import PageAllocator
from serving.request import Request, Status
from serving.scheduler import Scheduler, SchedulerConfig, round_up

CONFIG = SchedulerConfig(max_seqs=2, max_seq_len=64, piece=4, decode_buckets=(0, 1, 2),
                         prefill_buckets=(0, 4, 8, 16))


def request(name, n_prompt, max_tokens=8, arrival=0.0):
    return Request(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                   np.zeros(2, np.uint32), arrival=arrival)


def read_back(plan, token=7):
    """What the engine does with a step's sampled tokens."""
    for r in plan.decodes + [c.request for c in plan.prefills if c.last]:
        r.in_flight -= 1
        r.generated.append(token)


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    s = Scheduler(CONFIG, PageAllocator(32, 4))
    r = request("a", 37)
    s.add(r)
    chunks = []
    while True:
        plan = s.schedule()
        chunks += [(c.start, c.length, c.last) for c in plan.prefills]
        assert plan.prefill_bucket == round_up(sum(-(-c.length // 4) * 4
                                                   for c in plan.prefills), CONFIG.prefill_buckets)
        read_back(plan)
        if plan.decodes:
            break
    assert chunks == [(0, 16, False), (16, 16, False), (32, 5, True)]
    assert plan.decode_bucket == 1 and r.computed == 38 and len(r.generated) == 2
    assert len(s.pages.tables[r]) == 10                 # ceil(38 / 4)


def test_rows_limit_admission_and_arrival_order_is_kept():
    s = Scheduler(CONFIG, PageAllocator(32, 4))
    a, b, c = request("a", 3, arrival=1), request("b", 3, arrival=2), request("c", 3, arrival=0)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    assert [ch.request.request_id for ch in plan.prefills] == ["c", "a"]   # 2 rows
    assert b.status is Status.WAITING and plan.prefill_bucket == 8
    read_back(plan)
    s.finish(c, "stop")
    assert c.status is Status.FINISHED and s.pages.tables.get(c) is None
    plan = s.schedule()
    assert [r.request_id for r in plan.decodes] == ["a"]
    assert [ch.request.request_id for ch in plan.prefills] == ["b"]


def test_decodes_stop_at_max_tokens():
    s = Scheduler(CONFIG, PageAllocator(32, 4))
    r = request("a", 2, max_tokens=3)
    s.add(r)
    steps = 0
    while True:
        plan = s.schedule()
        if plan.empty:
            break
        read_back(plan)
        steps += 1
    assert steps == 3 and len(r.generated) == 3         # 1 from the prefill, 2 decodes


def test_out_of_pages_preempts_the_latest_arrival_which_recomputes_later():
    s = Scheduler(CONFIG, PageAllocator(5, 4))         # 4 usable pages of 4 tokens
    old, new = request("old", 7, max_tokens=20, arrival=0), request("new", 8, arrival=1)
    s.add(old)
    s.add(new)
    plan = s.schedule()                                 # both prefill: 2 pages each
    assert [c.length for c in plan.prefills] == [7, 8] and s.pages.num_free == 0
    read_back(plan)
    plan = s.schedule()              # old writes position 7 (its page has room), new needs a page
    assert plan.decodes == [old] and plan.preempted == [new]
    assert new.status is Status.WAITING and new.row is None and new not in s.pages.tables
    read_back(plan)
    s.finish(old, "stop")
    plan = s.schedule()
    assert [(c.request, c.length) for c in plan.prefills] == [(new, 9)]
    assert new.context == new.prompt_ids + [7] and new.preemptions == 1


def test_a_preempted_request_waits_for_its_tokens_in_flight():
    s = Scheduler(CONFIG, PageAllocator(5, 4))
    old, new = request("old", 7, max_tokens=20, arrival=0), request("new", 8, arrival=1)
    s.add(old)
    s.add(new)
    read_back(s.schedule())
    plan = s.schedule()
    assert plan.preempted == [new] and new.in_flight == 0
    s.finish(old, "stop")                              # pages free, but...
    new.in_flight = 1                                  # ...pretend a token is still coming back
    assert not s.schedule().prefills
    new.in_flight = 0
    assert s.schedule().prefills[0].request is new


def test_bucket_rounding():
    assert [round_up(n, (0, 4, 16)) for n in (0, 1, 4, 5, 16)] == [0, 4, 4, 16, 16]
    with pytest.raises(ValueError, match="beyond the largest bucket 16"):
        round_up(17, (0, 4, 16))
