"""Option ``clip_skip`` on SDXL: the ``prompt_embeds`` diffusers' ``clip_skip`` makes, computed by t2i."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from t2i_core import InvalidRequestError, Option, UnsupportedFeatureError

CLIP_SKIP = Option(
    name="clip_skip",
    type=int,
    default=None,
    minimum=0,
    help="text-encoder layers to skip before the penultimate one SDXL reads, in both encoders, as diffusers' "
    "clip_skip; None or 0 = the penultimate layer. Up to the smaller encoder's layer count - 1 (11 for SDXL base)",
)


def check_clip_skip(pipeline: Any, options: Mapping[str, Any]) -> None:
    """Refuse a ``clip_skip`` past the token embeddings of `pipeline`'s smaller text encoder."""
    from t2i_core.kit import clip_layers

    clip_skip = CLIP_SKIP.coerce(options.get("clip_skip"))
    encoders = [encoder for encoder in (pipeline.text_encoder, pipeline.text_encoder_2) if encoder is not None]
    most = min(clip_layers(encoder) for encoder in encoders) - 1
    if clip_skip is not None and clip_skip > most:
        allowed = f"an integer in [0, {most}] (this checkpoint's smaller text encoder has {most + 1} layers)"
        raise InvalidRequestError("options['clip_skip']", clip_skip, allowed)


def skipped_prompt_embeds(family: str, pipeline: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with ``prompt``, ``prompt_2`` and ``clip_skip`` replaced by the ``prompt_embeds`` and
    ``pooled_prompt_embeds`` that diffusers' ``clip_skip`` makes.

    As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's prompt (``prompt_2`` or ``prompt``
    for the second) tokenized to its tokenizer's length, ``hidden_states[-(clip_skip + 2)]`` of each,
    concatenated; the pooled output from the projecting encoder. The negative prompts stay text:
    diffusers encodes them from the penultimate layer, clip_skip or not.
    """
    import torch
    from diffusers.loaders import TextualInversionLoaderMixin
    from diffusers.utils.torch_utils import get_module_execution_device

    from t2i_core.kit import clip_hidden_states

    if "prompt_embeds" in kwargs:
        raise UnsupportedFeatureError(family, "options['clip_skip'] with a prompt weighting that encodes the prompt")
    prompt = kwargs["prompt"]
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    second = kwargs.get("prompt_2") or texts
    texts_2 = [second] if isinstance(second, str) else list(second)
    pairs = [(pipeline.tokenizer, pipeline.text_encoder), (pipeline.tokenizer_2, pipeline.text_encoder_2)]
    if pipeline.tokenizer is None:  # as diffusers: the one encoder reads `prompt`
        pairs = pairs[1:]
    pooled = None
    layers = []
    for words, (tokenizer, text_encoder) in zip([texts, texts_2], pairs, strict=False):
        if isinstance(pipeline, TextualInversionLoaderMixin):
            words = pipeline.maybe_convert_prompt(words, tokenizer)
        tokens = tokenizer(
            words, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        ids = tokens.input_ids.to(get_module_execution_device(text_encoder))
        hidden, output = clip_hidden_states(text_encoder, ids, kwargs["clip_skip"] + 1, final_layer_norm=False)
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]
        layers.append(hidden)
    rest = {name: value for name, value in kwargs.items() if name not in ("prompt", "prompt_2", "clip_skip")}
    return {**rest, "prompt_embeds": torch.concat(layers, dim=-1), "pooled_prompt_embeds": pooled}
