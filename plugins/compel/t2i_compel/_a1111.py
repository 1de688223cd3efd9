"""A1111-emphasis prompt embeddings for SD 1.x and SDXL pipelines (imports torch).

`EmphasisEncoder` encodes each chunk of `t2i_compel._emphasis.chunks` with the pipeline's text
encoder(s), weights it per token and restores its mean, as A1111's "Original" emphasis does.
"""

from __future__ import annotations

from typing import Any

import torch

from t2i_core.kit import clip_hidden_states

from ._emphasis import Chunk, Vocabulary, chunks, parse


def vocabulary(pipeline: Any, tokenizer: Any) -> Vocabulary:
    """`tokenizer`'s ids for chunking; a fragment's textual-inversion tokens expand as diffusers expands them.

    The pad id is the tokenizer's, which is the one A1111 pads with for the standard checkpoints:
    the end token for CLIP ViT-L (SD 1.x, SDXL's first encoder) and id 0 ("!") for OpenCLIP
    (SDXL's second encoder).
    """
    convert = getattr(pipeline, "maybe_convert_prompt", None)

    def tokenize(text: str) -> list[int]:
        if convert is not None:
            text = convert(text, tokenizer)
        ids: list[int] = tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"]
        return ids

    return Vocabulary(
        tokenize=tokenize,
        start=tokenizer.bos_token_id,
        end=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        comma=tokenizer.get_vocab().get(",</w>"),
    )


class EmphasisEncoder:
    """The text encoder(s) of one engine, read the A1111 way.

    SD 1.x: the last hidden state (``clip_skip`` k: the hidden state k layers before the last,
    through the final layer norm, as diffusers and A1111's "Clip skip" k + 1 define it). SDXL: the
    penultimate hidden states of both encoders (k more layers back with ``clip_skip`` k, as diffusers
    does), concatenated along the features, and the pooled output of the second encoder's first chunk.
    """

    def __init__(self, pipeline: Any, *, dual: bool) -> None:
        pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
        if dual:
            pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
        self.encoders = [(vocabulary(pipeline, tokenizer), encoder) for tokenizer, encoder in pairs]
        self.dual = dual
        # diffusers' SDXL (and A1111 on SDXL) zeroes a missing negative prompt rather than encoding "".
        self.zeros_for_missing_negative = bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False))

    def call_kwargs(
        self,
        prompt: str,
        negative_prompt: str | None,
        *,
        prompt_2: str | None = None,
        negative_prompt_2: str | None = None,
        guided: bool = True,
        clip_skip: int | None = None,
    ) -> dict[str, Any]:
        """``prompt_embeds`` and, as the pipeline needs them, the negative and pooled embeddings.

        The prompt and the negative are brought to one chunk count as A1111's "pad prompt/negative
        prompt to be same length" does: the shorter gets chunks of the empty prompt appended.
        """
        kwargs: dict[str, Any] = {}
        with torch.no_grad():
            positive, pooled = self.encode(prompt, prompt_2, clip_skip=clip_skip)
            if guided:
                if negative_prompt is None and self.zeros_for_missing_negative:
                    negative, negative_pooled = torch.zeros_like(positive[:, :77]), torch.zeros_like(pooled)
                else:
                    negative, negative_pooled = self.encode(
                        negative_prompt or "", negative_prompt_2, clip_skip=clip_skip
                    )
                if negative.shape[1] != positive.shape[1]:
                    empty, _ = self.encode("", None, clip_skip=clip_skip)
                    positive, negative = (
                        _pad(t, empty, max(positive.shape[1], negative.shape[1])) for t in (positive, negative)
                    )
                kwargs["negative_prompt_embeds"] = negative
                if self.dual:
                    kwargs["negative_pooled_prompt_embeds"] = negative_pooled
            kwargs["prompt_embeds"] = positive
            if self.dual:
                kwargs["pooled_prompt_embeds"] = pooled
        return kwargs

    def encode(self, text: str, text_2: str | None, *, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings of `text` (`text_2` for the second encoder if given), and the pooled ones (SDXL; else empty)."""
        per_encoder: list[torch.Tensor] = []
        pooled = torch.empty(0)
        for index, (vocab, encoder) in enumerate(self.encoders):
            source = text_2 if index == 1 and text_2 else text
            encoded = [self._chunk(encoder, chunk, clip_skip) for chunk in chunks(parse(source), vocab)]
            if index == 1:
                pooled = encoded[0][1]
            per_encoder.append(torch.cat([z for z, _ in encoded], dim=1))
        length = max(z.shape[1] for z in per_encoder)
        if any(z.shape[1] != length for z in per_encoder):  # encoders whose tokenizers chunk a text differently
            per_encoder = [
                _pad(z, self._empty(encoder, vocab, clip_skip), length)
                for z, (vocab, encoder) in zip(per_encoder, self.encoders, strict=True)
            ]
        return torch.cat(per_encoder, dim=-1), pooled

    def _empty(self, encoder: Any, vocab: Vocabulary, clip_skip: int | None) -> torch.Tensor:
        return self._chunk(encoder, chunks(parse(""), vocab)[0], clip_skip)[0]

    def _chunk(self, encoder: Any, chunk: Chunk, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's weighted hidden states, its mean restored, and the encoder's pooled output."""
        ids = torch.tensor([chunk.ids], device=encoder.device)
        skip = clip_skip or 0
        # SDXL reads both encoders' penultimate layer already (skip + 1, no final norm), SD 1.x the last
        # (skip 0: the final norm of the last layer, the encoder's last_hidden_state), as diffusers does
        if self.dual:
            z, output = clip_hidden_states(encoder, ids, skip + 1, final_layer_norm=False)
        else:
            z, output = clip_hidden_states(encoder, ids, skip, final_layer_norm=True)
        dtype = z.dtype
        if all(weight == 1.0 for weight in chunk.weights):
            # A1111 scales by mean / mean: exactly 1, except where the mean is exactly 0 (0 / 0 is NaN: a
            # black image). Unweighted text is the plain encoding, whatever its mean.
            return z, output[0]
        weights = torch.tensor(chunk.weights, device=z.device)  # float32, as A1111's multipliers
        original_mean = z.mean()
        z = z * weights.reshape(1, -1, 1).expand(z.shape)
        weighted_mean = z.mean()
        if weighted_mean != 0:  # else A1111's restore would divide by 0: the weighted values stay as they are
            z = z * (original_mean / weighted_mean)
        return z.to(dtype), output[0]


def _pad(embeds: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    """`embeds` with `empty` chunks appended up to `length` tokens."""
    repeats = (length - embeds.shape[1]) // empty.shape[1]
    return torch.cat([embeds, *[empty] * repeats], dim=1) if repeats else embeds
