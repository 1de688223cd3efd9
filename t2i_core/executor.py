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

    #: accelerator or preset names for every engine; None = the ``auto`` preset
    accelerators: tuple[str, ...] | None = None
    #: ``"auto"``, ``"cpu"``, ``"cuda"``...; an executor with workers on other machines may choose per worker
    device: str = "auto"
    #: how many workers (None = the executor's default)
    workers: int | None = None
    #: the executor's own settings, by name (`Executor.options` lists those it takes)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_as_dict)


@attrs.frozen(kw_only=True)
class WorkItem:
    """Jobs on one model that a worker runs together: one job, or a micro-batch of compatible ones.

    Plain, picklable data: each job is its id and its request's fields (`GenerationRequest(**spec)`),
    its seed already set.
    """

    model: str
    family: str | None
    ids: tuple[str, ...]
    specs: tuple[dict[str, Any], ...]

    def requests(self) -> list[GenerationRequest]:
        """The jobs' requests."""
        from .request import GenerationRequest

        return [GenerationRequest(**spec) for spec in self.specs]


@attrs.frozen(kw_only=True)
class Outcome:
    """What a worker hands back for one job: its PNG files (with t2i's metadata), or its error."""

    id: str
    ok: bool
    #: the family the job ran as
    family: str | None = None
    #: the request as it ran (defaults filled in), as plain data; None when it never ran
    request: dict[str, Any] | None = None
    seeds: tuple[int, ...] = ()
    #: one PNG file's bytes per image, in order
    images: tuple[bytes, ...] = ()
    #: the error's class name and message when `ok` is false
    error_type: str | None = None
    error: str | None = None
    #: seconds: ``load_s`` (when this job loaded the model), ``generate_s`` (its share of a
    #: micro-batch), ``encode_s``
    timings: Mapping[str, float] = attrs.field(factory=dict)
    #: how many jobs ran in the same pipeline call as this one
    micro_batch: int = 1
    #: which worker ran it (``host:pid``, for logs)
    worker: str = ""


class Executor:
    """Base class of a batch executor. Subclass it, set `name`, implement `run`.

    Register an instance through the ``register_executors`` hook; users choose it by name
    (``run_batch(executor=...)``, ``t2i batch --executor``).
    """

    #: unique name (``--executor NAME``)
    name: ClassVar[str]
    #: one line for ``t2i plugins``
    description: ClassVar[str] = ""
    #: names of the executor's own settings (`ExecutorSettings.options`); any other is refused
    options: ClassVar[tuple[str, ...]] = ()

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
