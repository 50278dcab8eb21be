"""The decoding thread and its queue: requests in, token events out, never a lock held by a client.

One thread owns the `BatchEngine`. Between engine steps it admits waiting jobs first come, first
served into free rows (`engine.add` prefills them), drops jobs that were cancelled (the client went
away, a stop string matched) or ran past their deadline, then runs one step for every live
sequence. Each job's events go to an `asyncio.Queue` on the event loop through
`loop.call_soon_threadsafe`, so a streaming response awaits its queue and holds no worker thread.

Events a job receives, in order: `("tokens", new token ids)` any number of times, then exactly one
of `("done", GenerationResult)` or `("error", APIError)`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from plmtool.draft.decoding.batch import BatchEngine, StepOutput
from plmtool.draft.decoding.engine import GenerationConfig
from plmtool.errors import PlmtoolError
from plmtool.serve.protocol import APIError, queue_full, shutting_down, timed_out

log = logging.getLogger("plmtool")


@dataclass
class Job:
    """One sequence to decode (a request with n > 1 or several prompts is several jobs)."""

    prompt: list[int]
    gen: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    timeout_s: float = 0.0  # 0: no deadline
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the event loop; read by the decoding thread between steps
    finished: bool = False  # decoding thread only

    @property
    def expired(self) -> bool:
        return bool(self.timeout_s) and time.monotonic() - self.submitted > self.timeout_s


@dataclass
class Counters:
    """What /metrics and the report show; written by the decoding thread."""

    requests: int = 0  # jobs finished (done, not cancelled, not failed)
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    rejected: int = 0  # 429 and 503 at admission
    tokens: int = 0  # generated tokens, all jobs
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))  # (time, tokens)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        got = [n for t, n in list(self.recent) if now - t <= window_s]
        return sum(got) / window_s


class Scheduler:
    def __init__(self, engine: BatchEngine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.accepting = True
        self.abort_at: float | None = None  # after this monotonic time, live jobs are aborted
        self.stopped = False
        self.counters = Counters()
        self.error: str | None = None  # set when the engine failed (the thread goes on serving)
        self.thread = threading.Thread(target=self._run, name="plmtool-decoding", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # ------------------------------------------------------------------ event-loop side
    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs or none (429 when the queue would overflow, 503 when stopping)."""
        with self.cond:
            dead = self.thread.ident is not None and not self.thread.is_alive()
            if not self.accepting or dead:
                self.counters.rejected += 1
                raise shutting_down()
            if len(self.waiting) + len(jobs) > self.max_queue:
                self.counters.rejected += 1
                raise queue_full(self.max_queue)
            self.waiting.extend(jobs)
            self.cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        with self.cond:
            for job in jobs:
                job.cancelled = True
            self.cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.seqs)

    def shutdown(self, timeout_s: float) -> None:
        """Stop admitting (waiting jobs get 503); live jobs finish or are aborted after `timeout_s`."""
        with self.cond:
            self.accepting = False
            self.abort_at = time.monotonic() + timeout_s
            self.cond.notify()

    def stop(self, join_s: float = 5.0) -> None:
        """End the decoding thread (aborting what is left) and wait for it."""
        with self.cond:
            self.accepting = False
            self.abort_at = time.monotonic()
            self.stopped = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(join_s)

    # ------------------------------------------------------------------ decoding thread
    def _send(self, job: Job, kind: str, payload: Any) -> None:
        self._send_all([(job, kind, payload)])

    def _send_all(self, events: list[tuple[Job, str, Any]]) -> None:
        """Hand events to their jobs' event loops: one wake-up per loop, not one per event (a full
        batch step would otherwise wake the loop once per row, each a system call and a switch of
        the interpreter between the threads)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, kind, payload in events:
            if kind in ("done", "error"):
                job.finished = True
            by_loop.setdefault(job.loop, []).append((job.events, (kind, payload)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _end(self, job: Job, error: APIError | None, counter: str) -> None:
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        if error is not None:
            self._send(job, "error", error)
        job.finished = True

    def _run(self) -> None:
        if self.engine.device.type == "cuda":  # this thread's current device is the engine's
            import torch

            torch.cuda.set_device(self.engine.device)
        while True:
            try:
                if not self._iteration():
                    return
            except Exception:  # never let the thread die: nothing else would answer the requests
                log.exception("decoding thread error")

    def _iteration(self) -> bool:
        """Admit, drop, step once; False when stopped with nothing left."""
        engine = self.engine
        with self.cond:
            while not self.waiting and not engine.seqs and not self.stopped:
                self.cond.wait()
            if self.stopped and not engine.seqs and not self.waiting:
                return False
            self._sweep_waiting()
            admit = []
            while self.waiting and len(admit) < engine.free:
                admit.append(self.waiting.popleft())
            abort = self.abort_at is not None and time.monotonic() >= self.abort_at
        for job in admit:
            self._admit(job)
        live = [seq.tag for seq in engine.seqs]
        try:
            self._drop(abort)
            if engine.seqs:
                self._deliver(engine.step())
        except Exception as e:  # a device fault: fail what was live, keep serving new requests
            log.exception("decoding step failed")
            self.error = f"{type(e).__name__}: {e}"
            failure = APIError(500, f"decoding failed: {self.error}", None, "engine_error")
            for job in live:  # first the answers: resetting the engine may fail too
                if not job.finished:
                    self._end(job, failure, "failed")
            try:
                engine.clear()
            except Exception:  # a broken device: at least the rows are free for new prefills
                engine.seqs.clear()
        return True

    def _sweep_waiting(self) -> None:
        """Under the lock: waiting jobs that were cancelled, ran past their deadline, or arrive at
        a stopping server leave the queue now, not when a row frees up."""
        keep: collections.deque[Job] = collections.deque()
        for job in self.waiting:
            if job.cancelled:
                self._end(job, None, "cancelled")
            elif not self.accepting:
                self._end(job, shutting_down(), "rejected")
            elif job.expired:
                self._end(job, timed_out(job.timeout_s), "timed_out")
            else:
                keep.append(job)
        self.waiting = keep

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return self._end(job, None, "cancelled")
        if job.expired:
            return self._end(job, timed_out(job.timeout_s), "timed_out")
        try:
            first = self.engine.add(job.prompt, job.gen, tag=job)
        except PlmtoolError as e:  # checked before queueing; kept as a 400, never a dead thread
            return self._end(job, APIError(400, str(e), None, "invalid_value"), "failed")
        except Exception as e:  # a device fault in the prefill: this request fails, the others go on
            log.exception("prefill failed")
            self.error = f"{type(e).__name__}: {e}"
            return self._end(job, APIError(500, f"prefill failed: {self.error}", None, "engine_error"), "failed")
        self._deliver([first])

    def _drop(self, abort: bool) -> None:
        for seq in list(self.engine.seqs):
            job: Job = seq.tag
            if job.cancelled:
                self.engine.remove(seq)
                self._end(job, None, "cancelled")
            elif abort:
                self.engine.remove(seq)
                self._end(job, shutting_down(), "failed")
            elif job.expired:
                self.engine.remove(seq)
                self._end(job, timed_out(job.timeout_s), "timed_out")

    def _deliver(self, outputs: list[StepOutput]) -> None:
        now, total, events = time.monotonic(), 0, []
        for out in outputs:
            job: Job = out.seq.tag
            total += len(out.tokens)
            if out.tokens:
                events.append((job, "tokens", list(out.tokens)))
            if out.done:
                self.counters.requests += 1
                events.append((job, "done", out.seq.result))
        self._send_all(events)
        self.counters.tokens += total
        self.counters.recent.append((now, total))


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
