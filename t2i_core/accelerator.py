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
    description: ClassVar[str] = ""

    def check(self, context: LoadContext) -> None:
        """Raise `IncompatibleAcceleratorsError` when it cannot work in `context`."""

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments (e.g. ``torch_dtype``, ``variant``)."""
        return {}

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        """Transform the loaded pipeline in place."""


def is_offloaded(module: Any) -> bool:
    """Whether offloading moves `module`'s weights (a torch module, or any of its submodules).

    True for accelerate's model and sequential offload hooks and diffusers' group offloading:
    models that move in and out of the device around each call, so a model placed beside them
    with ``.to(device)`` would meet its inputs on the wrong device.
    """
    for submodule in module.modules():
        if hasattr(submodule, "_hf_hook"):
            return True
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("group_offloading") is not None:
            return True
    return False


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
