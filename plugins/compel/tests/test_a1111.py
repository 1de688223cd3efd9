"""prompt_weighting="a1111": A1111's "Original" emphasis equals an independent implementation of its rules on raw diffusers.

The reference below is written from the rules (AUTOMATIC1111's prompt_parser and sd_hijack_clip),
not from t2i_compel's code: it works on the raw pipeline's tokenizers and text encoders and hands
diffusers ``prompt_embeds``; the SDK image must equal that image bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import GenerationRequest, InvalidRequestError, UnsupportedFeatureError, load
from t2i_core.cli import main
from t2i_core.testing import (
    ConditionerConformance,
    as_array,
    assert_images_equal,
    cpu_generators,
    refuse_to_run,
)

STEPS = 2
# The tiny tokenizers make one token per character, so these run past 75 tokens; the commas
# let A1111 move the words after the last one into the next chunk.
LONG = "a red fox in the snow, an old lighthouse at dusk, a (blue:1.4) kite over the sea, [gloomy] clouds, (gulls)"
# Three chunks, without emphasis (emphasised text this long drives the random tiny weights to NaN).
LONGER = ", ".join(["a red fox in the snow", "an old lighthouse at dusk", "a kite over the sea"] * 5)

# -- the reference: A1111's rules, written out again ------------------------------------------

_CLOSE_WITH_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK_AT = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPED = {"(", ")", "[", "]", "\\"}


def reference_parse(text: str) -> list[tuple[str, float]]:
    """(text, weight) pieces: brackets multiply what they enclose as they close (unclosed ones at the end)."""
    pieces: list[list[Any]] = []  # [text, weight]; a BREAK is ["BREAK", -1.0]
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            following = text[i + 1 : i + 2]
            if following in _ESCAPED:
                pieces.append([following, 1.0])
                i += 2
            else:  # A1111 drops a backslash that escapes nothing
                pieces.append(["", 1.0])
                i += 1
            continue
        closing = _CLOSE_WITH_WEIGHT.match(text, i)
        if char in "([":
            (rounds if char == "(" else squares).append(len(pieces))
            i += 1
        elif closing and rounds:
            scale(rounds.pop(), float(closing.group(1)))
            i = closing.end()
        elif char == ")" and rounds:
            scale(rounds.pop(), 1.1)
            i += 1
        elif char == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
            i += 1
        else:
            run = re.compile(r"[^\\()\[\]:]+|.").match(text, i)
            assert run is not None
            words = _BREAK_AT.split(run.group(0))
            pieces.append([words[0], 1.0])
            for word in words[1:]:
                pieces += [["BREAK", -1.0], [word, 1.0]]
            i = run.end()
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged: list[list[Any]] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, w) for t, w in merged]


def reference_windows(fragments: list[tuple[str, float]], tokenizer: Any) -> list[list[tuple[int, float]]]:
    """The 75-token windows of (token, weight): BREAK ends one; a full window gives up the words after its
    last comma when that comma is within 20 tokens of its end."""
    comma = tokenizer.get_vocab()[",</w>"]
    windows: list[list[tuple[int, float]]] = []
    window: list[tuple[int, float]] = []
    comma_at: int | None = None
    for text, weight in fragments:
        if text == "BREAK" and weight == -1.0:
            windows.append(window)
            window, comma_at = [], None
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(window) == 75:
                if token != comma and comma_at is not None and 75 - comma_at <= 20:
                    windows.append(window[: comma_at + 1])
                    window = window[comma_at + 1 :]
                else:
                    windows.append(window)
                    window = []
                comma_at = None
            elif token == comma:
                comma_at = len(window)
            window.append((token, weight))
    if window or not windows:
        windows.append(window)
    return windows


def reference_encode(pipeline: Any, text: str, *, clip_skip: int = 0, text_2: str | None = None) -> tuple[Any, Any]:
    """Per window and encoder: start + tokens + end, padded (SD 1.x CLIP with its end token, SDXL's OpenCLIP
    with id 0), encoded, weighted per token, scaled back to its mean; windows and encoders concatenated."""
    import torch

    sdxl = hasattr(pipeline, "text_encoder_2")
    encoders = [(pipeline.tokenizer, pipeline.text_encoder)]
    if sdxl:
        encoders.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    outputs, pooled = [], None
    for index, (tokenizer, encoder) in enumerate(encoders):
        pad = 0 if index == 1 else tokenizer.eos_token_id
        assert tokenizer.pad_token_id == pad  # what diffusers pads with too
        states = []
        source = text_2 if index == 1 and text_2 else text  # SDXL's prompt_2 feeds the second encoder
        for window in reference_windows(reference_parse(source), tokenizer):
            ids = [tokenizer.bos_token_id] + [t for t, _ in window] + [tokenizer.eos_token_id]
            weights = [1.0] + [w for _, w in window] + [1.0]
            ids += [pad] * (77 - len(ids))
            weights += [1.0] * (77 - len(weights))
            with torch.no_grad():
                out = encoder(torch.tensor([ids]), output_hidden_states=True)
            if sdxl:
                z = out.hidden_states[-2 - clip_skip]
                pooled = out.text_embeds if pooled is None and index == 1 else pooled
            elif clip_skip:
                z = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-1 - clip_skip])
            else:
                z = out.last_hidden_state
            mean = z.mean()
            z = z * torch.tensor(weights)[None, :, None]
            states.append(z * (mean / z.mean()))
        outputs.append(torch.cat(states, dim=1))
    return torch.cat(outputs, dim=-1), pooled


def reference_kwargs(pipeline: Any, prompt: str, negative: str | None, *, clip_skip: int = 0) -> dict[str, Any]:
    """The call arguments: the shorter of prompt and negative gets the empty prompt's chunks appended
    (A1111's "pad prompt/negative prompt to be same length"); SDXL zeroes a missing negative."""
    import torch

    embeds, pooled = reference_encode(pipeline, prompt, clip_skip=clip_skip)
    if negative is None and hasattr(pipeline, "text_encoder_2"):
        negative_embeds, negative_pooled = torch.zeros_like(embeds[:, :77]), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = reference_encode(pipeline, negative or "", clip_skip=clip_skip)
    empty, _ = reference_encode(pipeline, "", clip_skip=clip_skip)
    while embeds.shape[1] < negative_embeds.shape[1]:
        embeds = torch.cat([embeds, empty], dim=1)
    while negative_embeds.shape[1] < embeds.shape[1]:
        negative_embeds = torch.cat([negative_embeds, empty], dim=1)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs


def raw(pipeline: Any, seed: int, **kwargs: Any) -> list[Any]:
    return list(pipeline(generator=cpu_generators(seed, 1), num_inference_steps=STEPS, **kwargs).images)


def request(prompt: str, **fields: Any) -> GenerationRequest:
    fields.setdefault("prompt_weighting", "a1111")
    fields.setdefault("num_inference_steps", STEPS)
    fields.setdefault("seed", 4)
    return GenerationRequest(prompt=prompt, **fields)


# -- the parser -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # prompt_parser.parse_prompt_attention's doctests
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a: 1.5 ) [b", [("a", 1.5), (" ", 1.0), ("b", 1 / 1.1)]),
    ],
)
def test_parser_gives_a1111s_documented_weights(text: str, expected: list[tuple[str, float]]) -> None:
    from t2i_compel._emphasis import parse

    assert parse(text) == expected
    assert reference_parse(text) == expected


@pytest.mark.parametrize(
    "text", [LONG, "x" * 80 + ", " + "y" * 10, "(a BREAK b)", "BREAK a BREAK BREAK", "", "[[a]:2)"]
)
def test_chunks_equal_the_reference(raw_sd15: Any, text: str) -> None:
    from t2i_compel._a1111 import vocabulary
    from t2i_compel._emphasis import chunks, parse

    tokenizer = raw_sd15.tokenizer
    assert parse(text) == reference_parse(text)
    made = chunks(parse(text), vocabulary(raw_sd15, tokenizer))
    windows = reference_windows(reference_parse(text), tokenizer)
    assert [[t for t in c.ids[1:] if t != tokenizer.eos_token_id] for c in made] == [[t for t, _ in w] for w in windows]
    assert all(len(c.ids) == len(c.weights) == 77 for c in made)


def test_a_long_prompt_is_split_at_its_last_comma(raw_sd15: Any) -> None:
    windows = reference_windows(reference_parse(LONG), raw_sd15.tokenizer)
    comma = raw_sd15.tokenizer.get_vocab()[",</w>"]
    assert len(windows) == 2 and len(windows[0]) < 75 and windows[0][-1][0] == comma


# -- SD 1.x and SDXL against the reference ----------------------------------------------------

PROMPTS = {
    "emphasis": ("a (red:1.3) cat, [blurry] ((sharp)) background", "(ugly:1.2), deformed"),
    "nesting-escapes": (r"a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))). \(literal\) [[dim]]", None),
    "break": ("a red fox BREAK (snow:1.2) forest, [night", "blurry BREAK ugly"),
    "long": (LONG, "(ugly:1.2)"),
    "long-negative": ("a (red:1.3) cat", LONGER),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_sd15_equals_the_reference(sd15_engine: Any, raw_sd15: Any, name: str) -> None:
    prompt, negative = PROMPTS[name]
    result = sd15_engine.generate(request(prompt, negative_prompt=negative, seed=7))
    assert_images_equal(result.images, raw(raw_sd15, 7, **reference_kwargs(raw_sd15, prompt, negative)))


@pytest.fixture(scope="module")
def sdxl_engine() -> Any:
    pytest.importorskip("t2i_sdxl")
    return load("tiny:sdxl", device="cpu")


@pytest.mark.parametrize("name", list(PROMPTS))
def test_sdxl_equals_the_reference(sdxl_engine: Any, raw_sdxl: Any, name: str) -> None:
    prompt, negative = PROMPTS[name]
    result = sdxl_engine.generate(request(prompt, negative_prompt=negative, seed=3))
    assert_images_equal(result.images, raw(raw_sdxl, 3, **reference_kwargs(raw_sdxl, prompt, negative)))


def test_sdxl_second_encoder_prompt(sdxl_engine: Any, raw_sdxl: Any) -> None:
    prompt, style = "a (red:1.3) lighthouse", "an [oil] (painting:1.2)"
    result = sdxl_engine.generate(request(prompt, options={"prompt_2": style}, seed=8))
    embeds, pooled = reference_encode(raw_sdxl, prompt, text_2=style)
    expected = raw(raw_sdxl, 8, prompt_embeds=embeds, pooled_prompt_embeds=pooled)  # the negative: zeros
    assert_images_equal(result.images, expected)
    with pytest.raises(InvalidRequestError) as caught:
        sdxl_engine.generate(request("a cat", options={"prompt_2": "a [cat|dog]"}))
    assert caught.value.field == "options['prompt_2']"


def test_long_prompts_span_chunks_and_the_negative_is_padded(sd15_engine: Any) -> None:
    from t2i_core import Call, get_registry

    conditioner = get_registry().conditioners["a1111"]
    resolved, _ = sd15_engine.resolve(request("a (cat:1.2)", negative_prompt=LONGER))
    call = Call(pipeline=sd15_engine.pipeline, kwargs={"prompt": "a cat", "negative_prompt": LONGER})
    conditioner.condition(sd15_engine, resolved, call)
    assert "prompt" not in call.kwargs and "negative_prompt" not in call.kwargs
    length = call.kwargs["negative_prompt_embeds"].shape[1]
    assert length > 2 * 77 and length % 77 == 0
    assert call.kwargs["prompt_embeds"].shape == call.kwargs["negative_prompt_embeds"].shape


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("Astronaut in a jungle, cold color palette: muted colors, detailed, 8k", None),
        ("Astronaut in a jungle, cold color palette: muted colors, detailed, 8k", "blurry, ugly"),
        # The tiny SD 1.5 encoder's output for this text has a mean of exactly 0: A1111's mean / mean
        # restore would be 0 / 0 (a black image); unweighted text must stay the plain encoding.
        ("a red fox in the snow", None),
    ],
)
def test_a_prompt_without_syntax_is_the_plain_image(
    sd15_engine: Any, sdxl_engine: Any, prompt: str, negative: str | None
) -> None:
    for engine in (sd15_engine, sdxl_engine):
        plain = engine.generate(
            GenerationRequest(prompt=prompt, negative_prompt=negative, seed=5, num_inference_steps=STEPS)
        )
        through_a1111 = engine.generate(request(prompt, negative_prompt=negative, seed=5))
        assert_images_equal(through_a1111.images, plain.images)
        emphasised = engine.generate(
            request(
                prompt.replace("jungle", "(jungle:1.4)").replace("fox", "(fox:1.4)"), negative_prompt=negative, seed=5
            )
        )
        assert not np.array_equal(as_array(emphasised.images[0]), as_array(plain.images[0]))


def test_no_guidance_and_more_images(sd15_engine: Any, raw_sd15: Any) -> None:
    prompt = "a (red:1.3) cat"
    unguided = sd15_engine.generate(request(prompt, guidance_scale=1.0, seed=11))
    embeds, _ = reference_encode(raw_sd15, prompt)
    assert_images_equal(unguided.images, raw(raw_sd15, 11, prompt_embeds=embeds, guidance_scale=1.0))
    two = sd15_engine.generate(request(prompt, num_images=2, seed=11))
    expected = raw_sd15(
        generator=cpu_generators(11, 2), num_images_per_prompt=2, num_inference_steps=STEPS,
        **reference_kwargs(raw_sd15, prompt, None),
    ).images  # fmt: skip
    assert_images_equal(two.images, list(expected))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_the_layer_choice_follows_diffusers_clip_skip(raw_sd15: Any, raw_sdxl: Any, clip_skip: int) -> None:
    import torch
    from t2i_compel._a1111 import EmphasisEncoder

    for pipeline, dual in ((raw_sd15, False), (raw_sdxl, True)):
        if dual and clip_skip == 2:
            continue  # the tiny SDXL encoders have 2 layers: the penultimate, 1 back, is their embeddings
        made = EmphasisEncoder(pipeline, dual=dual).call_kwargs(
            "a (red:1.3) cat", None, guided=False, clip_skip=clip_skip
        )
        expected, _ = reference_encode(pipeline, "a (red:1.3) cat", clip_skip=clip_skip)
        assert torch.equal(made["prompt_embeds"], expected)


def test_the_clip_skip_option_reads_both_prompts_earlier(sd15_engine: Any, raw_sd15: Any) -> None:
    # A1111's "Clip skip 2" = clip_skip 1; unlike diffusers' own clip_skip, A1111 reads the negative there too.
    # (Text whose chunk mean is not ~0: the tiny encoder's final layer norm has no bias, so most means nearly vanish.)
    prompt, negative = "an (old:1.2) lighthouse at dusk", "[blurry], lowres"
    result = sd15_engine.generate(request(prompt, negative_prompt=negative, options={"clip_skip": 1}, seed=6))
    expected = raw(raw_sd15, 6, **reference_kwargs(raw_sd15, prompt, negative, clip_skip=1))
    assert_images_equal(result.images, expected)
    unskipped = sd15_engine.generate(request(prompt, negative_prompt=negative, seed=6))
    assert not np.array_equal(as_array(unskipped.images[0]), as_array(result.images[0]))


# -- refusals and the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "text", "reason"),
    [
        ("prompt", "a [cat:dog:0.5] on a mat", "prompt editing"),
        ("prompt", "a [cat|dog]", "alternation"),
        ("negative_prompt", "ugly AND blurry", "AND"),
        ("prompt", "a (cat:.)", "a weight must be a number"),
    ],
)
def test_syntax_t2i_does_not_run_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch, sd15_engine: Any, field: str, text: str, reason: str
) -> None:
    refuse_to_run(monkeypatch, sd15_engine)
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.generate(request(**{"prompt": "a cat", field: text}))
    assert caught.value.field == field and caught.value.value == text
    assert reason in str(caught.value) and "(word:1.3)" in str(caught.value)


def test_other_families_are_refused_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("t2i_flux")
    engine = load("tiny:flux", device="cpu")
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(UnsupportedFeatureError) as caught:
        engine.generate(request("a (cat:1.3)"))
    assert caught.value.family == "flux" and caught.value.feature == "A1111 prompt emphasis"
    assert "sd15" in str(caught.value) and "sdxl" in str(caught.value)
    assert "a1111" not in engine.state


def test_cli_prompt_weighting_a1111(tmp_path: Path, capsys: pytest.CaptureFixture[str], sd15_engine: Any) -> None:
    prompt = "a (red:1.3) cat, [blurry]"
    out = tmp_path / "a1111.png"
    code = main(
        ["generate", prompt, "--model", "tiny:sd15", "--prompt-weighting", "a1111", "--negative-prompt", "(ugly:1.2)",
         "--steps", str(STEPS), "--seed", "17", "--device", "cpu", "-o", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        image.load()
        text = dict(image.text)  # type: ignore[attr-defined]
        saved = image.convert("RGB")
    assert text["prompt_weighting"] == "a1111" and text["prompt"] == prompt
    expected = sd15_engine.generate(request(prompt, negative_prompt="(ugly:1.2)", seed=17))
    assert_images_equal([saved], expected.images)


class TestA1111Conformance(ConditionerConformance):
    conditioner = "a1111"
    wanted = {"prompt": "Astronaut in a (jungle:1.5), [cold] color palette", "prompt_weighting": "a1111"}
    refused_requests = {
        "prompt": {"prompt": "a [cat:dog:0.5]", "prompt_weighting": "a1111"},
        "negative_prompt": {"prompt": "a cat", "negative_prompt": "ugly AND blurry", "prompt_weighting": "a1111"},
    }

    def reference(self, folder: str, **call_kwargs: Any) -> list[Any]:
        """diffusers called with the reference's embeddings of the prompt and negative prompt."""
        pipeline = self.raw_pipeline(folder)
        embeds = reference_kwargs(pipeline, call_kwargs.pop("prompt"), call_kwargs.pop("negative_prompt", None))
        return list(pipeline(**embeds, **call_kwargs).images)
