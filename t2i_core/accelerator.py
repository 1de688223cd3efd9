"""The accelerator role: load-time transformations of an engine's pipeline.

Accelerators are applied once per engine, ordered by `phase` (whatever order the user lists
them in): dtype first, then quantization, attention, fusion, memory layout, device placement,
memory savers, step caches, and compilation last. An accelerator may take one value, written
``NAME@VALUE`` (``first-block-cache@0.15``), which it declares as its `AcceleratorParameter`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import attrs

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .engine import Engine
    from .provider import ModelProvider
    from .request import GenerationRequest

_Configured = TypeVar("_Configured", bound="Accelerator")

PHASES: tuple[str, ...] = (
    "dtype",
    "quantize",
    "attention",
    "fusion",
    "layout",
    "placement",
    "memory",
    "cache",
    "compile",
)
"""The accelerator phases, in the order they are applied; an `Accelerator.phase` is one of them."""

_KINDS: tuple[type, ...] = (float, int, str)


def _number(value: float) -> str:
    return f"{value:g}"


@attrs.frozen(kw_only=True)
class AcceleratorParameter:
    """The one value an accelerator takes, written NAME@VALUE (``first-block-cache@0.15``)."""

    name: str
    """What the value is (``"threshold"``), for help texts and errors."""
    kind: type
    """``float``, ``int`` or ``str``."""
    default: Any
    """The value when the user writes just NAME."""
    minimum: float | None = None
    """Inclusive bounds of a float or int value; None = unbounded."""
    maximum: float | None = None
    """Inclusive upper bound of a float or int value; None = unbounded."""
    choices: tuple[str, ...] = ()
    """The values a str parameter allows; empty = any non-empty text."""
    description: str = ""
    """What the value does, in a sentence, for ``t2i plugins`` and the docs."""

    def __attrs_post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"AcceleratorParameter {self.name!r}: kind must be float, int or str, not {self.kind!r}")
        if not self._allows(self.default):
            raise ValueError(f"AcceleratorParameter {self.name!r}: default {self.default!r} is not {self.allowed()}")

    def allowed(self) -> str:
        """What a value may be: ``"a number in [0, 1]"``, ``"an integer of at least 1"``, ``"one of fp8, int8"``."""
        if self.kind is str:
            return f"one of {', '.join(self.choices)}" if self.choices else "a non-empty text"
        what = "a number" if self.kind is float else "an integer"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"{what} in [{_number(low)}, {_number(high)}]"
        if low is not None:
            return f"{what} of at least {_number(low)}"
        if high is not None:
            return f"{what} of at most {_number(high)}"
        return what

    def describe(self) -> str:
        """``"threshold: a number in [0, 1], default 0.2"``."""
        return f"{self.name}: {self.allowed()}, default {self.format(self.default)}"

    def format(self, value: Any) -> str:
        """`value` as written after the ``@`` (what `parse` reads back to the same value)."""
        return repr(value) if self.kind is float else str(value)

    def parse(self, accelerator: str, text: str) -> Any:
        """The value `text` stands for; `InvalidRequestError` naming `accelerator`, `text` and what is allowed."""
        value: Any = text.strip()
        if self.kind is not str:
            try:
                value = self.kind(value)
            except ValueError:
                value = text
        return self.check(accelerator, value, written=text)

    def check(self, accelerator: str, value: Any, *, written: str | None = None) -> Any:
        """`value` (an int where a float is asked for becomes a float) if allowed; else `InvalidRequestError`
        naming ``accelerator@written`` (`written` defaults to `value` as `format` writes it)."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not self._allows(value):
            if written is None:
                written = value if isinstance(value, str) else self.format(value)
            raise InvalidRequestError(
                "accelerators",
                f"{accelerator}@{written}",
                f"{accelerator}@{self.name.upper()} with {self.name} {self.allowed()} "
                f"({accelerator} alone means {accelerator}@{self.format(self.default)})",
            )
        return value

    def _allows(self, value: Any) -> bool:
        if self.kind is str:
            return isinstance(value, str) and bool(value) and (not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, (float, int)) or not isinstance(value, self.kind):
            return False
        if not math.isfinite(value):
            return False
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return f"not {'a number' if self.kind is float else 'an integer'}"
        if not math.isfinite(value):
            return "not a finite number"
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            return "out of range"
        return None


@attrs.frozen(kw_only=True)
class LoadContext:
    """What an accelerator may look at when it checks itself and changes load arguments."""

    model: str
    """The model as the user wrote it (a hub id, an alias, a folder, a file or a ``tiny:`` name)."""
    source: str
    """Where it loads from: the resolved hub id, folder or file."""
    family: str
    """The family it loads as (``sd15``, ``flux``...)."""
    provider: ModelProvider
    """The family's `ModelProvider`."""
    device: str
    """The device it loads on, resolved (``cpu``, ``cuda``, ``cuda:1``; never ``auto``)."""
    accelerators: tuple[str, ...]
    """The names of every accelerator of this load, in application order (plain names, no ``@VALUE``)."""
    config: str | None = None
    """For a single-file checkpoint (`source` is the file): the local diffusers folder whose configs it
    loads with, where its ``model_index.json`` is; None otherwise.
    """


class Accelerator:
    """Base class of an accelerator plugin."""

    name: ClassVar[str]
    """Unique name, as users write it (``--accelerator NAME``)."""
    phase: ClassVar[str]
    """When it applies: one of `PHASES` (``dtype``, ``quantize``, ``attention``...), applied in that order."""
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "mps")
    """Device types it works on ("cpu", "cuda", "mps")."""
    conflicts: ClassVar[tuple[str, ...]] = ()
    """Names of accelerators it cannot be combined with."""
    lossless: ClassVar[bool] = True
    """True: images stay those of plain fp32 up to floating-point rounding; False: it trades precision or
    exactness for speed or memory (half dtypes, tiled decoding).
    """
    compiles: ClassVar[tuple[str, ...]] = ()
    """The parts of the pipeline it compiles with torch.compile: ``"denoiser"`` (its UNet or transformer,
    whole or by blocks), ``"decoder"`` (the autoencoder's); empty when it compiles nothing. ``t2i
    warmup`` needs an accelerator that compiles; a conditioner that swaps the denoiser's weights (LoRA)
    hot-swaps them in place when ``"denoiser"`` is compiled.
    """
    description: ClassVar[str] = ""
    """One line for ``t2i plugins`` and the accelerators reference."""
    parameter: ClassVar[AcceleratorParameter | None] = None
    """The one value it takes, written ``NAME@VALUE``; None = it takes none (``fp16@1`` is refused)."""
    batches: ClassVar[bool] = True
    """False: an engine with it never merges requests into one pipeline call (`Engine.generate_batch`),
    because what it does depends on the whole call: a step cache decides for the batch at once which
    steps to skip, so a request's images would depend on the others in its batch.
    """
    refuses: ClassVar[Mapping[str, str]] = {}
    """Request fields it cannot serve, each with why (``{"loras": "LoRA layers over float8 weights cannot
    compute"}``): the conditioner of that field refuses such a request before any work.
    """

    @property
    def value(self) -> Any:
        """This instance's value: the parameter's default unless configured; None without a parameter."""
        if self.parameter is None:
            return None
        return self.__dict__.get("_t2i_value", self.parameter.default)

    def with_value(self: _Configured, value: Any) -> _Configured:
        """A copy configured with `value` (the registry makes these from ``NAME@VALUE``).

        `InvalidRequestError` when it takes no value or `value` is not allowed.
        """
        if self.parameter is None:
            raise InvalidRequestError(
                "accelerators", f"{self.name}@{value}", f"{self.name} without a value: {self.name} takes no value"
            )
        checked = self.parameter.check(self.name, value)
        configured = copy.copy(self)
        configured.__dict__["_t2i_value"] = checked
        return configured

    @property
    def spec(self) -> str:
        """How it is written: ``first-block-cache@0.15`` (the value always written) or just its name."""
        if self.parameter is None:
            return self.name
        return f"{self.name}@{self.parameter.format(self.value)}"

    def check(self, context: LoadContext) -> None:
        """Raise `IncompatibleAcceleratorsError` when it cannot work in `context`."""

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments (e.g. ``torch_dtype``, ``variant``)."""
        return {}

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        """Transform the loaded pipeline in place."""

    def around_run(self, engine: Engine, request: GenerationRequest) -> AbstractContextManager[Any]:
        """A context manager that the engine holds around each run of `engine` (from before the
        conditioners to after the provider's run), for every accelerator of the engine. `request`
        is resolved (the first of a batch, whose settings the others share).

        For an accelerator whose work keeps state from one step to the next in weights that
        engines over the same cached model share (the step caches): take a lock of those weights,
        and start each run from fresh state, here. Exceptions raised by entering it end the
        request before any work. The default does nothing (``contextlib.nullcontext()``).
        """
        return contextlib.nullcontext()


@attrs.frozen(kw_only=True)
class Preset:
    """A named stack of accelerators, chosen per device type (and, optionally, per kind of denoiser)."""

    name: str
    """Unique name, used like an accelerator's (``--accelerator fast``)."""
    description: str
    """One line for ``t2i plugins`` and the accelerators reference."""
    stacks: dict[str, tuple[str, ...]]
    """Device type → accelerator names; "*" is the fallback for any other device."""
    denoisers: dict[str, dict[str, tuple[str, ...]]] = attrs.field(factory=dict)
    """The kind of denoiser a checkpoint has (``"transformer"``, ``"unet"``, ``"prior"``: its component in
    ``model_index.json``) → device stacks that replace `stacks` for it; a transformer family wants
    bfloat16 where a UNet wants float16, a step cache where a UNet has none.
    """
    optional: tuple[str, ...] = ()
    """Names in the stacks that a plugin provides (``nf4`` from t2i-quantize): left out, not refused, when
    nothing registers them, so the preset still loads without that plugin.
    """

    def resolve(self, device: str, denoiser: str | None = None) -> tuple[str, ...]:
        """The accelerator names for `device` (``"cuda:1"`` counts as ``"cuda"``; else the ``"*"`` stack)
        and a checkpoint whose denoiser is of kind `denoiser` (None: not known, the plain `stacks`)."""
        kind = device.split(":", 1)[0]
        stacks = self.denoisers.get(denoiser, self.stacks) if denoiser is not None else self.stacks
        return stacks.get(kind, stacks.get("*", ()))


def __getattr__(name: str) -> Any:
    if name == "is_offloaded":  # here until t2i 0.2; removed in 0.3
        import warnings

        from ._modules import is_offloaded

        warnings.warn(
            "t2i_core.accelerator.is_offloaded is deprecated: import it from t2i_core.kit",
            DeprecationWarning,
            stacklevel=2,
        )
        return is_offloaded
    raise AttributeError(f"module 't2i_core.accelerator' has no attribute {name!r}")
