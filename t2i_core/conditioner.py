"""The conditioner role: turn parts of a request into pipeline call arguments.

The engine builds a `Call` from the provider's base arguments, then hands it to every
conditioner that `wants()` the request, in ascending `order`. A conditioner may replace
`Call.pipeline` (e.g. by a ControlNet pipeline over the same components).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from .engine import Engine
    from .request import GenerationRequest


@attrs.define(kw_only=True)
class Call:
    """The pipeline to run and the keyword arguments to run it with."""

    pipeline: Any
    """The diffusers pipeline to run: the engine's, or one a conditioner put in its place (a ControlNet
    pipeline over the same components).
    """
    kwargs: dict[str, Any]
    """The keyword arguments of the pipeline call (``prompt``, ``num_inference_steps``, ``generator``...)."""


class Conditioner:
    """Base class of a conditioner plugin."""

    name: ClassVar[str]
    """Unique name, shown by ``t2i plugins``."""
    families: ClassVar[tuple[str, ...] | None] = None
    """The families it works with; None = every family."""
    weighting: ClassVar[str | None] = None
    """The ``prompt_weighting`` value it implements, if it is a weighting syntax."""
    feature: ClassVar[str] = ""
    """What it does, for the error when a family refuses it ("Compel prompt weighting")."""
    order: ClassVar[int] = 100
    """Lower runs first: the negative prompt is 10, LoRA 15, the weighting syntaxes 20, ControlNet 50;
    default 100.
    """
    description: ClassVar[str] = ""
    """One line for ``t2i plugins``."""

    def wants(self, request: GenerationRequest) -> bool:
        """Whether this conditioner has work to do for `request` (cheap; no heavy imports)."""
        raise NotImplementedError

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        """Validate the request against the engine before any work starts (raise a `T2IError`)."""

    def describe_request(self, request: GenerationRequest) -> str:
        """What `request` asks of this conditioner, for the refusal on a family it does not serve:
        e.g. ``"controls[0].model='tiny:controlnet-sd15' (an sd15 ControlNet)"``, so that the error
        names what was given as well as the family. Cheap: load and download nothing. The default,
        ``""``, adds nothing to the message (`feature` names the conditioner).
        """
        return ""

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        """Edit `call` in place. `request` is resolved: defaults filled in, seed set."""
        raise NotImplementedError

    def around_run(self, engine: Engine, request: GenerationRequest) -> AbstractContextManager[Any]:
        """A context manager that `Engine.generate` holds from before the first `condition` to
        after the provider's `run`, for every conditioner that serves the engine's family —
        whether or not it `wants` the request. `request` is resolved.

        For conditioners that change weights shared by engines over the same cached model
        (t2i-lora activates adapters inside the shared UNet): take a lock of those weights here,
        so that no other engine changes them while this request runs, even a request that does
        not use the feature. The default does nothing (``contextlib.nullcontext()``). Exceptions
        raised by entering it end the request before any work, like those of `prepare`.
        """
        return contextlib.nullcontext()
