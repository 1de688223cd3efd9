"""t2i-kandinsky22: SDK images equal raw diffusers' bit for bit, combined and decoder-only (CONTRACT.md)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import tiny_folder

from t2i_core import (
    Conditioner,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedFeatureError,
    hookimpl,
    load,
)
from t2i_core.testing import as_array, assert_images_equal, cpu_generators, raw_pipeline, refuse_to_run

STEPS = 3
PRIOR_STEPS = 3
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
NEGATIVE = "ugly, deformed"
DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"


@pytest.fixture(scope="module")
def k22_folder() -> str:
    return tiny_folder("kandinsky22")


@pytest.fixture(scope="module")
def raw_k22(k22_folder: str) -> Any:
    return raw_pipeline(k22_folder)


@pytest.fixture(scope="module")
def engine() -> Any:
    return load("tiny:kandinsky22", device="cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, k22_folder: str) -> SimpleNamespace:
    """The tiny checkpoint as a prior folder and two decoder-only folders, one whose model card names the prior."""
    from diffusers import KandinskyV22CombinedPipeline

    combined = KandinskyV22CombinedPipeline.from_pretrained(k22_folder)
    root = tmp_path_factory.mktemp("kandinsky22-split")
    combined.prior_pipe.save_pretrained(root / "prior")
    combined.decoder_pipe.save_pretrained(root / "decoder")
    combined.decoder_pipe.save_pretrained(root / "decoder-with-card")
    card = f"---\nprior:\n- {root / 'prior'}\n---\n\nA decoder whose model card names its prior.\n"
    (root / "decoder-with-card" / "README.md").write_text(card)
    # The split folders hold the combined checkpoint's weight files byte for byte: pipelines loaded
    # from either place the same weights the same way in memory, so their images compare bit for bit.
    for part, prefix in (("prior", "prior_"), ("decoder", "")):
        for saved in (root / part).rglob("*.safetensors"):
            original = Path(k22_folder) / (prefix + saved.parent.name) / saved.name
            assert saved.read_bytes() == original.read_bytes(), f"{saved} is not {original}"
    return SimpleNamespace(
        prior=str(root / "prior"), decoder=str(root / "decoder"), carded=str(root / "decoder-with-card")
    )


@pytest.fixture(scope="module")
def raw_split(split: SimpleNamespace) -> Any:
    """diffusers' own pairing: the auto pipeline loads the prior that the decoder's model card names."""
    from diffusers import KandinskyV22CombinedPipeline

    pipeline = raw_pipeline(split.carded)
    assert isinstance(pipeline, KandinskyV22CombinedPipeline)
    return pipeline


def native(pipeline: Any) -> int:
    """The tiny checkpoint's size, by diffusers' own MoVQ factor."""
    return int(pipeline.unet.config.sample_size * pipeline.decoder_pipe.movq_scale_factor)


def raw(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("prior_num_inference_steps", PRIOR_STEPS)
    kwargs.setdefault("height", native(pipeline))  # diffusers' default is 512 whatever the checkpoint
    kwargs.setdefault("width", native(pipeline))
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


def request(**changes: Any) -> GenerationRequest:
    options = {"prior_num_inference_steps": PRIOR_STEPS, **changes.pop("options", {})}
    changes.setdefault("prompt", PROMPT)
    changes.setdefault("num_inference_steps", STEPS)
    return GenerationRequest(options=options, **changes)


def differs(first: Any, second: Any) -> bool:
    return not np.array_equal(as_array(first), as_array(second))


# -- the combined checkpoint -------------------------------------------------------------------


def test_explicit_seed(engine: Any, raw_k22: Any) -> None:
    result = engine.generate(request(seed=31))
    assert result.seeds == [31] and result.family == "kandinsky22"
    assert_images_equal(result.images, raw(raw_k22, 31))


def test_prompt_and_negative_prompt(engine: Any, raw_k22: Any) -> None:
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=7))
    assert_images_equal(result.images, raw(raw_k22, 7, negative_prompt=NEGATIVE))
    plain = engine.generate(request(seed=7))
    assert differs(plain.images[0], result.images[0])


def test_guidance_scale_and_non_square_size(engine: Any, raw_k22: Any) -> None:
    result = engine.generate(request(guidance_scale=2.5, height=48, width=80, seed=11))
    assert result.images[0].size == (80, 48)
    assert_images_equal(result.images, raw(raw_k22, 11, guidance_scale=2.5, height=48, width=80))


def test_two_images_match_batched_call_and_lone_runs(engine: Any, raw_k22: Any) -> None:
    result = engine.generate(request(seed=100, num_images=2))
    assert result.seeds == [100, 101]
    assert_images_equal(result.images, raw(raw_k22, 100, count=2))
    for index, seed in enumerate(result.seeds):
        lone = engine.generate(request(seed=seed))
        difference = np.abs(as_array(result.images[index]) - as_array(lone.images[0]))
        assert difference.max() <= 1, f"image {index} is {difference.max()} levels from a lone run with seed {seed}"


def test_two_images_with_a_negative_prompt_are_their_lone_runs(engine: Any, raw_k22: Any) -> None:
    # diffusers' prior batches the negative prompt with the prompt, so n generators cannot seed
    # its 2n rows: the batched raw call fails, and the SDK makes each image as its lone run does.
    with pytest.raises(IndexError):
        raw(raw_k22, 40, count=2, negative_prompt=NEGATIVE)
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=40, num_images=2))
    assert result.seeds == [40, 41]
    lone_runs = [raw(raw_k22, seed, negative_prompt=NEGATIVE)[0] for seed in result.seeds]
    assert_images_equal(result.images, lone_runs)
    assert differs(result.images[0], result.images[1])


def test_random_seed_is_reported_and_reproduces(engine: Any, raw_k22: Any) -> None:
    first = engine.generate(request())
    (seed,) = first.seeds
    assert first.request.seed == seed
    assert_images_equal(first.images, raw(raw_k22, seed))
    again = engine.generate(request(seed=seed))
    assert_images_equal(again.images, first.images)


@pytest.mark.parametrize(("steps", "guidance"), [(2, 1.0), (4, 7.5)])
def test_prior_options(engine: Any, raw_k22: Any, steps: int, guidance: float) -> None:
    options = {"prior_num_inference_steps": steps, "prior_guidance_scale": guidance}
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=9, options=options))
    expected = raw(raw_k22, 9, negative_prompt=NEGATIVE, **options)
    assert_images_equal(result.images, expected)
    default = engine.generate(request(negative_prompt=NEGATIVE, seed=9))
    assert differs(default.images[0], result.images[0])


def test_option_values_given_as_command_line_text(engine: Any, raw_k22: Any) -> None:
    options = {"prior_num_inference_steps": "2", "prior_guidance_scale": "6"}
    result = engine.generate(request(seed=13, options=options))
    assert_images_equal(result.images, raw(raw_k22, 13, prior_num_inference_steps=2, prior_guidance_scale=6.0))


def test_defaults_are_diffusers_defaults(engine: Any) -> None:
    from diffusers import KandinskyV22CombinedPipeline

    parameters = inspect.signature(KandinskyV22CombinedPipeline.__call__).parameters
    resolved, options = engine.resolve(GenerationRequest(prompt=PROMPT))
    assert resolved.num_inference_steps == parameters["num_inference_steps"].default
    assert resolved.guidance_scale == parameters["guidance_scale"].default
    assert options["prior_num_inference_steps"] == parameters["prior_num_inference_steps"].default
    assert options["prior_guidance_scale"] == parameters["prior_guidance_scale"].default
    assert options["prior"] is None


def test_native_size_is_the_unets_latent_size_in_pixels(engine: Any, raw_k22: Any) -> None:
    resolved, _ = engine.resolve(GenerationRequest(prompt=PROMPT))
    assert (resolved.height, resolved.width) == (native(raw_k22), native(raw_k22))
    # The real decoder's UNet (64 latent cells) and MoVQ (four blocks) give diffusers' own default.
    from diffusers import KandinskyV22CombinedPipeline

    parameters = inspect.signature(KandinskyV22CombinedPipeline.__call__).parameters
    real = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)),
        movq=SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 256, 512])),
    )
    expected = (parameters["height"].default, parameters["width"].default)
    assert engine.provider.native_size(real) == expected


def test_progress_counts_decoder_steps(engine: Any, raw_k22: Any) -> None:
    steps: list[tuple[int, int]] = []
    result = engine.generate(request(seed=2), progress=lambda step, total: steps.append((step, total)))
    assert steps == [(step, STEPS) for step in range(1, STEPS + 1)]
    assert_images_equal(result.images, raw(raw_k22, 2))
    # Two images with a negative prompt are two runs: one count across both.
    steps.clear()
    engine.generate(request(seed=2, negative_prompt=NEGATIVE, num_images=2), progress=lambda s, t: steps.append((s, t)))
    assert steps == [(step, 2 * STEPS) for step in range(1, 2 * STEPS + 1)]


def test_scheduler_choice_replaces_the_decoders(engine: Any, raw_k22: Any) -> None:
    from diffusers import DDIMScheduler

    result = engine.generate(request(seed=4, scheduler="ddim"))
    original = raw_k22.decoder_pipe.scheduler
    raw_k22.decoder_pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        expected = raw(raw_k22, 4)
    finally:
        raw_k22.decoder_pipe.scheduler = original
    assert_images_equal(result.images, expected)
    default = engine.generate(request(seed=4))
    assert differs(default.images[0], result.images[0])
    assert_images_equal(default.images, raw(raw_k22, 4))


def test_engine_cache_shares_weights_not_schedulers(engine: Any) -> None:
    other = load("tiny:kandinsky22", device="cpu")
    assert other.pipeline is not engine.pipeline
    assert other.pipeline.unet is engine.pipeline.unet
    assert other.pipeline.prior_prior is engine.pipeline.prior_prior
    assert other.pipeline.decoder_pipe.scheduler is not engine.pipeline.decoder_pipe.scheduler
    assert other.pipeline.prior_pipe.scheduler is not engine.pipeline.prior_pipe.scheduler


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"prior_num_inference_steps": 0}, "options['prior_num_inference_steps']"),
        ({"prior_num_inference_steps": 2.5}, "options['prior_num_inference_steps']"),
        ({"prior_guidance_scale": -1.0}, "options['prior_guidance_scale']"),
        ({"prior_guidance_scale": "lots"}, "options['prior_guidance_scale']"),
        ({"prior": 3}, "options['prior']"),
    ],
)
def test_bad_option_is_refused_before_any_work(
    engine: Any, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], field: str
) -> None:
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request(options=options))
    (value,) = options.values()
    assert caught.value.field == field and caught.value.value == value


def test_unknown_option_lists_the_known_ones(engine: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.resolve(request(options={"prior_steps": 3}))
    assert caught.value.field == "options['prior_steps']"
    for known in ("prior", "prior_guidance_scale", "prior_num_inference_steps"):
        assert known in caught.value.allowed


def test_priors_that_are_not_kandinsky_priors_are_refused(
    engine: Any, monkeypatch: pytest.MonkeyPatch, split: SimpleNamespace, tmp_path: Path
) -> None:
    refuse_to_run(monkeypatch, engine)
    cases = {
        "tiny:sd15": "'tiny:kandinsky22'",
        str(tmp_path / "missing"): "there is no folder",
        tiny_folder("sd15"): "not 'StableDiffusionPipeline'",
        split.decoder: "not 'KandinskyV22Pipeline'",  # a decoder cannot stand in for a prior
    }
    for prior, reason in cases.items():
        with pytest.raises(InvalidRequestError) as caught:
            engine.generate(request(options={"prior": prior}))
        assert caught.value.field == "options['prior']" and caught.value.value == prior
        assert reason in str(caught.value), str(caught.value)


@pytest.mark.parametrize(("prior", "hub_id"), [("nobody/no-such-prior", None), ("kandinsky22-prior", DEFAULT_PRIOR)])
def test_unreachable_hub_prior_is_refused(
    engine: Any, monkeypatch: pytest.MonkeyPatch, prior: str, hub_id: str | None
) -> None:
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(ModelNotFoundError) as caught:
        engine.generate(request(options={"prior": prior}))
    assert caught.value.model == (hub_id or prior)
    assert "options['prior'] names it" in str(caught.value) and "HF_HUB_OFFLINE" in str(caught.value)


def test_a_conditioner_for_other_families_is_refused_before_any_work(
    engine: Any, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Weighting(Conditioner):
        name = "test-kandinsky22-weighting"
        weighting = "test-kandinsky22-syntax"
        families = ("sd15",)
        feature = "test prompt weighting"

        def wants(self, request: GenerationRequest) -> bool:
            return request.prompt_weighting == self.weighting

        def prepare(self, engine: Any, request: GenerationRequest) -> None:
            raise AssertionError("a refused conditioner was prepared")

        def condition(self, engine: Any, request: GenerationRequest, call: Any) -> None:
            raise AssertionError("a refused conditioner ran")

    class Plugin:
        @hookimpl
        def register_conditioners(self, register: Callable[[Conditioner], None]) -> None:
            register(Weighting())

    registry.register_plugin(Plugin(), Weighting.name)
    try:
        refuse_to_run(monkeypatch, engine)
        with pytest.raises(UnsupportedFeatureError) as caught:
            engine.generate(request(prompt_weighting=Weighting.weighting))
        assert caught.value.family == "kandinsky22" and caught.value.feature == "test prompt weighting"
        assert "'kandinsky22'" in str(caught.value) and "sd15" in str(caught.value)
    finally:
        registry.unregister_plugin(Weighting.name)


def test_controlnet_is_refused_before_any_work(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("t2i_controlnet")
    from t2i_core import Control

    refuse_to_run(monkeypatch, engine)
    image = Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(UnsupportedFeatureError) as caught:
        engine.generate(request(controls=(Control(image=image, model="tiny:controlnet-sd15"),)))
    assert caught.value.family == "kandinsky22" and "ControlNet" in caught.value.feature
    assert not engine.state


# -- detection and decoder-only checkpoints -------------------------------------------------


def test_detected_from_model_index_without_family(k22_folder: str, split: SimpleNamespace) -> None:
    from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline

    combined = load(k22_folder, device="cpu")
    assert combined.family == "kandinsky22" and isinstance(combined.pipeline, KandinskyV22CombinedPipeline)
    decoder = load(split.decoder, device="cpu")
    assert decoder.family == "kandinsky22" and isinstance(decoder.pipeline, KandinskyV22Pipeline)
    assert load(tiny_folder("sd15"), device="cpu").family == "sd15"


def test_forcing_the_family_on_another_checkpoint_is_refused() -> None:
    with pytest.raises(ModelNotFoundError, match="StableDiffusionPipeline"):
        load(tiny_folder("sd15"), family="kandinsky22", device="cpu")


def test_alias_names_the_hub_decoder() -> None:
    with pytest.raises(ModelNotFoundError) as caught:  # offline: the alias resolves, the download is refused
        load("kandinsky22", device="cpu")
    assert caught.value.model == "kandinsky-community/kandinsky-2-2-decoder"
    assert "HF_HUB_OFFLINE" in str(caught.value)


def test_decoder_is_paired_with_the_prior_its_model_card_names(split: SimpleNamespace, raw_split: Any) -> None:
    engine = load(split.carded, device="cpu")
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=17))
    assert_images_equal(result.images, raw(raw_split, 17, negative_prompt=NEGATIVE))


def test_decoder_with_the_prior_option(split: SimpleNamespace, raw_split: Any, raw_k22: Any) -> None:
    engine = load(split.decoder, device="cpu")
    result = engine.generate(request(seed=19, num_images=2, options={"prior": split.prior}))
    assert_images_equal(result.images, raw(raw_split, 19, count=2))
    # The same weights, as tiny:kandinsky22's combined checkpoint: the same images.
    assert_images_equal(result.images, raw(raw_k22, 19, count=2))
    tiny = engine.generate(request(seed=19, num_images=2, options={"prior": "tiny:kandinsky22"}))
    assert_images_equal(tiny.images, result.images)
    sized = engine.generate(
        request(seed=3, height=48, width=80, negative_prompt=NEGATIVE, options={"prior": split.prior})
    )
    assert_images_equal(sized.images, raw(raw_split, 3, height=48, width=80, negative_prompt=NEGATIVE))


def test_decoder_follows_the_scheduler_choice(split: SimpleNamespace, raw_split: Any) -> None:
    from diffusers import DDIMScheduler

    engine = load(split.decoder, device="cpu")
    chosen = engine.generate(request(seed=23, scheduler="ddim", options={"prior": split.prior}))
    default = engine.generate(request(seed=23, options={"prior": split.prior}))
    original = raw_split.decoder_pipe.scheduler
    raw_split.decoder_pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        expected = raw(raw_split, 23)
    finally:
        raw_split.decoder_pipe.scheduler = original
    assert_images_equal(chosen.images, expected)
    assert_images_equal(default.images, raw(raw_split, 23))


def test_decoder_without_a_reachable_prior_is_refused(split: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import KandinskyV22CombinedPipeline

    def called(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the pipeline ran without its prior")

    monkeypatch.setattr(KandinskyV22CombinedPipeline, "__call__", called)
    engine = load(split.decoder, device="cpu")  # no model card: the default prior, not in the offline cache
    with pytest.raises(ModelNotFoundError) as caught:
        engine.generate(request(seed=1))
    message = str(caught.value)
    assert DEFAULT_PRIOR in message and "options['prior']" in message and "HF_HUB_OFFLINE" in message


def test_a_prior_is_loaded_once_per_decoder_and_paired_per_engine(split: SimpleNamespace) -> None:
    first = load(split.decoder, device="cpu")
    second = load(split.decoder, device="cpu")  # the engine cache: same decoder weights
    mine = first.provider.prior_for(first.pipeline, split.prior)
    assert first.provider.prior_for(first.pipeline, split.prior) is mine
    assert mine.unet is first.pipeline.unet and mine.movq is first.pipeline.movq
    theirs = second.provider.prior_for(second.pipeline, split.prior)
    assert theirs is not mine
    assert theirs.prior_prior is mine.prior_prior and theirs.prior_text_encoder is mine.prior_text_encoder
    assert theirs.prior_pipe.scheduler is not mine.prior_pipe.scheduler
    assert theirs.decoder_pipe.scheduler is not mine.decoder_pipe.scheduler


def test_a_prior_option_on_a_combined_checkpoint(engine: Any, split: SimpleNamespace) -> None:
    own = engine.generate(request(seed=29))
    other = engine.generate(request(seed=29, options={"prior": split.prior}))
    assert_images_equal(other.images, own.images)  # the same weights
    paired = engine.provider.prior_for(engine.pipeline, split.prior)
    assert paired is not engine.pipeline and paired.unet is engine.pipeline.unet
    assert paired.prior_prior is not engine.pipeline.prior_prior
    assert engine.provider.prior_for(engine.pipeline) is engine.pipeline


def test_a_prior_takes_the_decoders_dtype(split: SimpleNamespace) -> None:
    import torch

    engine = load(split.decoder, device="cpu", accelerators=("bf16",))
    paired = engine.provider.prior_for(engine.pipeline, split.prior)
    assert paired.prior_prior.dtype == paired.prior_text_encoder.dtype == torch.bfloat16
    assert paired.unet is engine.pipeline.unet and paired.unet.dtype == torch.bfloat16


def test_a_separate_prior_refuses_an_offloaded_decoder(split: SimpleNamespace, k22_folder: str) -> None:
    decoder = load(split.decoder, device="cpu", cache=False)
    decoder.pipeline.enable_model_cpu_offload(device="cpu")  # as the cpu_offload accelerator does on CUDA
    with pytest.raises(UnsupportedFeatureError, match="offloading"):
        decoder.generate(request(seed=1, options={"prior": split.prior}))
    # A combined checkpoint is offloaded as a whole, its prior included: it equals raw diffusers
    # offloaded the same way. Not a plain raw pipeline: the hooks move each model to "cpu:0",
    # which copies its weights out of the checkpoint's memory map into new, differently aligned
    # memory, and float32 matmuls may round differently there (1/255 off on an AMD EPYC).
    combined = load("tiny:kandinsky22", device="cpu", cache=False)
    combined.pipeline.enable_model_cpu_offload(device="cpu")
    offloaded = raw_pipeline(k22_folder)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert_images_equal(combined.generate(request(seed=1)).images, raw(offloaded, 1))


def test_a_model_card_naming_no_prior_is_refused(split: SimpleNamespace, tmp_path: Path) -> None:
    import shutil

    decoder = tmp_path / "decoder"
    shutil.copytree(split.decoder, decoder)
    (decoder / "README.md").write_text(f"---\nprior:\n- {tmp_path / 'gone'}\n---\n")
    engine = load(str(decoder), device="cpu")
    with pytest.raises(ModelNotFoundError) as caught:
        engine.generate(request(seed=1))
    assert "model card" in str(caught.value) and "options['prior']" in str(caught.value)
    # options["prior"] still pairs it.
    assert engine.generate(request(seed=1, options={"prior": split.prior})).images


def test_a_size_the_decoder_would_round_up_is_refused(engine: Any, raw_k22: Any) -> None:
    # The real MoVQ (four blocks) draws 64-pixel cells: diffusers would turn a height of 520 into 576.
    real = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)),
        movq=SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 256, 512])),
    )
    resolved, options = engine.resolve(request(height=520, width=512, seed=1))
    kwargs = engine.provider.call_kwargs(resolved, options)
    with pytest.raises(InvalidRequestError) as caught:
        engine.provider.run(real, kwargs)
    assert (caught.value.field, caught.value.value) == ("height", 520) and "multiple of 64" in caught.value.allowed
    # The tiny MoVQ (two blocks) draws 4-pixel cells, so every allowed request size is whole.
    result = engine.generate(request(height=72, width=40, seed=1))
    assert result.images[0].size == (40, 72)
    assert_images_equal(result.images, raw(raw_k22, 1, height=72, width=40))
