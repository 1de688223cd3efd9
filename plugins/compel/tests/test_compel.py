"""t2i-compel: Compel prompt weighting equals diffusers called with Compel-made embeddings, bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import Call, GenerationRequest, InvalidRequestError, UnsupportedFeatureError, get_registry, load
from t2i_core.cli import main
from t2i_core.testing import as_array, assert_images_equal, cpu_generators, refuse_to_run

STEPS = 2
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
WEIGHTED = "Astronaut in a (jungle)1.5, cold color palette--, muted colors++, detailed, 8k"
# The tiny tokenizer makes one token per character: this is far beyond 75 tokens.
LONG = ", ".join(["a red fox in the snow", "an old lighthouse at dusk", "a (blue)1.4 kite over the sea"] * 3)


def compel_for(pipeline: Any, *, truncate: bool = True) -> Any:
    """Compel for SD1.5 as its documentation builds it."""
    from compel import Compel

    return Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, truncate_long_prompts=truncate)


def raw_embeds(pipeline: Any, prompt: str, negative: str = "", *, truncate: bool = True) -> dict[str, Any]:
    """What a user writes: Compel embeddings of the prompt and the negative, padded to one length."""
    compel = compel_for(pipeline, truncate=truncate)
    positive, negative_embeds = compel.pad_conditioning_tensors_to_same_length([compel(prompt), compel(negative)])
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}


def raw(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("num_inference_steps", STEPS)
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


def request(prompt: str, **fields: Any) -> GenerationRequest:
    fields.setdefault("prompt_weighting", "compel")
    fields.setdefault("num_inference_steps", STEPS)
    fields.setdefault("seed", 4)
    return GenerationRequest(prompt=prompt, **fields)


# -- SD1.5 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        WEIGHTED,
        "a cat++ playing with a ball---",
        '("a cat playing in the forest", "an impressionist oil painting").blend(0.7, 0.3)',
        '("a cat playing in the forest", "an impressionist oil painting").and()',
    ],
    ids=["numeric", "plus-minus", "blend", "and"],
)
def test_sd15_matches_raw_diffusers_with_compel_embeds(sd15_engine: Any, raw_sd15: Any, prompt: str) -> None:
    result = sd15_engine.generate(request(prompt, negative_prompt="(ugly)1.3, deformed--", seed=9))
    expected = raw(raw_sd15, 9, **raw_embeds(raw_sd15, prompt, "(ugly)1.3, deformed--"))
    assert_images_equal(result.images, expected)


def test_weighting_changes_the_image_and_plain_text_is_the_plain_path(sd15_engine: Any, raw_sd15: Any) -> None:
    import torch

    plain = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=STEPS))
    through_compel = sd15_engine.generate(request(PROMPT, seed=5))
    weighted = sd15_engine.generate(request(WEIGHTED, seed=5))
    # Compel's embeddings of an unweighted prompt are the pipeline's own, bit for bit ...
    compel = compel_for(raw_sd15)
    with torch.no_grad():
        own, own_negative = raw_sd15.encode_prompt(PROMPT, "cpu", 1, True, None)
    assert torch.equal(compel(PROMPT), own)
    assert torch.equal(compel(""), own_negative)
    # ... so the image is the plain path's, and weighting the same words changes it.
    assert_images_equal(through_compel.images, plain.images)
    assert not np.array_equal(as_array(weighted.images[0]), as_array(plain.images[0]))


def test_no_negative_prompt_means_compel_embeds_of_empty_text(sd15_engine: Any, raw_sd15: Any) -> None:
    result = sd15_engine.generate(request(WEIGHTED, seed=12))
    assert_images_equal(result.images, raw(raw_sd15, 12, **raw_embeds(raw_sd15, WEIGHTED, "")))
    # That is also what diffusers does given only prompt_embeds: it encodes "" itself.
    assert_images_equal(result.images, raw(raw_sd15, 12, prompt_embeds=compel_for(raw_sd15)(WEIGHTED)))


def test_negative_prompt_weighting(sd15_engine: Any, raw_sd15: Any) -> None:
    plain = sd15_engine.generate(request(PROMPT, negative_prompt="blurry, ugly", seed=21))
    weighted = sd15_engine.generate(request(PROMPT, negative_prompt="(blurry)1.6, ugly--", seed=21))
    assert not np.array_equal(as_array(plain.images[0]), as_array(weighted.images[0]))
    assert_images_equal(weighted.images, raw(raw_sd15, 21, **raw_embeds(raw_sd15, PROMPT, "(blurry)1.6, ugly--")))
    # The plain negative through Compel is diffusers' plain negative_prompt.
    assert_images_equal(plain.images, raw(raw_sd15, 21, prompt=PROMPT, negative_prompt="blurry, ugly"))


def test_long_negative_pads_prompt_to_the_same_length(sd15_engine: Any, raw_sd15: Any) -> None:
    conditioner = get_registry().conditioners["compel-long"]
    resolved, _ = sd15_engine.resolve(request("a cat", negative_prompt=LONG, prompt_weighting="compel-long"))
    call = Call(pipeline=sd15_engine.pipeline, kwargs={"prompt": "a cat", "negative_prompt": LONG})
    conditioner.condition(sd15_engine, resolved, call)
    assert "prompt" not in call.kwargs and "negative_prompt" not in call.kwargs
    positive, negative = call.kwargs["prompt_embeds"], call.kwargs["negative_prompt_embeds"]
    assert negative.shape[1] > 77 and negative.shape[1] % 77 == 0
    assert positive.shape == negative.shape
    result = sd15_engine.generate(resolved)
    assert_images_equal(result.images, raw(raw_sd15, 4, **raw_embeds(raw_sd15, "a cat", LONG, truncate=False)))


def test_truncation_warns_and_compel_long_keeps_the_prompt(sd15_engine: Any, raw_sd15: Any) -> None:
    from t2i_compel import PromptTruncatedWarning

    with pytest.warns(PromptTruncatedWarning, match=r"prompt is \d+ tokens long .*prompt_weighting='compel-long'"):
        cut = sd15_engine.generate(request(LONG, seed=8))
    assert_images_equal(cut.images, raw(raw_sd15, 8, **raw_embeds(raw_sd15, LONG)))
    with pytest.warns(PromptTruncatedWarning, match="negative_prompt is"):
        sd15_engine.generate(request("a cat", negative_prompt=LONG, seed=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        whole = sd15_engine.generate(request(LONG, seed=8, prompt_weighting="compel-long"))
        sd15_engine.generate(request(WEIGHTED, seed=8))  # a prompt within the window never warns
    assert_images_equal(whole.images, raw(raw_sd15, 8, **raw_embeds(raw_sd15, LONG, truncate=False)))
    assert not np.array_equal(as_array(whole.images[0]), as_array(cut.images[0]))


def test_compel_is_built_once_per_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from compel import Compel

    built: list[Any] = []
    original_init = Compel.__init__

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Compel, "__init__", counting_init)
    engine = load("tiny:sd15", device="cpu")  # a fresh engine (over the cached weights): empty state
    first = engine.generate(request(WEIGHTED, negative_prompt="ugly--", seed=1))
    encoder = engine.state["compel"]
    second = engine.generate(request("a (dog)1.2", seed=2))
    assert engine.state["compel"] is encoder
    assert len(built) == 1
    assert built[0].conditioning_provider.text_encoder is engine.pipeline.text_encoder
    assert first.images[0].size == second.images[0].size
    other = load("tiny:sd15", device="cpu")
    other.generate(request("a (dog)1.2", seed=2))
    assert other.state["compel"] is not encoder and len(built) == 2


def test_more_images_and_no_guidance(sd15_engine: Any, raw_sd15: Any) -> None:
    two = sd15_engine.generate(request(WEIGHTED, negative_prompt="ugly", num_images=2, seed=30))
    assert_images_equal(two.images, raw(raw_sd15, 30, count=2, **raw_embeds(raw_sd15, WEIGHTED, "ugly")))
    unguided = sd15_engine.generate(request(WEIGHTED, guidance_scale=1.0, seed=30))
    embeds = compel_for(raw_sd15)(WEIGHTED)
    assert_images_equal(unguided.images, raw(raw_sd15, 30, prompt_embeds=embeds, guidance_scale=1.0))


@pytest.mark.parametrize(
    ("field", "text", "reason"),
    [
        ("prompt", "a cat.swap(dog)", ".swap()"),
        ("prompt", '("a cat", "a dog").blend(heavy, light)', "ValueError"),
        ("negative_prompt", "ugly withLora(detail, 0.5)", "withLora()"),
    ],
)
def test_unsupported_syntax_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch, sd15_engine: Any, field: str, text: str, reason: str
) -> None:
    refuse_to_run(monkeypatch, sd15_engine)
    fields = {"prompt": "a cat", field: text}
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.generate(request(**fields))
    assert caught.value.field == field and caught.value.value == text
    assert reason in str(caught.value) and "(word)1.3" in str(caught.value)


def test_cli_weighting_compel(tmp_path: Path, capsys: pytest.CaptureFixture[str], sd15_engine: Any) -> None:
    out = tmp_path / "weighted.png"
    code = main(
        ["generate", WEIGHTED, "--model", "tiny:sd15", "--weighting", "compel", "--negative-prompt", "ugly--",
         "--steps", str(STEPS), "--seed", "17", "--device", "cpu", "-o", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        image.load()
        text = dict(image.text)  # type: ignore[attr-defined]
        saved = image.convert("RGB")
    assert text["prompt_weighting"] == "compel" and text["prompt"] == WEIGHTED
    expected = sd15_engine.generate(request(WEIGHTED, negative_prompt="ugly--", seed=17))
    assert_images_equal([saved], expected.images)

    bad = tmp_path / "bad.png"
    code = main(
        ["generate", "a cat.swap(dog)", "--model", "tiny:sd15", "--weighting", "compel", "--device", "cpu", "-o", str(bad)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "prompt='a cat.swap(dog)'" in err and "Traceback" not in err
    assert not bad.exists()


def test_compel_with_a_controlnet(sd15_engine: Any) -> None:
    pytest.importorskip("t2i_controlnet")
    from t2i_core import Control

    pattern = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    controls = (Control(image=Image.fromarray(pattern), model="tiny:controlnet-sd15"),)
    plain = sd15_engine.generate(GenerationRequest(prompt=PROMPT, controls=controls, seed=2, num_inference_steps=STEPS))
    through_compel = sd15_engine.generate(request(PROMPT, controls=controls, seed=2))
    weighted = sd15_engine.generate(request(WEIGHTED, controls=controls, seed=2))
    assert_images_equal(through_compel.images, plain.images)
    assert not np.array_equal(as_array(weighted.images[0]), as_array(plain.images[0]))


def test_families_without_embeddings_are_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("t2i_kandinsky22")
    engine = load("tiny:kandinsky22", device="cpu")
    refuse_to_run(monkeypatch, engine)
    for weighting in ("compel", "compel-long"):
        with pytest.raises(UnsupportedFeatureError) as caught:
            engine.generate(request("a (cat)1.3", prompt_weighting=weighting))
        assert caught.value.family == "kandinsky22" and caught.value.feature == "Compel prompt weighting"
        assert "sd15" in str(caught.value) and "sdxl" in str(caught.value)
    assert not engine.state


# -- SDXL ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_engine() -> Any:
    pytest.importorskip("t2i_sdxl")
    return load("tiny:sdxl", device="cpu")


def sdxl_compel(pipeline: Any) -> Any:
    """Compel for SDXL as its README builds it: both encoders, penultimate states, pooled from the second."""
    import contextlib
    import io

    from compel import Compel, ReturnedEmbeddingsType

    with contextlib.redirect_stdout(io.StringIO()):  # compel prints a deprecation notice for the list form
        return Compel(
            tokenizer=[pipeline.tokenizer, pipeline.tokenizer_2],
            text_encoder=[pipeline.text_encoder, pipeline.text_encoder_2],
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=[False, True],
        )


def test_sdxl_matches_raw_diffusers_with_compel_embeds(sdxl_engine: Any, raw_sdxl: Any) -> None:
    negative = "(blurry)1.4, ugly--"
    result = sdxl_engine.generate(request(WEIGHTED, negative_prompt=negative, seed=6))
    compel = sdxl_compel(raw_sdxl)
    embeds, pooled = compel(WEIGHTED)
    negative_embeds, negative_pooled = compel(negative)
    expected = raw(
        raw_sdxl, 6, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled,
    )  # fmt: skip
    assert_images_equal(result.images, expected)
    plain_negative = sdxl_engine.generate(request(WEIGHTED, negative_prompt="blurry, ugly", seed=6))
    assert not np.array_equal(as_array(plain_negative.images[0]), as_array(result.images[0]))


def test_sdxl_without_negative_and_plain_text(sdxl_engine: Any, raw_sdxl: Any) -> None:
    # No negative prompt: the SDXL pipeline zeroes the negative (force_zeros_for_empty_prompt), as it does
    # when given only Compel's prompt_embeds and pooled embeds.
    assert raw_sdxl.config.force_zeros_for_empty_prompt
    weighted = sdxl_engine.generate(request(WEIGHTED, seed=3))
    embeds, pooled = sdxl_compel(raw_sdxl)(WEIGHTED)
    assert_images_equal(weighted.images, raw(raw_sdxl, 3, prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    # An unweighted prompt through Compel is the plain path, with and without a negative prompt.
    for negative in (None, "blurry, ugly"):
        plain = sdxl_engine.generate(
            GenerationRequest(prompt=PROMPT, negative_prompt=negative, seed=3, num_inference_steps=STEPS)
        )
        through_compel = sdxl_engine.generate(request(PROMPT, negative_prompt=negative, seed=3))
        assert_images_equal(through_compel.images, plain.images)
    assert not np.array_equal(as_array(weighted.images[0]), as_array(plain.images[0]))


def test_sdxl_long_prompt_and_padding(sdxl_engine: Any, raw_sdxl: Any) -> None:
    from compel import CompelForSDXL
    from t2i_compel import PromptTruncatedWarning

    result = sdxl_engine.generate(request(LONG, negative_prompt="ugly", seed=2, prompt_weighting="compel-long"))
    conditioning = CompelForSDXL(raw_sdxl)(LONG, negative_prompt="ugly")  # compel's own SDXL wrapper keeps it whole
    assert conditioning.embeds.shape[1] > 77 and conditioning.embeds.shape == conditioning.negative_embeds.shape
    expected = raw(
        raw_sdxl, 2, prompt_embeds=conditioning.embeds, pooled_prompt_embeds=conditioning.pooled_embeds,
        negative_prompt_embeds=conditioning.negative_embeds,
        negative_pooled_prompt_embeds=conditioning.negative_pooled_embeds,
    )  # fmt: skip
    assert_images_equal(result.images, expected)
    with pytest.warns(PromptTruncatedWarning):
        cut = sdxl_engine.generate(request(LONG, negative_prompt="ugly", seed=2))
    assert not np.array_equal(as_array(cut.images[0]), as_array(result.images[0]))


def test_sdxl_second_encoder_prompts(sdxl_engine: Any, raw_sdxl: Any) -> None:
    from compel import CompelForSDXL

    style, negative_style = "an (oil painting)1.3", "photo--"
    options = {"prompt_2": style, "negative_prompt_2": negative_style}
    result = sdxl_engine.generate(request(WEIGHTED, negative_prompt="ugly", options=options, seed=10))
    # compel's own SDXL wrapper: the style prompt feeds the second encoder and the pooled embeddings.
    conditioning = CompelForSDXL(raw_sdxl)(
        WEIGHTED, style_prompt=style, negative_prompt="ugly", negative_style_prompt=negative_style
    )
    expected = raw(
        raw_sdxl, 10, prompt_embeds=conditioning.embeds, pooled_prompt_embeds=conditioning.pooled_embeds,
        negative_prompt_embeds=conditioning.negative_embeds,
        negative_pooled_prompt_embeds=conditioning.negative_pooled_embeds,
    )  # fmt: skip
    assert_images_equal(result.images, expected)
    # Unweighted second-encoder prompts through Compel are diffusers' own prompt_2 path.
    plain_options = {"prompt_2": "an oil painting", "negative_prompt_2": "photo"}
    plain = sdxl_engine.generate(
        GenerationRequest(
            prompt=PROMPT, negative_prompt="ugly", options=plain_options, seed=10, num_inference_steps=STEPS
        )
    )
    through_compel = sdxl_engine.generate(request(PROMPT, negative_prompt="ugly", options=plain_options, seed=10))
    assert_images_equal(through_compel.images, plain.images)
    with pytest.raises(InvalidRequestError) as caught:
        sdxl_engine.generate(request("a cat", options={"prompt_2": "a cat.swap(dog)"}))
    assert caught.value.field == "options['prompt_2']"


def test_sdxl_weighted_and(sdxl_engine: Any, raw_sdxl: Any) -> None:
    import torch
    from compel import Compel, ReturnedEmbeddingsType

    prompt = '("a cat playing in the forest", "an impressionist oil painting").and(1, 0.6)'
    result = sdxl_engine.generate(request(prompt, negative_prompt="ugly", seed=5))
    # Compel with requires_pooled fails on a weighted .and(), so the pooled embeddings are asked for apart.
    penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    first = Compel(
        tokenizer=raw_sdxl.tokenizer, text_encoder=raw_sdxl.text_encoder, returned_embeddings_type=penultimate
    )
    second = Compel(
        tokenizer=raw_sdxl.tokenizer_2, text_encoder=raw_sdxl.text_encoder_2, returned_embeddings_type=penultimate
    )
    with torch.no_grad():
        pooled = second.conditioning_provider.get_pooled_embeddings([prompt])
        negative_pooled = second.conditioning_provider.get_pooled_embeddings(["ugly"])
    padded = [c.pad_conditioning_tensors_to_same_length([c(prompt), c("ugly")]) for c in (first, second)]
    embeds, negative_embeds = (torch.cat([padded[0][i], padded[1][i]], dim=-1) for i in (0, 1))
    assert embeds.shape[1] == 2 * 77 and negative_embeds.shape == embeds.shape
    expected = raw(
        raw_sdxl, 5, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled,
    )  # fmt: skip
    assert_images_equal(result.images, expected)
    unweighted = sdxl_engine.generate(request(prompt.replace("(1, 0.6)", "()"), negative_prompt="ugly", seed=5))
    assert not np.array_equal(as_array(unweighted.images[0]), as_array(result.images[0]))


@pytest.mark.parametrize("text", ["()1.3", "()", "( )1.5", '("a", "b").blend(-1, 1)', '("a", "b").blend(0, 0)'])
def test_prompts_with_nothing_to_encode_are_refused(text: str) -> None:
    from t2i_core import InvalidRequestError, load

    engine = load("tiny:sd15", device="cpu")
    for field in ("prompt", "negative_prompt"):
        fields = {"prompt": "a cat", field: text}
        with pytest.raises(InvalidRequestError) as caught:
            engine.generate(GenerationRequest(prompt_weighting="compel", seed=1, num_inference_steps=1, **fields))
        assert caught.value.field == field and caught.value.value == text
