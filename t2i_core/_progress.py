"""Progress and cancellation: the callback type, and the step callbacks a pipeline call reports through."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import GenerationCancelled, UnsupportedFeatureError

if TYPE_CHECKING:
    from .provider import ModelProvider

ProgressCallback = Callable[[int, int], "bool | None"]
"""``progress(step, total)``; returning ``False`` (or raising `GenerationCancelled`) cancels the generation."""


def report_progress(progress: ProgressCallback, step: int, total: int, *, latents: Any = None) -> None:
    """Call `progress(step, total)`; raise `GenerationCancelled` when it asks to stop.

    Providers that run their own loops (several pipelines in a row) report through this.
    `latents` (the step's latents, for previews) is passed on as ``latents=`` when given, to a
    callback that takes that keyword (`takes_latents`).
    """
    answer = progress(step, total) if latents is None else progress(step, total, latents=latents)  # type: ignore[call-arg]
    if answer is False:
        raise GenerationCancelled(f"generation cancelled at step {step} of {total}", step=step, total=total)


def takes_latents(progress: Callable[..., Any]) -> bool:
    """Whether `progress` accepts a ``latents`` keyword: then it also gets each step's latents."""
    import inspect

    try:
        parameters = inspect.signature(progress).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "latents" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _step_callback(progress: ProgressCallback) -> Callable[..., dict[str, Any]]:
    """A diffusers ``callback_on_step_end`` that reports step ``step + 1`` of ``pipeline.num_timesteps``."""
    with_latents = takes_latents(progress)

    def on_step_end(pipeline: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = callback_kwargs.get("latents") if with_latents else None
        report_progress(progress, step + 1, int(getattr(pipeline, "num_timesteps", 0) or 0), latents=latents)
        return callback_kwargs

    return on_step_end


def _legacy_step_callback(pipeline: Any, progress: ProgressCallback, steps: int) -> Callable[..., None]:
    """An old-style diffusers ``callback(step, timestep, latents)``, called with ``callback_steps=1``.

    Such pipelines call it once per completed scheduler step (``step`` counts from 0), so the
    total is the scheduler's timesteps over its order (`steps`, the requested count, until the
    scheduler has them).
    """
    with_latents = takes_latents(progress)

    def callback(step: int, _timestep: Any, latents: Any) -> None:
        scheduler = getattr(pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        order = int(getattr(scheduler, "order", 1) or 1)
        total = math.ceil(len(timesteps) / order) if timesteps is not None else steps
        report_progress(progress, step + 1, total, latents=latents if with_latents else None)

    return callback


def progress_kwargs(
    provider: ModelProvider, pipeline: Any, kwargs: Mapping[str, Any], progress: ProgressCallback
) -> dict[str, Any]:
    """The call arguments that make `pipeline` report its steps to `progress`."""
    parameters = _call_parameters(pipeline)
    if "callback_on_step_end" in parameters:
        extra: dict[str, Any] = {"callback_on_step_end": _step_callback(progress)}
        tensor_inputs = parameters.get("callback_on_step_end_tensor_inputs")
        if tensor_inputs is not None and takes_latents(progress):
            # Most pipelines pass the latents by default; ask for them only where they do not.
            inputs = kwargs.get("callback_on_step_end_tensor_inputs", tensor_inputs.default)
            if isinstance(inputs, (list, tuple)) and "latents" not in inputs:
                extra["callback_on_step_end_tensor_inputs"] = [*inputs, "latents"]
        return extra
    if "callback" in parameters and "callback_steps" in parameters:
        steps = int(kwargs.get("num_inference_steps") or 0)
        return {"callback": _legacy_step_callback(pipeline, progress, steps), "callback_steps": 1}
    raise UnsupportedFeatureError(
        getattr(provider, "name", type(provider).__name__),
        f"progress callbacks: {type(pipeline).__name__}.__call__ takes neither callback_on_step_end nor "
        "callback/callback_steps; the plugin must override ModelProvider.run and report each step "
        "with t2i_core.kit.report_progress",
    )


def _call_parameters(pipeline: Any) -> dict[str, Any]:
    """The named parameters (``inspect.Parameter`` by name) that calling `pipeline` takes.

    A ``__call__`` that takes only ``*args, **kwargs`` hands them on (a mixin in front of a
    diffusers pipeline, like the graph-step accelerator's), so the next class's ``__call__`` in the
    method resolution order says what the call takes.
    """
    import inspect

    passed_on = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    calls = [vars(cls)["__call__"] for cls in type(pipeline).__mro__ if "__call__" in vars(cls)]
    for call in [pipeline, *(c.__get__(pipeline, type(pipeline)) if inspect.isfunction(c) else c for c in calls)]:
        try:
            parameters = inspect.signature(call).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        named = {name: p for name, p in parameters.items() if p.kind not in passed_on}
        if named:
            return named
    return {}
