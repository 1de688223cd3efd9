"""The accelerator role: load-time transformations of an engine's pipeline.

Accelerators are applied once per engine, ordered by `phase` (whatever order the user lists
them in): dtype first, then attention, fusion, memory layout, device placement, memory
savers, and compilation last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from .provider import ModelProvider

PHASES: tuple[str, ...] = ("dtype", "attention", "fusion", "layout", "placement", "memory", "compile")
"""The accelerator phases, in the order they are applied; an `Accelerator.phase` is one of them."""


@attrs.frozen(kw_only=True)
class LoadContext:
    """What an accelerator may look at when it checks itself and changes load arguments."""

    model: str
    source: str
    family: str
    provider: ModelProvider
    device: str
    #: the names of every accelerator of this load, in application order
    accelerators: tuple[str, ...]


class Accelerator:
    """Base class of an accelerator plugin."""

    name: ClassVar[str]
    phase: ClassVar[str]
    #: device types it works on ("cpu", "cuda", "mps")
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "mps")
    #: names of accelerators it cannot be combined with
    conflicts: ClassVar[tuple[str, ...]] = ()
    #: True: images stay those of plain fp32 up to floating-point rounding; False: it trades
    #: precision or exactness for speed or memory (half dtypes, tiled decoding)
    lossless: ClassVar[bool] = True
    #: the parts of the pipeline it compiles with torch.compile: ``"denoiser"`` (its UNet or
    #: transformer, whole or by blocks), ``"decoder"`` (the autoencoder's); empty when it compiles
    #: nothing. ``t2i warmup`` needs an accelerator that compiles; a conditioner that swaps the
    #: denoiser's weights (LoRA) hot-swaps them in place when ``"denoiser"`` is compiled.
    compiles: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def check(self, context: LoadContext) -> None:
        """Raise `IncompatibleAcceleratorsError` when it cannot work in `context`."""

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments (e.g. ``torch_dtype``, ``variant``)."""
        return {}

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        """Transform the loaded pipeline in place."""


@attrs.frozen(kw_only=True)
class Preset:
    """A named stack of accelerators, chosen per device type."""

    name: str
    description: str
    #: device type → accelerator names; "*" is the fallback for any other device
    stacks: dict[str, tuple[str, ...]]

    def resolve(self, device: str) -> tuple[str, ...]:
        """The accelerator names for `device` (``"cuda:1"`` counts as ``"cuda"``; else the ``"*"`` stack)."""
        kind = device.split(":", 1)[0]
        return self.stacks.get(kind, self.stacks.get("*", ()))


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
