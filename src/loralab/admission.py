"""Which waiting requests join the running batch, and when: the engine's scheduling policy.

Oldest first, up to the batch's row budget; a cancelled request leaves the line without running;
a request marked `solo` (a retry after its batch failed) runs alone, so only a request that breaks
fails. Callers on any thread add requests; the thread that runs the engine's step admits them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class WaitingLine:
    def __init__(self):
        self._line: deque = deque()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._line)

    def add(self, requests: list) -> None:
        with self._lock:
            self._line.extend(requests)

    def put_first(self, requests: list) -> None:
        """Back to the front of the line, in order (rows retried after a failed step)."""
        with self._lock:
            self._line.extendleft(reversed(requests))

    def admit(self, running: list, max_rows: int, drop_cancelled: Callable) -> list:
        """The requests that join a batch now running `running` rows; cancelled ones go to `drop_cancelled`."""
        joining: list = []
        if any(r.solo for r in running):
            return joining
        with self._lock:
            while self._line and len(running) + len(joining) < max_rows:
                r = self._line[0]
                if r.cancelled:
                    drop_cancelled(self._line.popleft())
                    continue
                if r.solo and (running or joining):
                    break
                joining.append(self._line.popleft())
                if r.solo:
                    break
        return joining
