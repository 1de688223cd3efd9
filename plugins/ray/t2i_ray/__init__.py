"""t2i batch executor ``ray``: the jobs of ``t2i batch`` run on a Ray cluster, through Ray Data.

The work items go through ``Dataset.map_batches`` over a pool of actors, each a `t2i_core.Worker`
with one engine per model: one GPU per actor where the cluster has GPUs, a fraction of a CPU
otherwise, so that Ray Data always has room to make progress. The actors hand back PNG bytes;
the driver writes every file and the manifest, as with ``local``. Ray is imported only when a
batch runs, never when t2i loads its plugins.

``t2i serve --ray`` (flags declared by t2i-server, run by `t2i_ray._serve`) serves t2i serve's
HTTP API as a Ray Serve application: `t2i_ray._serve_ingress` over `t2i_ray._serve_replica`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from t2i_core import (
    Executor,
    ExecutorSettings,
    GenerationError,
    InvalidRequestError,
    Outcome,
    WorkItem,
    hookimpl,
)

#: Seconds without any finished job before the batch gives up (the pool may not fit the
#: cluster, or a worker hangs); ``stall_timeout`` changes it. It covers an actor's start and
#: its first model load, which on a fresh node may include a download.
DEFAULT_STALL_TIMEOUT = 1800.0


@attrs.frozen(kw_only=True)
class RayOptions:
    """The ``ray`` executor's own settings (`ExecutorSettings.options`, ``--executor-option KEY=VALUE``)."""

    #: a cluster to join (``auto``, ``ray://host:10001``, ``host:6379``); None = the one this
    #: process is connected to, else ``RAY_ADDRESS``, else a local one started for the batch
    address: str | None = None
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    #: torch threads of each CPU actor; None = its node's CPUs shared among the actors on it.
    #: On a CPU the thread count is part of the computation: images are bit-exact with another
    #: executor's when both use the same number of threads (within one level of 255 otherwise).
    threads: int | None = None

    @classmethod
    def from_settings(cls, options: Mapping[str, Any]) -> RayOptions:
        values = dict(options)
        address = values.get("address")
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise InvalidRequestError("address", address, "a Ray cluster address such as auto or ray://head:10001")
        stall = _number(values.get("stall_timeout", DEFAULT_STALL_TIMEOUT), "stall_timeout", float)
        if not stall > 0:
            raise InvalidRequestError("stall_timeout", stall, "a number of seconds > 0")
        threads = values.get("threads")
        if threads is not None:
            threads = _number(threads, "threads", int)
            if threads < 1:
                raise InvalidRequestError("threads", threads, "an integer >= 1")
        return cls(address=address, stall_timeout=float(stall), threads=threads)


def _number(value: Any, name: str, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(name, value, "an integer" if kind is int else "a number") from None
    if isinstance(value, bool) or (kind is float and not math.isfinite(number)):
        raise InvalidRequestError(name, value, "an integer" if kind is int else "a number")
    return number


@attrs.frozen(kw_only=True)
class ActorPlan:
    """How many actors, and what each claims and runs on."""

    actors: int
    num_cpus: float
    num_gpus: float
    device: str
    #: torch threads per CPU actor (None: leave torch's default)
    threads: int | None


def plan_actors(
    settings: ExecutorSettings, cpus: float, gpus: float, nodes: Sequence[Mapping[str, float]]
) -> ActorPlan:
    """Size the actor pool from the cluster's resources.

    One GPU per actor where there are GPUs (``workers`` at most the GPU count). CPU actors each
    claim a fraction of a CPU, at most one and together at most half the cluster's, so that
    Ray Data always has CPUs for its own tasks: an actor pool that claims every CPU starves
    them and the batch never progresses. Each CPU actor runs torch on its node's share of cores.
    """
    device = settings.device
    if cpus <= 0:
        raise InvalidRequestError("executor", "ray", "a Ray cluster with CPUs (it reports none)")
    if gpus >= 1 and not device.startswith(("cpu", "mps")):
        actors = settings.workers or int(gpus)
        if actors > int(gpus):
            raise InvalidRequestError(
                "workers", actors, f"at most {int(gpus)}: one GPU per worker, and the Ray cluster has {int(gpus)}"
            )
        return ActorPlan(
            actors=actors,
            num_cpus=_share(cpus, actors),
            num_gpus=1,
            device="cuda" if device == "auto" else device,
            threads=None,
        )
    if device.startswith(("cuda", "mps")):
        raise InvalidRequestError("device", device, "auto or cpu (the Ray cluster has no GPU)")
    actors = settings.workers or max(1, len(nodes))
    per_node = max((node.get("CPU", 0.0) for node in nodes), default=cpus)
    actors_per_node = math.ceil(actors / max(1, len(nodes)))
    threads = max(1, int(per_node // actors_per_node))
    return ActorPlan(actors=actors, num_cpus=_share(cpus, actors), num_gpus=0, device="cpu", threads=threads)


def _share(cpus: float, actors: int) -> float:
    """Each actor's CPU claim: together at most half the CPUs, each at most 1 and at least 0.01."""
    return max(0.01, min(1.0, math.floor(cpus / (2 * actors) * 100) / 100))


class RayExecutor(Executor):
    """Runs the work items with Ray Data ``map_batches`` over a pool of actors, each a `t2i_core.Worker`."""

    name = "ray"
    description = "a Ray cluster (Ray Data map_batches, an actor pool: one engine and one GPU per actor)"
    options = ("address", "stall_timeout", "threads")

    def check(self, settings: ExecutorSettings) -> None:
        super().check(settings)
        RayOptions.from_settings(settings.options)
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise InvalidRequestError("executor", "ray", "an installed Ray: python -m pip install 'ray[data]'")

    def run(self, items: Sequence[WorkItem], settings: ExecutorSettings) -> Iterator[Outcome]:
        if not items:
            return
        import ray

        options = RayOptions.from_settings(settings.options)
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=options.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
            )
        try:
            nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
            resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
            plan = plan_actors(settings, resources.get("CPU", 0.0), resources.get("GPU", 0.0), nodes)
            if options.threads is not None and plan.num_gpus == 0:
                plan = attrs.evolve(plan, threads=options.threads)
            with _data_context(options):
                yield from _stream(_dataset(items, settings, plan), options.stall_timeout)
        finally:
            if started_here:
                ray.shutdown()


@contextlib.contextmanager
def _data_context(options: RayOptions) -> Iterator[None]:
    """Ray Data's settings for a batch, restored afterwards (the context is the whole process's)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    execution = context.execution_options
    saved = (
        context.enable_progress_bars,
        execution.preserve_order,
        execution.verbose_progress,
        context.wait_for_min_actors_s,
    )
    context.enable_progress_bars = False  # t2i batch shows its own, over images
    execution.preserve_order = False  # a job is written as soon as it is done
    execution.verbose_progress = False
    context.wait_for_min_actors_s = int(options.stall_timeout)  # never wait forever for an actor that cannot start
    try:
        yield
    finally:
        (
            context.enable_progress_bars,
            execution.preserve_order,
            execution.verbose_progress,
            context.wait_for_min_actors_s,
        ) = saved


def _dataset(items: Sequence[WorkItem], settings: ExecutorSettings, plan: ActorPlan) -> Any:
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [{"item": pickle.dumps(item)} for item in items]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one block per item: spread evenly
    # Ray Data restarts a killed actor and runs its work again (max_restarts and
    # max_task_retries of -1); the driver writes each job once, and stall_timeout bounds a job
    # that kills its worker every time.
    return dataset.map_batches(
        RayWorker,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors, max_tasks_in_flight_per_actor=1),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        fn_constructor_kwargs={
            "accelerators": settings.accelerators,
            "device": plan.device,
            "threads": plan.threads,
        },
    )


def _stream(dataset: Any, stall_timeout: float) -> Iterator[Outcome]:
    """The outcomes as Ray Data yields them, giving up after `stall_timeout` seconds without one."""
    rows: queue.Queue[tuple[str, Any]] = queue.Queue()

    def pump() -> None:
        try:
            for row in dataset.iter_rows():
                rows.put(("row", row["outcome"]))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver, which raises it
            rows.put(("error", exc))
        else:
            rows.put(("end", None))

    threading.Thread(target=pump, name="t2i-ray-results", daemon=True).start()
    while True:
        try:
            kind, value = rows.get(timeout=stall_timeout)
        except queue.Empty:
            raise GenerationError(
                f"the ray executor finished no job for {stall_timeout:g} s: the actor pool may not fit the "
                "cluster, or a worker hangs (finished jobs are kept; stall_timeout changes the limit)"
            ) from None
        if kind == "end":
            return
        if kind == "error":
            raise GenerationError(
                f"the Ray batch failed: {type(value).__name__}: {str(value).splitlines()[0] if str(value) else ''}"
            ) from value
        yield pickle.loads(value)


class RayWorker:
    """The callable class that Ray Data runs in each actor: one `t2i_core.Worker`, kept for the actor's life."""

    def __init__(self, accelerators: Sequence[str] | None, device: str, threads: int | None) -> None:
        from t2i_core import Worker  # in the actor: registering the executor loads no batch machinery

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = Worker(accelerators=accelerators, device=device, name=f"ray:{socket.gethostname()}:{os.getpid()}")

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        outcomes: list[Outcome] = []
        for blob in batch["item"]:
            outcomes.extend(self.worker.run(pickle.loads(blob)))
        return {"outcome": np.array([pickle.dumps(outcome) for outcome in outcomes], dtype=object)}


@hookimpl
def register_executors(register: Callable[[Executor], None]) -> None:
    register(RayExecutor())
