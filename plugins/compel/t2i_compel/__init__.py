"""t2i conditioners: prompt weighting for SD1.5 and SDXL, in Compel's syntax and in AUTOMATIC1111's.

Two weighting names share Compel: ``"compel"`` cuts a prompt at the text encoder's 77-token
window as diffusers does (with a `PromptTruncatedWarning`), and ``"compel-long"`` keeps a longer
prompt whole, encoded in 77-token chunks. ``"a1111"`` is A1111's "Original" emphasis, which
needs no Compel (`t2i_compel._emphasis`, `t2i_compel._a1111`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from t2i_core import Call, Conditioner, hookimpl

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest

    from ._a1111 import EmphasisEncoder
    from ._embeddings import PromptEncoder

#: the families whose pipelines take ``prompt_embeds``, and whether they have two text encoders
_DUAL_ENCODER = {"sd15": False, "sdxl": True}
#: text arguments that the embeddings replace (diffusers refuses both at once)
_TEXT_ARGUMENTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
#: SDXL family options with text for the second encoder, in Compel syntax too
_SECOND_ENCODER_OPTIONS = ("prompt_2", "negative_prompt_2")


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's window, and ``"compel"`` cut it."""


class CompelWeighting(Conditioner):
    name = "compel"
    weighting = "compel"
    families = tuple(_DUAL_ENCODER)
    feature = "Compel prompt weighting"
    order = 20
    description = "Compel syntax in prompt and negative_prompt; cuts prompts at 77 tokens like diffusers"
    #: keep a prompt longer than the text encoder's window whole instead of cutting it
    keep_long_prompts: ClassVar[bool] = False

    def wants(self, request: GenerationRequest) -> bool:
        return request.prompt_weighting == self.weighting

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        from ._embeddings import check_syntax

        _check_texts(request, check_syntax)

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        texts = {key: call.kwargs.pop(key, None) for key in _TEXT_ARGUMENTS}
        embeds = self.encoder(engine).call_kwargs(
            request.prompt,
            request.negative_prompt,
            prompt_2=texts["prompt_2"],
            negative_prompt_2=texts["negative_prompt_2"],
            guided=request.guidance_scale is None or request.guidance_scale > 1,
        )
        call.kwargs.update(embeds)

    def encoder(self, engine: Engine) -> PromptEncoder:
        """The engine's Compel instance(s) for this weighting, made on first use."""
        encoder: PromptEncoder | None = engine.state.get(self.name)
        if encoder is None:
            from ._embeddings import PromptEncoder

            encoder = PromptEncoder(
                engine.pipeline, dual=_DUAL_ENCODER[engine.family], truncate=not self.keep_long_prompts
            )
            engine.state[self.name] = encoder
        return encoder


class CompelLongWeighting(CompelWeighting):
    name = "compel-long"
    weighting = "compel-long"
    description = "Compel syntax; prompts longer than 77 tokens are kept whole, in 77-token chunks"
    keep_long_prompts = True


class A1111Weighting(Conditioner):
    name = "a1111"
    weighting = "a1111"
    families = tuple(_DUAL_ENCODER)
    feature = "A1111 prompt emphasis"
    order = 20
    description = "AUTOMATIC1111 emphasis: (word), [word], (word:1.3), BREAK; long prompts in 75-token chunks"

    def wants(self, request: GenerationRequest) -> bool:
        return request.prompt_weighting == self.weighting

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        from ._emphasis import check_syntax

        _check_texts(request, check_syntax)

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        texts = {key: call.kwargs.pop(key, None) for key in _TEXT_ARGUMENTS}
        call.kwargs.pop("clip_skip", None)  # the embeddings below apply it; diffusers refuses both
        clip_skip = request.options.get("clip_skip")
        embeds = self.encoder(engine).call_kwargs(
            request.prompt,
            request.negative_prompt,
            prompt_2=texts["prompt_2"],
            negative_prompt_2=texts["negative_prompt_2"],
            guided=request.guidance_scale is None or request.guidance_scale > 1,
            clip_skip=clip_skip if isinstance(clip_skip, int) else None,
        )
        call.kwargs.update(embeds)

    def encoder(self, engine: Engine) -> EmphasisEncoder:
        """The engine's text encoder(s) read the A1111 way, set up on first use."""
        encoder: EmphasisEncoder | None = engine.state.get(self.name)
        if encoder is None:
            from ._a1111 import EmphasisEncoder

            encoder = EmphasisEncoder(engine.pipeline, dual=_DUAL_ENCODER[engine.family])
            engine.state[self.name] = encoder
        return encoder


def _check_texts(request: GenerationRequest, check_syntax: Callable[[str, str], None]) -> None:
    """Every text of `request` a weighting reads (prompt, negative prompt, SDXL's second-encoder options), checked."""
    check_syntax("prompt", request.prompt)
    if request.negative_prompt is not None:
        check_syntax("negative_prompt", request.negative_prompt)
    for option in _SECOND_ENCODER_OPTIONS:
        value = request.options.get(option)
        if isinstance(value, str):
            check_syntax(f"options[{option!r}]", value)


@hookimpl
def register_conditioners(register: Callable[[Conditioner], None]) -> None:
    register(CompelWeighting())
    register(CompelLongWeighting())
    register(A1111Weighting())
