"""The negative-prompt conditioner: passes ``request.negative_prompt`` to the pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from t2i_core import Call, Conditioner, hookimpl

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest


class NegativePrompt(Conditioner):
    name = "negative-prompt"
    feature = "negative prompts"
    order = 10
    description = "passes negative_prompt to the pipeline as plain text"

    def wants(self, request: GenerationRequest) -> bool:
        # A weighting conditioner encodes the negative prompt itself.
        return request.negative_prompt is not None and request.prompt_weighting is None

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        call.kwargs["negative_prompt"] = request.negative_prompt


@hookimpl
def register_conditioners(register: Callable[[Conditioner], None]) -> None:
    register(NegativePrompt())
