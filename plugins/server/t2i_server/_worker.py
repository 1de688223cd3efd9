"""The worker of a device: one thread taking jobs from a bounded queue ordered by priority."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._jobs import Job

logger = logging.getLogger("t2i.server")


class QueueFull(Exception):
    """The device's queue holds `Limits.queue_size` jobs already."""


class Worker:
    """The one thread that runs a device's jobs: higher `priority` first, in the order queued within one."""

    def __init__(self, device: str, capacity: int, run: Callable[[Job], None]) -> None:
        self.device = device
        self.capacity = capacity
        self.running: Job | None = None
        self._run = run
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"t2i-worker-{device}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.capacity:
                raise QueueFull(self.device)
            # After every job of its priority or higher: FIFO within a priority.
            index = next(
                (i for i, queued in enumerate(self._queue) if queued.priority < job.priority), len(self._queue)
            )
            self._queue.insert(index, job)
            job.position = index + 1
            self._announce_positions()
            self._cond.notify_all()

    def remove(self, job: Job) -> bool:
        """Take a queued job out of the queue; False if it is not (or no longer) queued."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._announce_positions()
            return True

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is queued or running (True), or `timeout` seconds (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self.running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self, timeout: float) -> None:
        """Run what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _announce_positions(self) -> None:
        for index, job in enumerate(self._queue):
            job.set_position(index + 1)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.pop(0)
                self.running = job
                self._announce_positions()
            try:
                self._run(job)
            except BaseException:
                logger.exception("t2i serve: job %s ended the worker's call unexpectedly", job.id)
            finally:
                with self._cond:
                    self.running = None
                    self._cond.notify_all()
