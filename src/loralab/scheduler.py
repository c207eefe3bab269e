"""The API's request scheduler: one thread owns the engine and drives its continuous batch.

Requests (`Job`s) go into a queue. At every token boundary the scheduler hands every waiting job to
the engine (`Engine.submit`): it joins the running batch at the next step, whatever adapter or
sampling settings it asks for, and leaves as soon as its reply is done. Text deltas travel from the
engine's `on_text` callback to each job's asyncio queue (`loop.call_soon_threadsafe`).

Cancellation: `Job.cancel()` (the client went away) cancels the job's engine row before the next
step, so it stops within one step; a cancelled job still waiting in the queue never starts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from loralab.generate import Engine, GenerationSettings
from loralab.generate import Request as EngineRequest

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
    request: EngineRequest | None = None  # the engine's row, once the scheduler has submitted the job

    def cancel(self) -> None:
        """The client went away (or the reply is complete): the row may stop."""
        self.cancelled = True

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled = True


class Scheduler:
    """One thread that owns the engine: it hands new requests to the engine and drives its steps."""

    def __init__(self, engine: Engine, max_batch_size: int = 16):
        self.engine, self.max_batch_size = engine, max_batch_size
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.running: set[Job] = set()  # submitted to the engine, not done yet
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="loralab-scheduler", daemon=True)
        self.rows = 0  # counters for /health and the benchmark
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
        """Hand one job from the inbox to the engine (timeout 0: only if one is waiting). False if none came."""
        try:
            job = self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return False
        if job is None:
            self.stopping = True
            return False
        if job.cancelled:
            self.cancelled += 1
            return True

        def on_text(delta: str) -> bool:
            if job.cancelled:
                return False
            job.push("delta", delta)
            return True

        def on_done(request: EngineRequest) -> None:
            self.running.discard(job)
            if request.error is not None:
                log.error("request %s: generation failed", job.request_id, exc_info=request.error)
                job.push("error", request.error)
                return
            self.cancelled += request.completion.finish_reason == "cancelled"
            job.push("done", request.completion)

        try:
            job.request = self.engine.submit(
                job.messages, job.settings, job.adapter, on_text=on_text if job.streaming else None, on_done=on_done
            )
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that refuses the conversation
            job.push("error", e)
            return True
        self.running.add(job)
        self.rows += 1
        return True

    def _loop(self) -> None:
        while not self.stopping:
            if not self.running:
                self._take(timeout=None)  # sleep until work arrives
            while self._take(timeout=0):  # everything waiting joins at this token boundary
                pass
            for job in list(self.running):
                if job.cancelled:
                    job.request.cancel()
            if self.running and not self.stopping:
                try:
                    self.engine.step(self.max_batch_size)  # a failing row reaches its job through on_done
                except Exception as e:  # noqa: BLE001 - a bug outside the rows: fail them, keep serving
                    for job in list(self.running):
                        log.error("request %s: generation failed", job.request_id, exc_info=e)
                        job.request.cancel()
                        job.push("error", e)
                    self.running.clear()
