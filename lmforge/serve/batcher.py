"""Continuous batching for the server: one engine per model, stepped by a thread of its own.

The engine is not thread-safe and its `step()` is blocking work, so it lives on one background thread per model
and the asyncio event loop never touches it. The two sides meet in two places:

- **In:** a request handler calls `submit(sequences)` (from the event loop); the sequences wait in an inbox
  that the stepping thread moves into the engine between two steps. `cancel(submission)` (a client that went
  away, a timeout) is queued the same way and becomes `engine.abort`. So requests join and leave the running
  batch between steps, and the batch never waits for its slowest member (Orca's iteration-level scheduling,
  vLLM's continuous batching).
- **Out:** after each step the thread hands every delta to its request's `asyncio.Queue` through
  `loop.call_soon_threadsafe`, one call per step for all requests, so the loop wakes once per step.

Admission is bounded: at most `max_batch_size` sequences run and at most `max_queue` more wait; a submission
that would exceed that raises `QueueFull` (the server's 429) instead of growing an unbounded backlog whose
requests would all time out. A sequence is one sample: a request with n = 4 takes four.

Worked example: batch 4, queue 2. Five one-sample requests arrive together: four run, one waits; a sixth
waits too; a seventh is refused. When any running request finishes, the waiting one takes its slot at the
next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmforge.infer.engine import Delta, Engine
from lmforge.infer.sampling import SamplingParams


class QueueFull(Exception):
    """More sequences than the running batch and the queue can hold."""


class EngineFailure(Exception):
    """The engine raised while stepping; every request it was running gets this instead of a delta."""


@dataclass(eq=False)
class Submission:
    """One HTTP request's sequences (prompt ids, params), and the queue their deltas arrive on as
    `(index, Delta)`, index being the sequence's position in `sequences`, or `(index, EngineFailure)`."""

    sequences: list[tuple[list[int], SamplingParams]]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    engine_ids: dict[int, int] = field(default_factory=dict)  # engine request id -> index, while unfinished
    cancelled: bool = False


class Batcher:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.steps = 0  # engine steps taken: stops growing when nothing runs (the disconnect test reads it)
        self.active = 0  # sequences in the running batch, as of the last step
        self._unfinished = 0  # sequences submitted and not yet finished or aborted: running + waiting
        self._inbox: list[Submission] = []
        self._cancels: list[Submission] = []
        self._owners: dict[int, Submission] = {}  # engine request id -> its submission
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)

    @property
    def capacity(self) -> int:
        return self.engine.max_batch_size + self.max_queue

    @property
    def queued(self) -> int:
        return max(0, self._unfinished - self.active)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the event loop's side ----------------------------------------------------------------------------

    def submit(self, sequences: Sequence[tuple[list[int], SamplingParams]]) -> Submission:
        """Queue sequences for the engine; their deltas arrive on the returned submission's queue. Call from the
        event loop. Raises QueueFull when the running batch and the queue are both full."""
        submission = Submission(list(sequences), asyncio.get_running_loop())
        with self._lock:
            if self._unfinished + len(sequences) > self.capacity:
                raise QueueFull(f"the server is busy: {self._unfinished} sequences running or queued, room for "
                                f"{self.capacity} ({self.engine.max_batch_size} running + {self.max_queue} queued)")
            self._unfinished += len(sequences)
            self._inbox.append(submission)
            self._wake.notify()
        return submission

    def cancel(self, submission: Submission) -> None:
        """Abort whatever of `submission` is still unfinished (its client left, or it timed out). Idempotent."""
        with self._lock:
            if submission.cancelled:
                return
            submission.cancelled = True
            self._cancels.append(submission)
            self._wake.notify()

    # -- the stepping thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or self.engine.has_unfinished() or self._stopped):
                    self._wake.wait()
                if self._stopped:
                    return
                arrived, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for submission in arrived:
                self._admit(submission)
            for submission in cancels:
                self._abort(submission)
            if self.engine.has_unfinished():
                self._step()
            self.active = len(self.engine.running)

    def _admit(self, submission: Submission) -> None:
        if submission.cancelled:  # left before it reached the engine; the cancel in flight finds nothing to abort
            self._finished(len(submission.sequences))
            return
        for index, (prompt_ids, params) in enumerate(submission.sequences):
            request_id = self.engine.add(prompt_ids, params)  # the server validated them: add cannot refuse
            submission.engine_ids[request_id] = index
            self._owners[request_id] = submission

    def _abort(self, submission: Submission) -> None:
        for request_id in list(submission.engine_ids):
            self.engine.abort(request_id)
            del submission.engine_ids[request_id], self._owners[request_id]
            self._finished(1)

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step must not kill the thread that serves everyone
            failure = EngineFailure(f"the engine failed: {type(e).__name__}: {e}")
            deliveries = [(s, (s.engine_ids[i], failure)) for i, s in self._owners.items()]
            for request_id, submission in list(self._owners.items()):
                self.engine.abort(request_id)
                del submission.engine_ids[request_id]
                self._finished(1)
            self._owners.clear()
            self._deliver(deliveries)
            return
        self.steps += 1
        deliveries: list[tuple[Submission, tuple[int, Delta | EngineFailure]]] = []
        for delta in deltas:
            submission = self._owners.get(delta.request_id)
            if submission is None:
                continue
            deliveries.append((submission, (submission.engine_ids[delta.request_id], delta)))
            if delta.finished:
                del submission.engine_ids[delta.request_id], self._owners[delta.request_id]
                self._finished(1)
        self._deliver(deliveries)

    def _finished(self, n: int) -> None:
        with self._lock:
            self._unfinished -= n

    @staticmethod
    def _deliver(deliveries) -> None:
        """Hand each delta to its submission's queue on its event loop: one wake-up per loop and step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for submission, item in deliveries:
            by_loop.setdefault(submission.loop, []).append((submission.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
                pass


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)
