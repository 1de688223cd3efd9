"""Option ``clip_skip`` on SDXL: the SDK's images equal raw diffusers' ``clip_skip`` and raw diffusers given
the prompt embeddings diffusers' formula defines (``hidden_states[-(clip_skip + 2)]`` of both encoders), bit for bit.

The tiny checkpoint's encoders have 2 layers, which leaves room for clip_skip 1 only; a copy with
deeper encoders (4 and 5 layers) runs clip_skip 2 as well.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from t2i_core import GenerationRequest, InvalidRequestError, UnsupportedFeatureError, load
from t2i_core.testing import as_array, assert_images_equal, cpu_generators, raw_pipeline, run_cli

STEPS = 3
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
PROMPT_2 = "an oil painting"
NEGATIVE = "ugly, deformed"


@pytest.fixture(scope="module")
def deep_folder(sdxl_folder: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny:sdxl with seeded random text encoders of 4 and 5 layers."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    encoders = {}
    for name, layers in (("text_encoder", 4), ("text_encoder_2", 5)):
        encoder = getattr(pipeline, name)
        config = copy.deepcopy(encoder.config)
        config.num_hidden_layers = layers
        torch.manual_seed(layers)
        encoders[name] = type(encoder)(config)
    pipeline.register_modules(**encoders)
    folder = tmp_path_factory.mktemp("sdxl-deep-encoders")
    pipeline.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def deep_engine(deep_folder: str) -> Any:
    return load(deep_folder, device="cpu")


@pytest.fixture(scope="module")
def raw_deep(deep_folder: str) -> Any:
    return raw_pipeline(deep_folder)


def skipped_embeds(pipeline: Any, prompt: str, prompt_2: str, clip_skip: int) -> tuple[Any, Any]:
    """diffusers' SDXL ``clip_skip`` prompt embeddings and pooled embeddings, written out from its definition."""
    import torch

    layers = []
    for text, tokenizer, encoder in (
        (prompt, pipeline.tokenizer, pipeline.text_encoder),
        (prompt_2, pipeline.tokenizer_2, pipeline.text_encoder_2),
    ):
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
        assert len(output.hidden_states) == encoder.config.num_hidden_layers + 1
        layers.append(output.hidden_states[-(clip_skip + 2)])
    return torch.cat(layers, dim=-1), output.text_embeds


def raw(pipeline: Any, seed: int, count: int, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("num_inference_steps", STEPS)
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


@pytest.mark.parametrize(("clip_skip", "prompt_2"), [(1, None), (2, None), (2, PROMPT_2)])
def test_clip_skip_equals_diffusers(deep_engine: Any, raw_deep: Any, clip_skip: int, prompt_2: str | None) -> None:
    options: dict[str, Any] = {"clip_skip": clip_skip}
    if prompt_2 is not None:
        options["prompt_2"] = prompt_2
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=13, num_images=2, num_inference_steps=STEPS, options=options
    )
    result = deep_engine.generate(request)
    embeds, pooled = skipped_embeds(raw_deep, PROMPT, prompt_2 or PROMPT, clip_skip)
    reference = raw(raw_deep, 13, 2, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt=NEGATIVE)
    assert_images_equal(result.images, reference, "raw diffusers with clip-skipped prompt_embeds")
    # diffusers' own SDXL clip_skip does not touch the layer norm, so it runs on every transformers.
    extra = {} if prompt_2 is None else {"prompt_2": prompt_2}
    own = raw(raw_deep, 13, 2, prompt=PROMPT, negative_prompt=NEGATIVE, clip_skip=clip_skip, **extra)
    assert_images_equal(result.images, own, "raw diffusers' clip_skip")
    plain = deep_engine.generate(request.evolve(options={k: v for k, v in options.items() if k != "clip_skip"}))
    assert not np.array_equal(as_array(plain.images[0]), as_array(result.images[0]))


def test_clip_skip_on_the_tiny_checkpoint(raw_sdxl: Any) -> None:
    engine = load("tiny:sdxl", device="cpu")
    request = GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=STEPS, options={"clip_skip": 1})
    result = engine.generate(request)
    assert_images_equal(result.images, raw(raw_sdxl, 5, 1, prompt=PROMPT, clip_skip=1))
    assert np.array_equal(
        as_array(engine.generate(request.evolve(options={"clip_skip": 0})).images[0]),
        as_array(engine.generate(request.evolve(options={})).images[0]),
    )
    # Its encoders have 2 layers, and SDXL starts from the penultimate: 2 would be past the embeddings.
    with pytest.raises(InvalidRequestError, match=r"an integer in \[0, 1\]") as caught:
        engine.resolve(request.evolve(options={"clip_skip": 2}))
    assert caught.value.field == "options['clip_skip']"


@pytest.mark.parametrize("bad", [-1, "two", 2.0, 4])
def test_bad_values_are_refused_naming_the_option(deep_engine: Any, bad: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        deep_engine.resolve(GenerationRequest(prompt=PROMPT, options={"clip_skip": bad}))
    assert caught.value.field == "options['clip_skip']"
    # The smaller encoder has 4 layers: at most 3 before SDXL's penultimate one.
    expected = "an integer in [0, 3]" if bad == 4 and isinstance(bad, int) else "integer >= 0"
    assert expected in str(caught.value), caught.value


def test_refused_with_compel_and_with_the_refiner(deep_engine: Any) -> None:
    with pytest.raises(UnsupportedFeatureError, match=r"clip_skip.*compel"):
        deep_engine.resolve(GenerationRequest(prompt="a cat", prompt_weighting="compel", options={"clip_skip": 1}))
    with pytest.raises(UnsupportedFeatureError, match="refiner together with options\\['clip_skip'\\]"):
        deep_engine.resolve(GenerationRequest(prompt="a cat", options={"clip_skip": 1, "refiner": "tiny:sdxl-refiner"}))


def test_t2i_plugins_lists_the_option_for_both_families() -> None:
    code, out, err = run_cli("plugins")
    assert code == 0, err
    for family in ("sd15", "sdxl"):
        lines = out.split(f"\n  {family}: ", 1)[1].splitlines()[1:]
        section = "\n".join(line for line in _until_next_family(lines))
        assert "--option clip_skip=...  (integer >= 0; default None)" in section, section


def _until_next_family(lines: list[str]) -> list[str]:
    """The indented lines that follow a family's line of ``t2i plugins``, up to the next family."""
    kept = []
    for line in lines:
        if not line.startswith("    "):
            break
        kept.append(line)
    return kept
