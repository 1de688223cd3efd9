"""Turns on shared weights: runs that need the weights in one state share them; another state waits.

Engines from one cached `load()` share their UNet and text encoders. What plugins put inside
those modules (t2i-lora's adapters and embeddings, t2i-ipadapter's attention processors) is
shared too, so a request that needs them in another state must wait until no run uses the
weights, change them, and only then run. Runs that need the same state
(the same adapters and scales, or none) run side by side, as plain engines always have.
Requests take turns in arrival order, so a waiting state change is never starved by a stream
of runs in the current state.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator


class Turns:
    """A first-come, first-served gate that admits runs of the current state together."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()
        self._running = 0

    @property
    def running(self) -> int:
        """How many runs hold a turn now."""
        return self._running

    @contextlib.contextmanager
    def hold(self, ready: Callable[[], bool], change: Callable[[], None]) -> Iterator[None]:
        """Hold a turn while the weights are as this run needs them.

        `ready()` says whether they already are; otherwise, once this run is first in line and no
        other run holds a turn, `change()` makes them so (nobody else can look at the weights
        meanwhile). Both are called with the gate's lock held. An exception from `change` ends
        the wait and is raised; this run then holds no turn.
        """
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            try:
                while True:
                    if self._queue[0] is ticket:
                        if ready():
                            break
                        if self._running == 0:
                            change()
                            break
                    self._condition.wait()
            finally:
                self._queue.remove(ticket)
                self._condition.notify_all()
            self._running += 1
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()
