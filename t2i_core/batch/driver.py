"""`run_batch`: many jobs into one folder, resumable, on any registered executor.

The driver reads the jobs, skips those whose images are complete and verified, hands the rest
to the executor grouped by model (optionally micro-batched), and writes every image (to a
temporary name, then renamed) and every manifest record (appended, synced) itself, so the
output does not depend on the executor. See docs/batch.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from .._files import write_atomically
from ..errors import InvalidRequestError, OutputError, T2IError
from ..executor import Executor, ExecutorSettings, Outcome, WorkItem
from .jobs import InvalidJob, Job, describe_request, read_jobs, request_spec
from .manifest import MANIFEST, Manifest, is_complete, locked, read_records, remove_temporaries

#: A record of the manifest, as `run_batch`'s `on_record` receives it.
Record = Mapping[str, Any]


@attrs.frozen(kw_only=True)
class BatchSummary:
    """What `run_batch` did (with ``dry_run``, what it would do)."""

    out: str
    """The output folder (images and ``manifest.jsonl``)."""
    executor: str
    """The executor that ran the jobs (``local``, ``ray``)."""
    total: int
    """Jobs read, invalid lines included."""
    done: int
    """Jobs made by this run."""
    skipped: int
    """Jobs whose images were already complete (verified against the manifest)."""
    failed: int
    """Jobs that failed in this run."""
    invalid: int
    """Lines that make no job (malformed, or refused before any work)."""
    images: int
    """Images written by this run."""
    seconds: float
    """Wall-clock seconds of the whole run, model loads included."""
    failures: tuple[str, ...] = ()
    """One line per failed or invalid job: where it is and why."""
    groups: tuple[Mapping[str, Any], ...] = ()
    """Per model: ``{"model", "family", "jobs", "images", "to_make"}``."""
    dry_run: bool = False
    """True when nothing ran: the summary says what the run would do."""

    @property
    def images_per_second(self) -> float:
        """Images written per second of the run."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Whether every job is done: none failed and no line was invalid."""
        return self.failed == 0 and self.invalid == 0


def run_batch(
    jobs: str | os.PathLike[str] | Iterable[Any],
    *,
    out: str | os.PathLike[str],
    model: str | None = None,
    family: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    executor: str = "local",
    workers: int | None = None,
    accelerators: Sequence[str] | None = None,
    device: str = "auto",
    micro_batch: int = 1,
    executor_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[Record], None] | None = None,
) -> BatchSummary:
    """Make the images of many jobs into the folder `out`, with ``out/manifest.jsonl``; resumable.

    :param jobs: a JSONL, CSV or text file (one prompt per line), or an iterable of
        `GenerationRequest` or dicts of its fields (dicts and lines may add ``id``, ``model``,
        ``family``). Each job's images are ``ID.png`` (``ID-0.png``, ... for several), ID being
        the job's ``id`` or a hash of the job; a job without a seed gets one derived from its id.
    :param model: the model of jobs that name none; `family` likewise.
    :param defaults: request fields for every dict or line that does not give them (``options``
        are merged with the line's). Requests are taken as they are.
    :param executor: the name of a registered executor: ``local`` (in this process), ``ray``
        (with t2i-ray), or a third party's.
    :param workers: how many workers the executor runs (None = its default).
    :param accelerators: accelerator or preset names for every engine (None = the ``auto`` preset);
        ``NAME@VALUE`` gives an accelerator its value. Checked before any work, dry run or not.
    :param device: the engines' device; ``"auto"`` lets each worker pick its best.
    :param micro_batch: run up to this many jobs of one model in one pipeline call when they
        differ only in prompt, negative prompt and seed (1 = off); images then match lone runs
        within one level of 255 (`Engine.generate_batch`).
    :param executor_options: the executor's own settings (ray: ``address``, ``stall_timeout``...).
    :param dry_run: check every job (model, family, options, scheduler) without loading
        weights or writing anything, and return the plan.
    :param on_start: called once before any work with (jobs to run, images to make).
    :param on_record: called with each manifest record, as soon as it is written.

    A rerun skips the jobs whose images are complete (their size and SHA-256 match the
    manifest) and makes the others; a failed job or a malformed line is recorded and the batch
    goes on. Raises `InvalidRequestError` for bad arguments before any work, `OutputError` when
    the folder cannot be written (what was finished is kept), and whatever the executor raises.
    """
    started = time.perf_counter()
    from ..registry import get_registry

    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise InvalidRequestError("micro_batch", micro_batch, "an integer >= 1 (1 = off)")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise InvalidRequestError("out", out, "the path of a folder")
    if isinstance(accelerators, str):
        accelerators = (accelerators,)
    folder = Path(out)
    registry = get_registry()
    if accelerators is not None:
        from ..engine.checks import check_accelerator_specs

        accelerators = tuple(accelerators)
        check_accelerator_specs(registry, accelerators, device)
    chosen = registry.executor(executor)
    settings = ExecutorSettings(
        accelerators=None if accelerators is None else tuple(accelerators),
        device=device,
        workers=workers,
        options=executor_options or {},
    )
    chosen.check(settings)
    entries = _claim_files(read_jobs(jobs, model=model, family=family, defaults=dict(defaults or {})))
    if dry_run:
        return _dry_run(entries, folder, chosen.name, started)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(str(folder), f"the folder cannot be made ({exc.strerror or exc})", exc.errno) from None
    with locked(folder):
        remove_temporaries(folder)
        manifest = Manifest(folder)
        try:
            return _run(entries, folder, manifest, chosen, settings, micro_batch, started, on_start, on_record)
        finally:
            manifest.close()


def _run(
    entries: list[Job | InvalidJob],
    folder: Path,
    manifest: Manifest,
    chosen: Executor,
    settings: ExecutorSettings,
    micro_batch: int,
    started: float,
    on_start: Callable[[int, int], None] | None,
    on_record: Callable[[Record], None] | None,
) -> BatchSummary:
    previous = read_records(folder)
    todo = [e for e in entries if isinstance(e, Job) and not is_complete(folder, previous.get(e.id), e.digest)]
    invalid = [e for e in entries if isinstance(e, InvalidJob)]
    counts = {"done": 0, "failed": 0, "images": 0}
    failures: list[str] = []

    def record(entry: Record) -> None:
        manifest.append(entry)
        if on_record is not None:
            on_record(entry)

    if on_start is not None:
        on_start(len(todo), sum(job.request.num_images for job in todo))
    for line in invalid:
        failures.append(_where(line.line, line.id, line.error))
        record(_invalid_record(line))
    pending = {job.id: job for job in todo}
    outcomes = chosen.run(_work_items(todo, micro_batch), settings)
    try:
        for outcome in outcomes:
            job = pending.pop(outcome.id, None)
            if job is None:
                continue  # not ours, or already recorded (a worker's retry): each job is written once
            entry = _finish(folder, job, outcome, chosen.name)
            if entry["status"] == "done":
                counts["done"] += 1
                counts["images"] += len(entry["files"])
            else:
                counts["failed"] += 1
                failures.append(_where(job.line, job.id, entry["error"]["message"]))
            record(entry)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()
    for job in pending.values():
        counts["failed"] += 1
        message = f"executor {chosen.name!r} returned no result for it"
        failures.append(_where(job.line, job.id, message))
        record(_failed_record(job, chosen.name, {"type": "ExecutorError", "message": message}))
    jobs = [e for e in entries if isinstance(e, Job)]
    return BatchSummary(
        out=str(folder),
        executor=chosen.name,
        total=len(entries),
        done=counts["done"],
        skipped=len(jobs) - len(todo),
        failed=counts["failed"],
        invalid=len(invalid),
        images=counts["images"],
        seconds=time.perf_counter() - started,
        failures=tuple(failures),
        groups=_groups(jobs, {job.id for job in todo}),
    )


def _finish(folder: Path, job: Job, outcome: Outcome, executor: str) -> dict[str, Any]:
    """Write a finished job's images and return its manifest record (done, or failed with its error)."""
    if not outcome.ok:
        error = {"type": outcome.error_type or "Error", "message": outcome.error or ""}
        return _failed_record(job, executor, error, outcome)
    names = job.files()
    if len(outcome.images) != len(names):
        message = f"the worker returned {len(outcome.images)} image(s) for {len(names)}"
        return _failed_record(job, executor, {"type": "ExecutorError", "message": message}, outcome)
    started = time.perf_counter()
    files = []
    for name, data in zip(names, outcome.images, strict=True):
        # Replaces only what no complete record vouches for: a leftover of a run cut short. A symbolic
        # link in an image's place is replaced, never written through (its target is not the batch's).
        write_atomically(folder / name, _writer(data), overwrite=True, through_links=False)
        files.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    timings = {**outcome.timings, "write_s": round(time.perf_counter() - started, 4)}
    return {
        "id": job.id,
        "status": "done",
        "line": job.line,
        "job": job.digest,
        "model": job.model,
        "family": outcome.family,
        "request": outcome.request,
        "seeds": list(outcome.seeds),
        "files": files,
        "micro_batch": outcome.micro_batch,
        "timings": timings,
        "executor": executor,
        "worker": outcome.worker,
        "finished": _now(),
    }


def _writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    return write


def _failed_record(job: Job, executor: str, error: dict[str, str], outcome: Outcome | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": "failed",
        "line": job.line,
        "job": job.digest,
        "model": job.model,
        "family": job.family,
        "request": describe_request(job.request),
        "error": error,
        "executor": executor,
        "worker": outcome.worker if outcome is not None else "",
        "finished": _now(),
    }


def _invalid_record(line: InvalidJob) -> dict[str, Any]:
    return {
        "id": line.id,
        "status": "invalid",
        "line": line.line,
        "error": {"type": type(line.error).__name__, "message": str(line.error)},
        "given": _jsonable(line.given),
        "finished": _now(),
    }


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _where(line: int, job_id: str | None, error: Any) -> str:
    shown = f"line {line}" + (f" (id {job_id!r})" if job_id else "")
    return f"{shown}: {error}"


def _claim_files(entries: list[Job | InvalidJob]) -> list[Job | InvalidJob]:
    """Refuse a job whose file names an earlier job already uses (id ``a-0`` beside a 2-image ``a``)."""
    owners: dict[str, int] = {}
    claimed: list[Job | InvalidJob] = []
    for entry in entries:
        if isinstance(entry, Job):
            taken = [name for name in entry.files() if name in owners]
            if taken:
                error = InvalidRequestError(
                    "id", entry.id, f"an id whose files are its own ({taken[0]} is line {owners[taken[0]]}'s)"
                )
                claimed.append(InvalidJob(line=entry.line, id=entry.id, error=error))
                continue
            owners.update(dict.fromkeys(entry.files(), entry.line))
        claimed.append(entry)
    return claimed


def _work_items(jobs: list[Job], micro_batch: int) -> list[WorkItem]:
    """The jobs as work items, grouped by model in order of first use; micro-batched when asked."""
    groups: dict[tuple[str, str | None], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.model, job.family), []).append(job)
    items = []
    for (model, family), members in groups.items():
        chunks: list[list[Job]] = []
        open_chunks: dict[str, list[Job]] = {}
        for job in members:
            key = _batch_key(job) if micro_batch > 1 else None
            chunk = open_chunks.get(key) if key is not None else None
            if chunk is None or len(chunk) >= micro_batch:
                chunk = []
                chunks.append(chunk)
                if key is not None:
                    open_chunks[key] = chunk
            chunk.append(job)
        for chunk in chunks:
            ids = tuple(job.id for job in chunk)
            specs = tuple(request_spec(job.request) for job in chunk)
            items.append(WorkItem(model=model, family=family, ids=ids, specs=specs))
    return items


def _batch_key(job: Job) -> str | None:
    """Jobs with equal keys may share a pipeline call: all but prompt, negative prompt and seed agree."""
    request = job.request
    if request.prompt_weighting is not None or request.controls:
        return None
    described = describe_request(request)
    for name in ("prompt", "negative_prompt", "seed"):
        described.pop(name)
    described["has_negative_prompt"] = request.negative_prompt is not None
    return json.dumps(described, sort_keys=True, default=str)


def _groups(jobs: list[Job], todo: set[str]) -> tuple[dict[str, Any], ...]:
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    for job in jobs:
        group = groups.setdefault(
            (job.model, job.family), {"model": job.model, "family": job.family, "jobs": 0, "images": 0, "to_make": 0}
        )
        group["jobs"] += 1
        group["images"] += job.request.num_images
        group["to_make"] += job.id in todo
    return tuple(groups.values())


# -- dry run ---------------------------------------------------------------------------------


def _dry_run(entries: list[Job | InvalidJob], folder: Path, executor: str, started: float) -> BatchSummary:
    """Check every job against its model's family without loading weights; write nothing."""
    from ..engine.checks import check_request, default_max_pixels, scheduler_step_limit
    from ..engine.sources import resolve_model
    from ..registry import get_registry

    registry = get_registry()
    previous = read_records(folder) if (folder / MANIFEST).is_file() else {}
    providers: dict[tuple[str, str | None], Any] = {}
    step_limits: dict[tuple[str, str | None], Any] = {}
    max_pixels = default_max_pixels()
    checked: list[Job | InvalidJob] = []
    for entry in entries:
        if isinstance(entry, Job):
            key = (entry.model, entry.family)
            try:
                if key not in providers:
                    try:
                        providers[key] = resolve_model(registry, entry.model, entry.family)
                    except T2IError as exc:
                        providers[key] = exc
                resolved = providers[key]
                if isinstance(resolved, Exception):
                    raise resolved
                if key not in step_limits:
                    own = resolved.provider.named_schedulers
                    step_limits[key] = scheduler_step_limit(resolved.source, resolved.is_local, own)
                # The engine's own checks, all those that need no weights (t2i_core.engine.checks).
                check_request(
                    registry, resolved.provider, entry.request, max_pixels=max_pixels, step_limit=step_limits[key]
                )
                entry = attrs.evolve(entry, family=resolved.family)
            except T2IError as exc:
                entry = InvalidJob(line=entry.line, id=entry.id, error=exc)
        checked.append(entry)
    jobs = [e for e in checked if isinstance(e, Job)]
    invalid = [e for e in checked if isinstance(e, InvalidJob)]
    todo = {job.id for job in jobs if not is_complete(folder, previous.get(job.id), job.digest)}
    return BatchSummary(
        out=str(folder),
        executor=executor,
        total=len(checked),
        done=0,
        skipped=len(jobs) - len(todo),
        failed=0,
        invalid=len(invalid),
        images=0,
        seconds=time.perf_counter() - started,
        failures=tuple(_where(line.line, line.id, line.error) for line in invalid),
        groups=_groups(jobs, todo),
        dry_run=True,
    )
