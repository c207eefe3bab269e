"""The API's request scheduler: one thread owns the engine and runs waiting requests in batches.

Requests (`Job`s) go into a queue. The scheduler takes every waiting job, groups them by (adapter,
sampling settings) and runs one batch of up to `max_batch_size` jobs of the oldest job's group
(dynamic batching; before a batch it waits up to `gather_ms` for the clients of the previous batch
to come back). Text deltas travel from the engine's `on_text` callback to each job's asyncio queue
(`loop.call_soon_threadsafe`).

Cancellation: `Job.cancel()` (the client went away) makes the next `on_text` call return False,
and the engine calls `on_text` for every live row after every decoding step, so a cancelled row
stops within one step; a cancelled job still waiting in the queue is dropped before its batch.

Everything the scheduler needs from the engine is the one call in `Scheduler._generate`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loralab.generate import Completion, Engine, GenerationSettings

log = logging.getLogger(__name__)


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One request on its way through the scheduler; events go to `events` on the server's loop.

    Events: ("delta", text) while generating (streaming jobs only), then ("done", Completion) or
    ("error", exception).
    """

    messages: list[dict]
    settings: GenerationSettings
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    streaming: bool = False
    request_id: str = ""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    streamed: bool = False  # some text already went out (a failed batch cannot be retried for it)

    def cancel(self) -> None:
        """The client went away (or the reply is complete): the row may stop."""
        self.cancelled = True

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True

    def group_key(self) -> tuple:
        if self.settings.do_sample and self.settings.seed is not None:
            # A seeded sample must not depend on what it was batched with: it runs alone.
            return (id(self),)
        return (self.adapter, json.dumps(self.settings.as_dict(), sort_keys=True))


class Scheduler:
    """One thread that owns the engine and runs waiting requests in batches of one group."""

    def __init__(self, engine: Engine, max_batch_size: int = 16, gather_ms: float = 10.0):
        self.engine, self.max_batch_size, self.gather_s = engine, max_batch_size, gather_ms / 1000
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.pending: list[Job] = []
        self.stopping = False
        self.expect = 1  # requests likely to be waiting at the next batch (see _loop)
        self.thread = threading.Thread(target=self._loop, name="loralab-scheduler", daemon=True)
        self.batches = 0  # counters for /health and the benchmark
        self.rows = 0
        self.largest_batch = 0
        self.cancelled = 0  # requests stopped because their client went away

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def _take(self, timeout: float | None) -> bool:
        """Move one job from the inbox to pending (timeout 0: only if one is waiting). False if none came."""
        try:
            job = self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return False
        if job is None:
            self.stopping = True
            return False
        self.pending.append(job)
        return True

    def _loop(self) -> None:
        while not self.stopping:
            if not self.pending:
                self._take(timeout=None)  # sleep until work arrives
            while self._take(timeout=0):  # and take everything else that is waiting
                pass
            # The clients of the last batch usually send their next request a moment after their
            # reply: wait for them (at most gather_ms) so they share the next batch with the requests
            # that queued meanwhile, instead of alternating between two half batches. A lone client
            # never waits: it is the only one expected.
            deadline = time.monotonic() + self.gather_s
            want = min(self.expect, self.max_batch_size)
            while not self.stopping and len(self.pending) < want and (left := deadline - time.monotonic()) > 0:
                self._take(timeout=left)
            dropped = [j for j in self.pending if j.cancelled]
            self.cancelled += len(dropped)
            self.pending = [j for j in self.pending if not j.cancelled]
            if self.stopping or not self.pending:
                continue
            # The oldest request's group goes first; at most max_batch_size of it per batch.
            key = self.pending[0].group_key()
            batch = [j for j in self.pending if j.group_key() == key][: self.max_batch_size]
            self.pending = [j for j in self.pending if j not in batch]
            self._run(batch)
            self.expect = len(batch) + len(self.pending) + self.inbox.qsize()

    def _generate(self, batch: list[Job]) -> list[Completion]:
        """The scheduler's one call into the engine: a batch of one group, with per-row streaming/cancel."""

        def on_text(i: int, delta: str) -> bool:
            job = batch[i]
            if job.cancelled:
                return False
            if delta and job.streaming:
                job.streamed = True
                job.push("delta", delta)
            return True

        first = batch[0]
        return self.engine.generate([j.messages for j in batch], first.settings, adapter=first.adapter,
                                    batch_size=len(batch), on_text=on_text)

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        self.rows += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            completions = self._generate(batch)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
            if len(batch) > 1:
                # Retry one at a time, so only the request that breaks fails; rows that already
                # streamed text cannot start over and get the error.
                log.warning("batch of %d failed (%s); retrying its requests one by one", len(batch), e)
                for job in batch:
                    if job.streamed:
                        job.push("error", e)
                    else:
                        self._run([job])
                return
            log.error("request %s: generation failed", batch[0].request_id, exc_info=e)
            batch[0].push("error", e)
            return
        for job, completion in zip(batch, completions):
            self.cancelled += completion.finish_reason == "cancelled"
            job.push("done", completion)
