"""The server's errors: each one an HTTP status and a JSON body that names the culprit field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from t2i_core import GenerationError, InvalidRequestError, T2IError, UnsupportedFeatureError


class Problem(Exception):
    """An HTTP error answer: ``{"error": {"type", "message", "field"?, "allowed"?}}`` with `status`."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        field: str | None = None,
        allowed: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field
        self.allowed = allowed
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.allowed is not None:
            error["allowed"] = self.allowed
        return {"error": error}


def invalid(field: str, message: str, allowed: str | None = None) -> Problem:
    """422: a field of the request has a value that is not allowed."""
    return Problem(422, "invalid_request", message, field=field, allowed=allowed)


def from_t2i(exc: T2IError, fields: Mapping[str, str] | None = None) -> Problem:
    """The answer to a t2i error; `fields` renames t2i's field names (``num_inference_steps``, or a whole
    dotted name such as ``hires.scale``) to the API's."""
    fields = fields or {}
    if isinstance(exc, InvalidRequestError):
        field = exc.field
        if field == "height x width":  # the engine's pixel limit
            field = "height"
        head = field.split("[", 1)[0].split(".", 1)[0]
        field = fields[field] if field in fields else fields.get(head, head) + field[len(head) :]
        value = exc.value if not isinstance(exc.value, str) or len(exc.value) <= 80 else exc.value[:77] + "..."
        return Problem(
            422,
            "invalid_request",
            f"{field}={value!r} is not allowed: expected {exc.allowed}",
            field=field,
            allowed=exc.allowed,
        )
    if isinstance(exc, UnsupportedFeatureError):
        return Problem(422, "unsupported", str(exc))
    if isinstance(exc, GenerationError):
        return Problem(500, "generation_failed", str(exc))
    return Problem(422, "invalid_request", str(exc))
