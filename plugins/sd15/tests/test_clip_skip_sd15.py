"""Option ``clip_skip`` on SD 1.x: the SDK's images equal raw diffusers given the prompt embeddings that
diffusers' ``clip_skip`` defines, bit for bit.

diffusers' own SD 1.x ``clip_skip`` reads ``text_encoder.text_model.final_layer_norm``, which
transformers 5.6 removed; the reference here is diffusers' formula written out independently
(``hidden_states[-(clip_skip + 1)]``, then the final layer norm) and handed to the pipeline as
``prompt_embeds``. Where diffusers' own path works (transformers < 5.6), it is compared too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import GenerationRequest, InvalidRequestError, UnsupportedFeatureError
from t2i_core.testing import as_array, assert_images_equal, cpu_generators, run_cli

STEPS = 3
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
NEGATIVE = "ugly, deformed"


def skipped_embeds(pipeline: Any, prompt: str, clip_skip: int) -> Any:
    """diffusers' SD 1.x ``clip_skip`` prompt embeddings, written out from its definition."""
    import torch

    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    # transformers < 5.6 keeps the layers in .text_model; 5.6 flattened CLIPTextModel
    norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else encoder.final_layer_norm
    with torch.no_grad():
        hidden_states = encoder(ids, output_hidden_states=True).hidden_states
        assert len(hidden_states) == encoder.config.num_hidden_layers + 1  # the embeddings, then each layer
        return norm(hidden_states[-(clip_skip + 1)])


def raw(pipeline: Any, seed: int, count: int, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("num_inference_steps", STEPS)
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_diffusers_definition(sd15_engine: Any, raw_sd15: Any, clip_skip: int) -> None:
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=21,
        num_images=2,
        num_inference_steps=STEPS,
        options={"clip_skip": clip_skip},
    )
    result = sd15_engine.generate(request)
    embeds = skipped_embeds(raw_sd15, PROMPT, clip_skip)
    reference = raw(raw_sd15, 21, 2, prompt_embeds=embeds, negative_prompt=NEGATIVE)
    assert_images_equal(result.images, reference, "raw diffusers with clip-skipped prompt_embeds")
    if hasattr(raw_sd15.text_encoder, "text_model"):  # diffusers' own path works on this transformers
        assert_images_equal(
            result.images, raw(raw_sd15, 21, 2, prompt=PROMPT, negative_prompt=NEGATIVE, clip_skip=clip_skip)
        )
    plain = sd15_engine.generate(request.evolve(options={}))
    assert not np.array_equal(as_array(plain.images[0]), as_array(result.images[0]))


def test_clip_skips_differ_and_zero_is_the_plain_image(sd15_engine: Any) -> None:
    def image(options: dict[str, Any]) -> Any:
        request = GenerationRequest(prompt=PROMPT, seed=4, num_inference_steps=STEPS, options=options)
        return as_array(sd15_engine.generate(request).images[0])

    plain = image({})
    assert np.array_equal(image({"clip_skip": 0}), plain)
    assert not np.array_equal(image({"clip_skip": 1}), image({"clip_skip": 2}))


@pytest.mark.parametrize("bad", [-1, "two", 1.5, True, 3])
def test_bad_values_are_refused_naming_the_option(sd15_engine: Any, bad: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.resolve(GenerationRequest(prompt=PROMPT, options={"clip_skip": bad}))
    assert caught.value.field == "options['clip_skip']"
    # The tiny checkpoint's text encoder has 2 layers: 3 is past its token embeddings.
    expected = "an integer in [0, 2]" if bad == 3 and not isinstance(bad, bool) else "integer >= 0"
    assert expected in str(caught.value), caught.value


def test_compel_weighting_is_refused_with_clip_skip(sd15_engine: Any) -> None:
    request = GenerationRequest(prompt="a (red)1.3 cat", prompt_weighting="compel", options={"clip_skip": 1})
    with pytest.raises(UnsupportedFeatureError, match=r"clip_skip.*compel"):
        sd15_engine.resolve(request)


def test_the_cli_option_and_from_make_the_same_image(sd15_engine: Any, tmp_path: Path) -> None:
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--steps", "2", "--seed", "9", "--device", "cpu"]
    code, _out, err = run_cli(
        "generate", "a red cat", "--model", "tiny:sd15", *common, "--option", "clip_skip=2", "-o", str(first)
    )
    assert code == 0, err
    code, _out, err = run_cli("generate", "--from", str(first), "--device", "cpu", "-o", str(again))
    assert code == 0, err
    with Image.open(first) as made, Image.open(again) as remade:
        assert made.text["option.clip_skip"] == "2"  # type: ignore[attr-defined]
        assert remade.text == made.text  # type: ignore[attr-defined]
        images = [made.convert("RGB")], [remade.convert("RGB")]
    assert_images_equal(images[1], images[0], "the first image")
    sdk = sd15_engine.generate(
        GenerationRequest(prompt="a red cat", seed=9, num_inference_steps=2, options={"clip_skip": 2})
    )
    assert_images_equal(images[0], sdk.images, "the SDK's image")


def test_the_cli_refuses_a_bad_clip_skip_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    code, _out, err = run_cli(
        "generate", "a red cat", "--model", "tiny:sd15", "--option", "clip_skip=-1", "-o", str(out)
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "options['clip_skip']" in err and "-1" in err
    assert not out.exists()
