"""Compel-made prompt embeddings for SD1.5 and SDXL pipelines (imports torch and compel).

`PromptEncoder` holds the Compel instance(s) of one engine and turns a prompt and a negative
prompt into the ``prompt_embeds`` family of pipeline arguments.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from compel import Compel, DiffusersTextualInversionManager, ReturnedEmbeddingsType
from compel.prompt_parser import Blend, CrossAttentionControlSubstitute, FlattenedPrompt

from t2i_core import InvalidRequestError

from . import PromptTruncatedWarning


@functools.lru_cache(maxsize=128)
def parse(text: str) -> Any:
    """Compel's parse of `text` (a `Conjunction`), made once: checking, warning and encoding all read it."""
    return Compel.parse_prompt_string(text)


class _ParseOnce(Compel):  # type: ignore[misc]
    """A `Compel` that reads its prompts through `parse` (pyparsing costs ~20 ms a prompt)."""

    @classmethod
    def parse_prompt_string(cls, prompt_string: str) -> Any:
        return parse(prompt_string)


class _TextualInversions(DiffusersTextualInversionManager):  # type: ignore[misc]
    """Compel's manager of textual-inversion tokens, as compel documents it for diffusers.

    Without one, Compel leaves a multi-vector embedding's token as one token, so only its first
    vector is used (diffusers #3501). Like ``CompelForSDXL``, both SDXL encoders use the pipeline's
    (whose tokenizers share their vocabulary). Token ids without any added token are returned as
    they are: the manager's decode and re-encode could only change them, never add an embedding.
    """

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        added = self.pipe.tokenizer.added_tokens_decoder
        if not any(token_id in added and not added[token_id].special for token_id in token_ids):
            return token_ids
        return list(super().expand_textual_inversion_token_ids_if_necessary(token_ids))


def check_syntax(field: str, text: str) -> None:
    """Parse `text` as Compel syntax; refuse what t2i-compel cannot honour (no torch work)."""
    allowed = "Compel syntax: (word)1.3, word++, word--, .blend(), .and()"
    try:
        conjunction = parse(text)
    except Exception as exc:  # noqa: BLE001 - pyparsing and float() errors alike mean a malformed prompt
        raise InvalidRequestError(field, text, f"{allowed} ({type(exc).__name__}: {exc})") from None
    if not conjunction.prompts:
        raise InvalidRequestError(field, text, f"{allowed}, with some text (an empty group such as () has none)")
    for prompt in conjunction.prompts:
        weights = getattr(prompt, "weights", None) if isinstance(prompt, Blend) else None
        if weights is not None and (not all(math.isfinite(w) for w in weights) or sum(weights) == 0):
            raise InvalidRequestError(field, text, f"{allowed}; .blend() weights must be finite and not sum to 0")
    if getattr(conjunction, "lora_weights", None):
        raise InvalidRequestError(field, text, f"{allowed}; withLora() is not supported (Compel does not apply LoRAs)")
    for prompt in _flattened(conjunction):
        if any(isinstance(part, CrossAttentionControlSubstitute) for part in prompt.children):
            raise InvalidRequestError(
                field,
                text,
                f"{allowed}; .swap() is not supported (diffusers pipelines take no cross-attention control)",
            )


def _flattened(conjunction: Any) -> list[Any]:
    prompts: list[Any] = []
    for prompt in conjunction.prompts:
        prompts.extend(prompt.prompts if isinstance(prompt, Blend) else [prompt])
    return [p for p in prompts if isinstance(p, FlattenedPrompt)]


class PromptEncoder:
    """The Compel instance(s) of one engine: one for SD1.5, one per text encoder for SDXL.

    SDXL follows Compel's SDXL recipe: both tokenizers and text encoders, the penultimate
    hidden states (not normalised), their concatenation along the feature axis, and the pooled
    embeddings of the second encoder only (``requires_pooled=[False, True]``). It uses two
    `Compel` objects, as compel's own ``CompelForSDXL`` does, rather than the deprecated list
    form, whose padding of unequal lengths fails.
    """

    def __init__(self, pipeline: Any, *, dual: bool, truncate: bool) -> None:
        self.truncate = truncate
        # diffusers' SDXL replaces a missing negative prompt by zeros rather than the encoded "".
        self.zeros_for_missing_negative = bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False))
        if dual:
            penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            self.compels: tuple[Compel, ...] = (
                _ParseOnce(
                    tokenizer=pipeline.tokenizer,
                    text_encoder=pipeline.text_encoder,
                    returned_embeddings_type=penultimate,
                    truncate_long_prompts=truncate,
                    textual_inversion_manager=_TextualInversions(pipeline),
                ),
                _ParseOnce(
                    tokenizer=pipeline.tokenizer_2,
                    text_encoder=pipeline.text_encoder_2,
                    returned_embeddings_type=penultimate,
                    truncate_long_prompts=truncate,
                    textual_inversion_manager=_TextualInversions(pipeline),
                ),
            )
        else:
            self.compels = (
                _ParseOnce(
                    tokenizer=pipeline.tokenizer,
                    text_encoder=pipeline.text_encoder,
                    truncate_long_prompts=truncate,
                    textual_inversion_manager=_TextualInversions(pipeline),
                ),
            )
        self.pooled = dual

    def call_kwargs(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        guided: bool = True,
    ) -> dict[str, Any]:
        """``prompt_embeds`` and, as the pipeline needs them, the negative and pooled embeddings.

        SDXL's second encoder (and so the pooled embeddings) reads `prompt_2` / `negative_prompt_2`
        where given, else `prompt` / `negative_prompt`, as diffusers does. `guided` is False when
        classifier-free guidance is off (guidance scale <= 1): the pipeline then never reads a
        negative, so none is encoded.
        """
        kwargs: dict[str, Any] = {}
        with torch.no_grad():
            positive, pooled = self._encode(self._texts("prompt", prompt, "options['prompt_2']", prompt_2))
            if guided and (negative_prompt is not None or not self.zeros_for_missing_negative):
                # No negative prompt means "" (what diffusers encodes itself), except where the
                # pipeline zeroes a missing negative: there it is left out, and diffusers zeroes it.
                texts = self._texts(
                    "negative_prompt", negative_prompt or "", "options['negative_prompt_2']", negative_prompt_2
                )
                negative, negative_pooled = self._encode(texts)
                positive, negative = self._pad(positive, negative)
                kwargs["negative_prompt_embeds"] = torch.cat(negative, dim=-1)
                if self.pooled:
                    kwargs["negative_pooled_prompt_embeds"] = negative_pooled
            else:
                (positive,) = self._pad(positive)
            kwargs["prompt_embeds"] = torch.cat(positive, dim=-1)
        if self.pooled:
            kwargs["pooled_prompt_embeds"] = pooled
        return kwargs

    def _texts(self, field: str, text: str, field_2: str, text_2: str | None) -> list[tuple[str, str]]:
        """The (field, text) each encoder reads: the second reads `text_2` if set (diffusers' ``prompt_2 or prompt``)."""
        return [(field, text), (field_2, text_2) if text_2 else (field, text)][: len(self.compels)]

    def _encode(self, texts: list[tuple[str, str]]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One conditioning tensor per text encoder (`texts` pairs them with a field and a text), and the pooled one."""
        if self.truncate:
            for field, text in dict.fromkeys(texts):
                self._warn_if_truncated(field, text)
        embeds = [compel.build_conditioning_tensor(text) for compel, (_, text) in zip(self.compels, texts, strict=True)]
        if not self.pooled:
            return embeds, None
        # What ``requires_pooled=True`` makes Compel return, asked for separately: with it, Compel
        # 2.x fails on a weighted .and() (its empty-prompt conditioning becomes a tuple).
        compel, (_, text) = self.compels[-1], texts[-1]
        return embeds, compel.conditioning_provider.get_pooled_embeddings([text], device=compel.device)

    def _pad(self, *texts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Pad the embeddings of every text and encoder to one token count (Compel's empty-prompt chunks)."""
        length = max(t.shape[1] for embeds in texts for t in embeds)
        per_encoder = []
        for index, compel in enumerate(self.compels):
            tensors = [embeds[index] for embeds in texts]
            # The last tensor only sets the target length: encoders may chunk one text differently.
            target = tensors[0].new_empty(tensors[0].shape[0], length, tensors[0].shape[2])
            per_encoder.append(compel.pad_conditioning_tensors_to_same_length([*tensors, target])[:-1])
        return [list(embeds) for embeds in zip(*per_encoder, strict=True)]

    def _warn_if_truncated(self, field: str, text: str) -> None:
        # Every encoder of a family shares one vocabulary, so the first one's tokens count for all.
        provider = self.compels[0].conditioning_provider
        window = provider.max_token_count - len(provider.bos_sequence) - len(provider.eos_sequence)
        for prompt in _flattened(parse(text)):
            count = sum(len(provider.tokenizer.tokenize(part.text)) for part in prompt.children if part.text)
            if count > window:
                warnings.warn(
                    f"{field} is {count} tokens long and the text encoder reads {window}: Compel dropped the last "
                    f"{count - window} tokens; use prompt_weighting='compel-long' to keep the whole prompt",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
