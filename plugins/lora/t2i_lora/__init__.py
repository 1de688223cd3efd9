"""t2i conditioner: LoRA adapters (``GenerationRequest.loras``) for SD1.5, SDXL, FLUX.1, SD3 and
Z-Image, textual-inversion embeddings (``GenerationRequest.embeddings``) for SD1.5 and SDXL,
plus the ``fuse_lora`` accelerator.

Adapters and embeddings are loaded once into an engine's weights, which engines from the same
cached `load()` share; each request activates exactly its own. See ``docs/lora.md`` and
``docs/embeddings.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from t2i_core import Accelerator, Call, Conditioner, LoadContext, Preset, hookimpl

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest

__all__ = ["FuseLora", "LoraConditioner", "register_accelerators", "register_conditioners"]


class LoraConditioner(Conditioner):
    name = "lora"
    # The families whose diffusers pipeline has `load_lora_weights`. Embeddings go only into the
    # UNet families' CLIP encoders: `prepare` refuses them on the others (_adapters.EMBEDDING_FAMILIES).
    families = ("sd15", "sdxl", "flux", "sd3", "z-image")
    feature = "LoRA adapters and textual-inversion embeddings (loras, embeddings)"
    # Before Compel (20), which encodes prompts with the text encoders the LoRAs adapt.
    order = 15
    description = "LoRA adapters (loras=) and textual-inversion embeddings (embeddings=), loaded once per weights"

    def wants(self, request: GenerationRequest) -> bool:
        return bool(request.loras or request.embeddings)

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        from ._adapters import plan

        plan(engine, request)

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        """Nothing to add to the call: `around_run` already made the weights compute the request's LoRAs."""

    def around_run(self, engine: Engine, request: GenerationRequest) -> AbstractContextManager[Any]:
        # Every request on these families takes a turn, with LoRAs or not: another engine over the
        # same weights must not switch adapters, or add tokens, while it runs.
        from ._adapters import hold

        return hold(engine, request)


class FuseLora(Accelerator):
    """Fuse a request's LoRAs into the weights while the same set is asked for, unfusing exactly after."""

    name = "fuse_lora"
    phase = "fusion"
    # With compile, adapters are hot-swapped instead (fusing would change what compiled code sees).
    conflicts = ("compile", "compile-regional")
    lossless = False
    description = "fuses the active LoRAs into the weights (no LoRA cost per step); unfusing restores them exactly"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        """Nothing at load: t2i-lora reads the engine's accelerators and fuses at the first LoRA request."""


@hookimpl
def register_conditioners(register: Callable[[Conditioner], None]) -> None:
    register(LoraConditioner())


@hookimpl
def register_accelerators(register: Callable[[Accelerator | Preset], None]) -> None:
    register(FuseLora())
