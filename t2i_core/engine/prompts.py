"""What the engine says about prompts and images: truncated prompts, flat images.

One short warning per prompt the text encoder will cut (instead of diffusers' log line quoting
the whole text), and one per image that came out a single flat colour.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from ..request import GenerationRequest


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder reads; the rest of it has no effect."""


class DegenerateImageWarning(UserWarning):
    """An image came out a single flat colour: usually an overflow (guidance, half precision)."""


#: (tokenizer attribute, the pipeline argument it reads)
_TOKENIZED = (("tokenizer", "prompt"), ("tokenizer", "negative_prompt"), ("prior_tokenizer", "prompt"))


def warn_truncated_prompts(pipeline: Any, kwargs: dict[str, Any], long_weighting: str | None = None) -> None:
    """Warn, in one short line per prompt, when a text encoder will cut a prompt.

    `long_weighting` names a prompt weighting that keeps long prompts whole, for the hint.
    """
    warned: set[str] = set()
    for attribute, argument in _TOKENIZED:
        tokenizer = getattr(pipeline, attribute, None)
        text = kwargs.get(argument)
        if tokenizer is None or not isinstance(text, str) or argument in warned:
            continue
        window = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if not 0 < window < 100_000:
            continue
        ids = tokenizer(text, truncation=False, add_special_tokens=True, verbose=False).input_ids
        if len(ids) <= window:
            continue
        dropped = len(ids) - window
        words = text.split()
        head = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
        hint = f"; prompt_weighting={long_weighting!r} keeps it whole" if long_weighting else ""
        warnings.warn(
            PromptTruncatedWarning(
                f"{argument} is {len(ids)} tokens, the text encoder reads {window}: the last {dropped} "
                f"tokens are ignored ({argument} starts {head!r}{hint})"
            ),
            stacklevel=5,  # the caller of Engine.generate (via _run and _conditioned)
        )
        warned.add(argument)


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


def warn_degenerate(images: list[Any], request: GenerationRequest) -> None:
    for index, image in enumerate(images):
        extrema = image.getextrema()
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        if all(low == high for low, high in bands):
            warnings.warn(
                DegenerateImageWarning(
                    f"image {index} is a single flat colour {tuple(low for low, _ in bands)}: the model's output "
                    f"overflowed (guidance_scale={request.guidance_scale:g}; half precision can also overflow)"
                ),
                stacklevel=4,
            )
