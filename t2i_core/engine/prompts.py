"""What the engine says about prompts and images: truncated prompts, flat images.

One short warning per prompt the text encoder will cut (instead of diffusers' log line quoting
the whole text), and one per image that came out a single flat colour.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from ..request import GenerationRequest
from .own_thread import warn


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder reads; the rest of it has no effect."""


class DegenerateImageWarning(UserWarning):
    """An image came out a single flat colour: usually an overflow (guidance, half precision)."""


#: the pipeline attributes of text tokenizers, and the argument suffix each reads first (``prompt_2``),
#: falling back to the plain argument; the prior's tokenizer (Kandinsky) reads only the prompt
_TOKENIZERS = (("tokenizer", ""), ("tokenizer_2", "_2"), ("tokenizer_3", "_3"), ("prior_tokenizer", ""))
#: tokenizers whose window is ``model_max_length`` whatever ``max_sequence_length`` says (CLIP's 77)
_FIXED_WINDOW = ("CLIPTokenizer", "CLIPTokenizerFast")


def _window(tokenizer: Any, kwargs: dict[str, Any]) -> int:
    """How many tokens of a text `tokenizer` lets through: CLIP's ``model_max_length``; a T5 or LLM
    tokenizer's ``max_sequence_length`` when the call sets one (Flux, SD3, Z-Image), else its own limit."""
    window = int(getattr(tokenizer, "model_max_length", 0) or 0)
    length = kwargs.get("max_sequence_length")
    if type(tokenizer).__name__ not in _FIXED_WINDOW and isinstance(length, int) and length > 0:
        return length
    return window if 0 < window < 100_000 else 0


def warn_truncated_prompts(pipeline: Any, kwargs: dict[str, Any], long_weighting: str | None = None) -> None:
    """Warn, in one short line per prompt, when every text encoder that reads it will cut it.

    A prompt is cut only past the longest window among the tokenizers that read it (Flux's T5 reads
    512 tokens where its CLIP reads 77). `long_weighting` names a prompt weighting that keeps long
    prompts whole, for the hint.
    """
    for argument in ("prompt", "negative_prompt"):
        cuts: list[tuple[int, int, str]] = []  # (window, tokens, text) of each reader that cuts the text
        whole = False
        for attribute, suffix in _TOKENIZERS:
            tokenizer = getattr(pipeline, attribute, None)
            if tokenizer is None or (attribute == "prior_tokenizer" and argument != "prompt"):
                continue
            text = kwargs.get(f"{argument}{suffix}") if suffix else None
            text = text if isinstance(text, str) else kwargs.get(argument)
            window = _window(tokenizer, kwargs)
            if not isinstance(text, str) or not window:
                continue
            tokens = len(tokenizer(text, truncation=False, add_special_tokens=True, verbose=False).input_ids)
            if tokens <= window:
                whole = True
                break
            cuts.append((window, tokens, text))
        if whole or not cuts:
            continue
        window, count, text = max(cuts)
        dropped = count - window
        words = text.split()
        head = " ".join(words[:6])
        head = head[:60] + (" ..." if len(words) > 6 or len(head) > 60 else "")  # one short line, whatever the text
        hint = f"; prompt_weighting={long_weighting!r} keeps it whole" if long_weighting else ""
        warn(
            PromptTruncatedWarning(
                f"{argument} is {count} tokens, the text encoder reads {window}: the last {dropped} "
                f"tokens are ignored ({argument} starts {head!r}{hint})"
            ),
            stacklevel=5,  # the caller of Engine.generate (via _run and _conditioned)
        )


class _DropTruncationRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "truncated because" not in record.getMessage()


_DROP_TRUNCATION = _DropTruncationRecords()


@contextlib.contextmanager
def quiet_truncation(pipeline: Any) -> Iterator[None]:
    """diffusers logs the whole cut-off text (100 KB for a 100 KB prompt); t2i has already warned."""
    # The pipeline's own module, and those of the pipelines it chains (Kandinsky's prior_pipe, ...).
    pipelines = [pipeline, *(value for value in vars(pipeline).values() if hasattr(value, "components"))]
    loggers = {logging.getLogger(type(each).__module__) for each in pipelines}
    for logger in loggers:
        logger.addFilter(_DROP_TRUNCATION)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_DROP_TRUNCATION)


def _suspects(request: GenerationRequest) -> str:
    """The request's values that scale the model's output, for a flat image's warning."""
    scales = [f"guidance_scale={request.guidance_scale:g}"]
    scales += [f"controls[{i}].scale={control.scale:g}" for i, control in enumerate(request.controls)]
    scales += [f"loras[{i}].scale={lora.scale:g}" for i, lora in enumerate(request.loras)]
    scales += [f"image_prompts[{i}].scale={prompt.scale:g}" for i, prompt in enumerate(request.image_prompts)]
    return ", ".join(scales)


def warn_degenerate(images: list[Any], request: GenerationRequest) -> None:
    for index, image in enumerate(images):
        extrema = image.getextrema()
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        if all(low == high for low, high in bands):
            warn(
                DegenerateImageWarning(
                    f"image {index} is a single flat colour {tuple(low for low, _ in bands)}: the model's output "
                    f"overflowed ({_suspects(request)}; half precision can also overflow)"
                ),
                stacklevel=4,
            )
