"""A batch's input: jobs read from JSONL, CSV or text files (or given in Python), each with a stable id and seed.

A job is a `GenerationRequest` plus the model (and family) to run it on. Its id is the line's
``id`` or a hash of the job as given, and a job without a seed gets one derived from its id, so
a rerun makes the same images whichever executor runs it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..errors import InvalidRequestError
from ..request import GenerationRequest

#: Keys a job may have besides the `GenerationRequest` fields.
JOB_KEYS = ("id", "model", "family")
#: Request fields that hold sequences of attrs values, and the class of each item, by name in t2i_core.request.
_NESTED = {"controls": "Control", "loras": "Lora", "embeddings": "Embedding", "image_prompts": "ImagePrompt"}
#: Request fields that hold one attrs value, and its class, by name in t2i_core.request.
_SINGLE = {"hires": "HiresFix"}
_INTEGERS = ("height", "width", "num_inference_steps", "seed", "num_images")
_NUMBERS = ("guidance_scale",)
#: What an explicit id may look like: it names files (``ID.png``), so no path separators or dot files.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,119}")
_ID_RULE = "a name of letters, digits, '.', '_' and '-' (at most 120, not starting with '.', '_' or '-')"
#: Text of an image held in memory, where a request is written out (as PNG metadata does).
IN_MEMORY = "<in-memory image>"
#: Input files by suffix; any other suffix is a text file of prompts.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)


@attrs.frozen(kw_only=True)
class Job:
    """One job of a batch: a request (its seed set) on a model, with a stable id."""

    id: str
    model: str
    family: str | None
    request: GenerationRequest
    #: 1-based line (CSV row, list index) the job came from, for messages
    line: int
    #: SHA-256 of the job as given (model, family and the request before its seed was derived):
    #: a rerun skips a complete job only when this is unchanged
    digest: str

    def files(self) -> list[str]:
        """The names of the job's images in the output folder: ``ID.png``, or ``ID-0.png``... for several."""
        count = self.request.num_images
        return [f"{self.id}.png"] if count == 1 else [f"{self.id}-{index}.png" for index in range(count)]


@attrs.frozen(kw_only=True)
class InvalidJob:
    """A line that makes no job: malformed, or a request that fails validation."""

    line: int
    id: str | None
    error: Exception
    #: what the line held, as far as it could be read (for the manifest)
    given: Any = None


def read_jobs(
    source: str | os.PathLike[str] | Iterable[Any],
    *,
    model: str | None,
    family: str | None,
    defaults: Mapping[str, Any],
) -> list[Job | InvalidJob]:
    """Every job of `source`, in order: a path (JSONL, CSV or text) or an iterable of requests or dicts.

    `defaults` are request fields for every dict or line that does not give them (``options``
    are merged, the line's win); `model` and `family` likewise. Requests are taken as they are.
    """
    unknown = sorted(set(defaults) - set(request_fields()))
    if unknown:
        raise InvalidRequestError("defaults", unknown[0], "GenerationRequest fields: " + ", ".join(request_fields()))
    if isinstance(source, (str, os.PathLike)):
        entries = _read_file(Path(source), model is not None)
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        entries = ((index, item) for index, item in enumerate(source, 1))
    else:
        raise InvalidRequestError("jobs", source, "a path, or an iterable of GenerationRequest or dicts")
    jobs: list[Job | InvalidJob] = []
    seen_ids: dict[str, int] = {}
    seen_digests: dict[str, int] = {}
    for line, entry in entries:
        job = _job(line, entry, model=model, family=family, defaults=defaults, seen_digests=seen_digests)
        if isinstance(job, Job) and job.id in seen_ids:
            error = InvalidRequestError("id", job.id, f"an id of its own (line {seen_ids[job.id]} has it)")
            job = InvalidJob(line=line, id=job.id, error=error, given=entry if isinstance(entry, dict) else None)
        if isinstance(job, Job):
            seen_ids[job.id] = line
        jobs.append(job)
    return jobs


def _read_file(path: Path, has_model: bool) -> Iterator[tuple[int, Any]]:
    """(line, entry) for each job of the file: a dict, an exception for a line that cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 BOM (Excel's "CSV UTF-8") is not text
    except FileNotFoundError:
        raise InvalidRequestError("jobs", str(path), "an existing JSONL, CSV or text file") from None
    except IsADirectoryError:
        raise InvalidRequestError("jobs", str(path), "a file, not a folder") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("jobs", str(path), f"a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InvalidRequestError("jobs", str(path), f"a readable file ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl(text)
    if suffix in CSV_SUFFIXES:
        return _csv(text, str(path))
    if not has_model:
        raise InvalidRequestError("--model", None, f"a model for the prompts of {path} (a text file names none)")
    return _prompts(text)


def _jsonl(text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            yield number, InvalidRequestError("line", _clip(line), f"a JSON object ({exc})")
            continue
        if not isinstance(entry, dict):
            yield number, InvalidRequestError("line", _clip(line), "a JSON object of GenerationRequest fields")
            continue
        yield number, entry


def _csv(text: str, path: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        return iter(())
    header = [name.strip() for name in header]
    allowed = set(request_fields()) | set(JOB_KEYS)
    for name in header:
        if name not in allowed and not (name.startswith("option.") and len(name) > 7):
            raise InvalidRequestError(
                "jobs",
                path,
                f"a CSV whose header names GenerationRequest fields, id, model, family or option.NAME, not {name!r}",
            )
    return _csv_rows(reader, header)


def _csv_rows(reader: Any, header: list[str]) -> Iterator[tuple[int, Any]]:
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield line, InvalidRequestError("row", _clip(",".join(row)), f"{len(header)} cells, as the header has")
            continue
        try:
            yield line, _csv_entry(dict(zip(header, row, strict=True)))
        except InvalidRequestError as exc:
            yield line, exc


def _csv_entry(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row as a job dict: empty cells are left out, numbers parsed, ``option.NAME`` gathered."""
    entry: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for name, cell in row.items():
        if cell == "":
            continue
        if name.startswith("option."):
            options[name[7:]] = cell
        elif name in _INTEGERS or name in _NUMBERS:
            try:
                entry[name] = int(cell) if name in _INTEGERS else float(cell)
            except ValueError:
                kind = "an integer" if name in _INTEGERS else "a number"
                raise InvalidRequestError(name, cell, kind) from None
        elif name in ("options", *_NESTED):
            try:
                entry[name] = json.loads(cell)
            except ValueError:
                raise InvalidRequestError(name, cell, "JSON (a cell of structured values)") from None
        else:
            entry[name] = cell
    if options:
        entry["options"] = {**entry.get("options", {}), **options}
    return entry


def _prompts(text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            yield number, {"prompt": prompt}


def _job(
    line: int,
    entry: Any,
    *,
    model: str | None,
    family: str | None,
    defaults: Mapping[str, Any],
    seen_digests: dict[str, int],
) -> Job | InvalidJob:
    if isinstance(entry, Exception):
        return InvalidJob(line=line, id=None, error=entry)
    given_id: Any = None
    try:
        if isinstance(entry, GenerationRequest):
            request, job_model, job_family = entry, model, family
        elif isinstance(entry, Mapping):
            fields = dict(entry)
            given_id = fields.pop("id", None)
            job_model = fields.pop("model", model)
            job_family = fields.pop("family", family)
            merged = {**defaults, **fields}
            if "options" in defaults and "options" in fields and isinstance(fields["options"], Mapping):
                merged["options"] = {**defaults["options"], **fields["options"]}
            request = build_request(merged)
        else:
            raise InvalidRequestError("job", _clip(repr(entry)), "a GenerationRequest or a dict of its fields")
        if not isinstance(job_model, str) or not job_model.strip():
            raise InvalidRequestError("model", job_model, "a model for the job (on its line, or --model / model=)")
        if job_family is not None and not isinstance(job_family, str):
            raise InvalidRequestError("family", job_family, "None or a family name")
        digest = job_digest(job_model, job_family, request)
        if given_id is None:
            occurrence = seen_digests.get(digest, 0)
            seen_digests[digest] = occurrence + 1
            # The same job twice (a prompt listed twice) is two jobs: the second gets an id, and so a seed, of its own.
            job_id = digest[:16] if not occurrence else _sha256(f"{digest}#{occurrence + 1}")[:16]
        else:
            job_id = _check_id(given_id)
        if request.seed is None:
            request = request.evolve(seed=derived_seed(job_id))
    except (InvalidRequestError, TypeError, ValueError) as exc:
        shown_id = str(given_id) if isinstance(given_id, (str, int)) and not isinstance(given_id, bool) else None
        return InvalidJob(line=line, id=shown_id, error=exc, given=entry if isinstance(entry, Mapping) else None)
    return Job(id=job_id, model=job_model, family=job_family, request=request, line=line, digest=digest)


def _check_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidRequestError("id", value, _ID_RULE)
    return value


def derived_seed(job_id: str) -> int:
    """The seed of a job that gives none: 32 bits of SHA-256 of its id, the same on every run and machine."""
    return int.from_bytes(hashlib.sha256(f"t2i-batch-seed:{job_id}".encode()).digest()[:4], "big")


def job_digest(model: str, family: str | None, request: GenerationRequest) -> str:
    """SHA-256 of a job: its model, family and the request's fields that differ from their defaults.

    Fields left at their defaults are left out, so that a new request field (with its default)
    does not change the id of every job written before it existed.
    """
    defaults = {field.name: field.default for field in attrs.fields(GenerationRequest)}
    described = describe_request(request, images=_image_digest)
    fields = {
        name: value
        for name, value in described.items()
        if not _is_default(getattr(request, name), defaults.get(name, attrs.NOTHING))
    }
    canonical = json.dumps(
        {"model": model, "family": family, "request": fields}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return _sha256(canonical)


def _is_default(value: Any, default: Any) -> bool:
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is attrs.NOTHING:
        return False
    try:
        return bool(value == default) if not isinstance(default, Mapping) else dict(value) == dict(default)
    except Exception:  # noqa: BLE001 - a value that cannot be compared (an array) is not a default
        return False


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _image_digest(image: Any) -> str:
    return "sha256:" + hashlib.sha256(image.mode.encode() + repr(image.size).encode() + image.tobytes()).hexdigest()


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- requests as plain data ----------------------------------------------------------------------


def request_fields() -> list[str]:
    """The names of `GenerationRequest`'s fields."""
    return [field.name for field in attrs.fields(GenerationRequest)]


def build_request(fields: Mapping[str, Any]) -> GenerationRequest:
    """A request from plain data (a JSON object): nested values (controls, hires, ...) may be dicts."""
    from .. import request as request_module

    known = request_fields()
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in known:
            raise InvalidRequestError(
                name, value, "a GenerationRequest field (" + ", ".join(known) + "), id, model or family"
            )
        item_class = _nested_class(name)
        if item_class is not None and isinstance(value, (list, tuple)):
            value = tuple(_nested(item_class, name, item) for item in value)
        if name in _SINGLE and isinstance(value, Mapping):
            value = _nested(getattr(request_module, _SINGLE[name]), name, value)
        values[name] = value
    if "prompt" not in values:
        raise InvalidRequestError("prompt", None, "a prompt on every job")
    return GenerationRequest(**values)


def _nested_class(name: str) -> type | None:
    from .. import request as request_module

    class_name = _NESTED.get(name)
    return getattr(request_module, class_name, None) if class_name else None


def _nested(item_class: type, name: str, item: Any) -> Any:
    if isinstance(item, Mapping):
        try:
            return item_class(**item)
        except TypeError as exc:  # an unknown or missing key
            raise InvalidRequestError(name, dict(item), f"{item_class.__name__} fields ({exc})") from None
    return item


def describe_request(request: GenerationRequest, *, images: Any = None) -> dict[str, Any]:
    """`request` as JSON-ready data, every field; `build_request` reads it back.

    Images held in memory (a control's) are written as ``"<in-memory image>"``, or as
    ``images(image)`` when given.
    """
    return {field.name: _plain(getattr(request, field.name), images) for field in attrs.fields(GenerationRequest)}


def _plain(value: Any, images: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item, images) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, images) for item in value]
    if attrs.has(type(value)):
        return {field.name: _plain(getattr(value, field.name), images) for field in attrs.fields(type(value))}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
        return images(value) if images is not None else IN_MEMORY
    return str(value)


def request_spec(request: GenerationRequest) -> dict[str, Any]:
    """`request`'s fields as keyword arguments of `GenerationRequest`, picklable (options as a dict)."""
    spec = {field.name: getattr(request, field.name) for field in attrs.fields(GenerationRequest)}
    spec["options"] = dict(request.options)
    return spec
