"""Batch executors: where a batch's jobs run. The base class, what crosses to a worker and back, and the worker.

An executor gets `WorkItem`s (the jobs of one model, one or a micro-batch of them) and yields
an `Outcome` per job: its PNG files as bytes, or its error. It writes nothing: the driver
(`t2i_core.run_batch`) writes every file and the manifest, so the output is the same whichever
executor ran the jobs. A `t2i_core.Worker` runs items in one process, with one engine per model; the
``local`` executor runs one in-process, the ``ray`` executor one per Ray actor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .request import GenerationRequest


def _as_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class ExecutorSettings:
    """How a batch asks its executor to run: the engines' settings, the workers, the executor's own options."""

    accelerators: tuple[str, ...] | None = None
    """Accelerator or preset names for every engine; None = the ``auto`` preset."""
    device: str = "auto"
    """``"auto"``, ``"cpu"``, ``"cuda"``...; an executor with workers on other machines may choose per
    worker.
    """
    workers: int | None = None
    """How many workers (None = the executor's default)."""
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_as_dict)
    """The executor's own settings, by name (`Executor.options` lists those it takes)."""


@attrs.frozen(kw_only=True)
class WorkItem:
    """Jobs on one model that a worker runs together: one job, or a micro-batch of compatible ones.

    Plain, picklable data: each job is its id and its request's fields (`GenerationRequest(**spec)`),
    its seed already set.
    """

    model: str
    """The model every job of the item runs on."""
    family: str | None
    """Its family when the batch names one; None: detected."""
    ids: tuple[str, ...]
    """The jobs' ids, in the order of `specs`."""
    specs: tuple[dict[str, Any], ...]
    """Each job's request fields, its seed set: ``GenerationRequest(**spec)``."""

    def requests(self) -> list[GenerationRequest]:
        """The jobs' requests."""
        from .request import GenerationRequest

        return [GenerationRequest(**spec) for spec in self.specs]


@attrs.frozen(kw_only=True)
class Outcome:
    """What a worker hands back for one job: its PNG files (with t2i's metadata), or its error."""

    id: str
    """The job's id."""
    ok: bool
    """True when the job made its images; False when it failed (`error_type`, `error`)."""
    family: str | None = None
    """The family the job ran as."""
    request: dict[str, Any] | None = None
    """The request as it ran (defaults filled in), as plain data; None when it never ran."""
    seeds: tuple[int, ...] = ()
    """The seed of each image."""
    images: tuple[bytes, ...] = ()
    """One PNG file's bytes per image, in order."""
    error_type: str | None = None
    """The error's class name when `ok` is false (``InvalidRequestError``)."""
    error: str | None = None
    """The error's message when `ok` is false."""
    timings: Mapping[str, float] = attrs.field(factory=dict)
    """Seconds: ``load_s`` (when this job loaded the model), ``generate_s`` (its share of a micro-batch),
    ``encode_s``.
    """
    micro_batch: int = 1
    """How many jobs ran in the same pipeline call as this one."""
    worker: str = ""
    """Which worker ran it (``host:pid``, for logs)."""


class Executor:
    """Base class of a batch executor. Subclass it, set `name`, implement `run`.

    Register an instance through the ``register_executors`` hook; users choose it by name
    (``run_batch(executor=...)``, ``t2i batch --executor``).
    """

    name: ClassVar[str]
    """Unique name (``--executor NAME``)."""
    description: ClassVar[str] = ""
    """One line for ``t2i plugins``."""
    options: ClassVar[tuple[str, ...]] = ()
    """Names of the executor's own settings (`ExecutorSettings.options`); any other is refused."""

    def check(self, settings: ExecutorSettings) -> None:
        """Refuse settings the executor cannot honour, before any work: raise `InvalidRequestError`.

        The default refuses options not in `options` and a number of workers below 1.
        """
        for key in settings.options:
            if key not in self.options:
                allowed = ", ".join(self.options) or "none"
                raise InvalidRequestError("executor_options", key, f"an option of executor {self.name!r}: {allowed}")
        if settings.workers is not None and (
            not isinstance(settings.workers, int) or isinstance(settings.workers, bool) or settings.workers < 1
        ):
            raise InvalidRequestError("workers", settings.workers, "None or an integer >= 1")

    def run(self, items: Sequence[WorkItem], settings: ExecutorSettings) -> Iterator[Outcome]:
        """Run every item and yield one `Outcome` per job as each finishes, in any order.

        A job's failure is an `Outcome` with ``ok=False``; an exception from `run` ends the batch
        (the jobs already yielded are kept). `Worker` does a worker's part: ``Worker(...).run(item)``.
        """
        raise NotImplementedError
