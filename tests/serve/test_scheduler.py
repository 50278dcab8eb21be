"""The decoding thread's queue: FIFO admission, 429 when full, 503 when stopping, cancellation that
frees the row, per-request deadlines."""

from __future__ import annotations

import asyncio

import pytest

from plmtool.draft.decoding.batch import BatchEngine
from plmtool.draft.decoding.engine import GenerationConfig
from plmtool.serve.protocol import APIError
from plmtool.serve.scheduler import Job, Scheduler


@pytest.fixture()
def engine(tiny_llama):
    return BatchEngine(tiny_llama, max_len=128, max_batch=2)


async def _events(job: Job, until: str) -> list:
    got = []
    while True:
        kind, payload = await asyncio.wait_for(job.events.get(), 60)
        got.append((kind, payload))
        if kind in ("done", "error") or kind == until:
            return got


def test_queue_limit_and_stopping(engine):
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(engine, max_queue=2)  # not started: jobs stay queued
        s.submit([Job([5, 6], GenerationConfig(max_new_tokens=3), loop) for _ in range(2)])
        with pytest.raises(APIError) as full:
            s.submit([Job([5], GenerationConfig(max_new_tokens=3), loop)])
        assert full.value.status == 429 and s.counters.rejected == 1
        s.shutdown(0)
        with pytest.raises(APIError) as stopping:
            s.submit([Job([5], GenerationConfig(max_new_tokens=3), loop)])
        assert stopping.value.status == 503

    asyncio.run(main())


def test_fifo_admission_cancellation_and_deadline(engine):
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(engine, max_queue=8)
        long = [Job([5 + i, 6], GenerationConfig(max_new_tokens=100), loop) for i in range(2)]
        late = Job([9, 9], GenerationConfig(max_new_tokens=4), loop)
        expired = Job([7, 7], GenerationConfig(max_new_tokens=100), loop, timeout_s=1e-9)
        s.submit(long + [late, expired])
        s.start()
        await _events(long[0], "tokens")
        await _events(long[1], "tokens")
        # two rows: the first two in; the expired job left the queue at once, the other waits its turn
        assert s.running == 2 and s.queue_length == 1
        s.cancel(long)  # clients gone: their rows free up for the waiting ones
        events = await _events(late, "done")
        assert events[-1][0] == "done" and sum(len(p) for k, p in events if k == "tokens") == 4
        kind, err = (await _events(expired, "error"))[-1]
        assert kind == "error" and err.status == 504
        s.stop()
        assert s.counters.cancelled == 2 and s.counters.timed_out == 1 and s.counters.requests == 1
        assert not engine.seqs

    asyncio.run(main())


def test_an_engine_fault_fails_its_requests_and_the_thread_serves_on(engine, monkeypatch):
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(engine, max_queue=8)
        s.start()
        add = engine.add

        def broken_add(prompt, gen, tag=None):
            if prompt == [13, 13]:
                raise RuntimeError("device fault")
            return add(prompt, gen, tag=tag)

        monkeypatch.setattr(engine, "add", broken_add)
        bad, good = Job([13, 13], GenerationConfig(max_new_tokens=3), loop), Job([5, 6], GenerationConfig(max_new_tokens=3), loop)
        s.submit([bad, good])
        kind, err = (await _events(bad, "error"))[-1]
        assert kind == "error" and err.status == 500 and "device fault" in err.message
        assert (await _events(good, "done"))[-1][0] == "done"
        s.stop()
        assert s.counters.failed == 1 and s.counters.requests == 1 and "device fault" in s.error

    asyncio.run(main())


def test_waiting_jobs_leave_the_queue_when_cancelled_or_expired(engine, monkeypatch):
    import time

    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # rows stay busy for seconds

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(engine, max_queue=2)
        s.start()
        busy = [Job([5 + i, 6], GenerationConfig(max_new_tokens=110), loop) for i in range(2)]
        s.submit(busy)
        for job in busy:
            await _events(job, "tokens")
        queued = [Job([9, 9], GenerationConfig(max_new_tokens=3), loop) for _ in range(2)]
        s.submit(queued)
        s.cancel(queued)  # their clients left: the queue has room again before any row frees up
        expiring = Job([8, 8], GenerationConfig(max_new_tokens=3), loop, timeout_s=0.2)
        for _ in range(200):
            try:
                s.submit([expiring])
                break
            except APIError:
                await asyncio.sleep(0.01)
        kind, err = (await _events(expiring, "error"))[-1]
        assert kind == "error" and err.status == 504
        assert not any(j.finished for j in busy)  # answered while both rows were still busy
        s.stop()
        assert s.counters.cancelled >= 2

    asyncio.run(main())


def test_a_failed_step_answers_every_live_request_even_if_cleanup_fails(engine, monkeypatch):
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(engine, max_queue=8)
        step, calls = engine.step, []

        def failing_step():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("illegal memory access")
            return step()

        monkeypatch.setattr(engine, "step", failing_step)
        monkeypatch.setattr(engine, "clear", lambda: (_ for _ in ()).throw(RuntimeError("still broken")))
        jobs = [Job([5 + i, 6], GenerationConfig(max_new_tokens=50), loop) for i in range(2)]
        s.submit(jobs)
        s.start()
        for job in jobs:
            kind, err = (await _events(job, "error"))[-1]
            assert kind == "error" and err.status == 500
        after = Job([7, 7], GenerationConfig(max_new_tokens=3), loop)
        s.submit([after])  # the thread lives on
        assert (await _events(after, "done"))[-1][0] == "done"
        s.stop()

    asyncio.run(main())
