"""CLIP skip: a CLIP text encoder's hidden states some layers before its last, as diffusers' ``clip_skip`` picks them.

diffusers' own ``clip_skip`` reads ``text_encoder.text_model.final_layer_norm`` on SD 1.x, which
transformers 5.6 removed (``CLIPTextModel`` holds its layers itself since): t2i picks the layer here
and hands the pipeline ``prompt_embeds`` instead.
"""

from __future__ import annotations

from typing import Any


def clip_layers(text_encoder: Any) -> int:
    """How many transformer layers `text_encoder` (a ``CLIPTextModel`` or ``CLIPTextModelWithProjection``) has."""
    return int(text_encoder.config.num_hidden_layers)


def clip_hidden_states(
    text_encoder: Any, input_ids: Any, clip_skip: int, *, final_layer_norm: bool, attention_mask: Any = None
) -> tuple[Any, Any]:
    """The hidden states of `input_ids` `clip_skip` layers before `text_encoder`'s last, and its whole output.

    ``hidden_states[-(clip_skip + 1)]`` of the encoder's output (``hidden_states[0]`` is the token
    embeddings, ``hidden_states[-1]`` the last layer's output before the final layer norm), then
    that layer norm when `final_layer_norm` is true. What diffusers' ``clip_skip`` computes:

    - SD 1.x: ``clip_hidden_states(encoder, ids, clip_skip, final_layer_norm=True)``
      (``clip_skip=0`` is the encoder's ``last_hidden_state``, the plain prompt embeddings);
    - SDXL, both encoders: ``clip_hidden_states(encoder, ids, clip_skip + 1, final_layer_norm=False)``,
      since SDXL reads the penultimate layer already (diffusers' ``hidden_states[-(clip_skip + 2)]``).

    The output's first item is what SDXL pools: the projected ``text_embeds`` of
    ``CLIPTextModelWithProjection``. Runs without autograd; `input_ids` (and `attention_mask`) must
    be on the encoder's device already. Works on transformers 4.x and 5.x, before and after 5.6
    flattened ``CLIPTextModel``.

    :raises ValueError: `clip_skip` is negative or reaches past the token embeddings (> the layer count).
    """
    import torch

    layers = clip_layers(text_encoder)
    if not 0 <= clip_skip <= layers:
        raise ValueError(f"clip_skip={clip_skip}: this text encoder has {layers} layers, so 0 to {layers}")
    with torch.no_grad():
        output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = output.hidden_states[-(clip_skip + 1)]
        if final_layer_norm:
            # CLIPTextModelWithProjection and transformers < 5.6 CLIPTextModel keep it in .text_model
            hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    return hidden, output
