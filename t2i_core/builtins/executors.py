"""The built-in ``local`` batch executor, registered through the public ``register_executors`` hook."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from t2i_core import Executor, ExecutorSettings, Outcome, WorkItem, hookimpl

#: How often a waiting driver wakes up, so that Ctrl-C is handled at once.
_POLL_SECONDS = 0.2


class LocalExecutor(Executor):
    """Runs the jobs in this process: one engine per model; ``workers=N`` runs N threads.

    Each thread has its own engines over the same cached weights (see docs/concepts.md,
    Threads), so N threads hold one copy of each model. On a CPU torch already uses every core
    for one image: more threads help where the device waits on Python (a GPU).
    """

    name = "local"
    description = "in this process, one engine per model (--workers N: N threads sharing the weights)"

    def run(self, items: Sequence[WorkItem], settings: ExecutorSettings) -> Iterator[Outcome]:
        from t2i_core import Worker  # the batch machinery loads when a batch runs, not at registration

        workers = min(settings.workers or 1, max(1, len(items)))
        if workers == 1:
            worker = Worker(accelerators=settings.accelerators, device=settings.device, name="local")
            for item in items:
                yield from worker.run(item)
            return
        yield from _threaded(items, settings, workers)


def _threaded(items: Sequence[WorkItem], settings: ExecutorSettings, workers: int) -> Iterator[Outcome]:
    from t2i_core import Worker

    todo: queue.Queue[WorkItem] = queue.Queue()
    for item in items:
        todo.put(item)
    finished: queue.Queue[Outcome | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def serve(index: int) -> None:
        worker = Worker(accelerators=settings.accelerators, device=settings.device, name=f"local-{index}")
        try:
            while not stop.is_set():
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                for outcome in worker.run(item, stop=stop):
                    finished.put(outcome)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver, which raises it
            finished.put(exc)
        finally:
            finished.put(None)

    threads = [
        threading.Thread(target=serve, args=(index,), name=f"t2i-batch-{index}", daemon=True)
        for index in range(workers)
    ]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            try:
                got = finished.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if got is None:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        stop.set()  # a generation under way stops at its next step
        for thread in threads:
            thread.join(timeout=60)


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(LocalExecutor())
