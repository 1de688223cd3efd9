"""Step caches (first-block-cache, taylorseer, magcache, faster-cache) against raw diffusers.

The reference is what a diffusers user writes: ``pipeline.transformer.enable_cache(Config(...))``
on the same tiny FLUX.1 checkpoint, then the same call; every image is compared bit for bit on
CPU. Each cache must skip work on these runs (fewer calls of a layer it skips than steps, and an
image other than the uncached one), or the comparison would prove nothing. Families whose
denoiser has no diffusers cache hooks are refused before any weights load.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from t2i_core import (
    Engine,
    GenerationCancelled,
    GenerationRequest,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    load,
)
from t2i_core.testing import (
    AcceleratorConformance,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    require_family,
)

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
STEPS = 8
SIZE = {"height": 64, "width": 64}
CACHES = ("first-block-cache", "taylorseer", "magcache", "faster-cache")

pytestmark = pytest.mark.filterwarnings("ignore:FasterCache is a purely experimental feature")


def config(spec: str, pipeline: Any, steps: int = STEPS) -> Any:
    """The diffusers config a diffusers user writes for `spec`, for raw `pipeline` running `steps` steps."""
    import diffusers
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    name, _, value = spec.partition("@")
    if name == "first-block-cache":
        return diffusers.FirstBlockCacheConfig(threshold=float(value or 0.2))
    if name == "taylorseer":
        return diffusers.TaylorSeerCacheConfig(cache_interval=int(value or 5))
    if name == "magcache":
        return diffusers.MagCacheConfig(
            threshold=float(value or 0.06), mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps
        )
    assert name == "faster-cache"
    return diffusers.FasterCacheConfig(
        spatial_attention_block_skip_range=int(value or 2),
        attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True,
        current_timestep_callback=lambda: pipeline.current_timestep,
    )


#: a layer each cache skips when it skips: the last block's output projection for the caches
#: that skip blocks, the first block's query projection for those that skip attention
SKIPPED_LAYER = {
    "first-block-cache": lambda t: t.single_transformer_blocks[-1].proj_out,
    "magcache": lambda t: t.single_transformer_blocks[-1].proj_out,
    "taylorseer": lambda t: t.transformer_blocks[0].attn.to_q,
    "faster-cache": lambda t: t.transformer_blocks[0].attn.to_q,
}


@contextmanager
def counting(module: Any) -> Iterator[list[int]]:
    """Count the calls of `module` while the block runs."""
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def folder(t2i_tiny_cache: Path) -> str:
    require_family("flux")
    return load("tiny:flux", device="cpu", accelerators=("fp32",)).source


@pytest.fixture(scope="module")
def raw(folder: str) -> Any:
    return raw_pipeline(folder)


@pytest.fixture(scope="module")
def uncached(raw: Any) -> dict[tuple[int, int], Any]:
    """The images without a cache, by (seed, steps)."""
    return {key: raw_image(raw, None, *key) for key in ((3, STEPS), (4, STEPS + 2))}


def raw_image(raw: Any, spec: str | None, seed: int, steps: int = STEPS, **kwargs: Any) -> Any:
    """Raw diffusers' image with `spec`'s cache enabled for this call only (None: no cache)."""
    if spec is not None:
        raw.transformer.enable_cache(config(spec, raw, steps))
    try:
        call = {"prompt": PROMPT, "num_inference_steps": steps, **SIZE, **kwargs}
        return raw(generator=cpu_generators(seed, 1), **call).images[0]
    finally:
        if spec is not None:
            raw.transformer.disable_cache()


def request(seed: int, steps: int = STEPS, **fields: Any) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, seed=seed, num_inference_steps=steps, height=64, width=64, **fields)


def engine(spec: str, **load_kwargs: Any) -> Engine:
    load_kwargs.setdefault("cache", False)
    return load("tiny:flux", device="cpu", accelerators=("fp32", spec), **load_kwargs)


# -- the plugin author's conformance kit --------------------------------------------------------


class _CacheConformance(AcceleratorConformance):
    model = "tiny:flux"
    steps = STEPS
    tolerance = 2
    why = "a step cache reuses or extrapolates earlier steps' work instead of computing it"

    def effect(self, engine: Engine) -> Any:
        return (
            type(engine.pipeline.transformer._cache_config).__name__
            if engine.pipeline.transformer.is_cache_enabled
            else None
        )


class TestFirstBlockCacheConformance(_CacheConformance):
    accelerator = "first-block-cache"


class TestTaylorSeerConformance(_CacheConformance):
    accelerator = "taylorseer"


class TestMagCacheConformance(_CacheConformance):
    accelerator = "magcache"


class TestFasterCacheConformance(_CacheConformance):
    accelerator = "faster-cache"


# -- parity with raw diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("spec", CACHES)
def test_two_generations_in_a_row_equal_raw_diffusers_and_skip_work(
    spec: str, folder: str, raw: Any, uncached: dict[tuple[int, int], Any]
) -> None:
    """The second run, with another seed and more steps, starts from fresh cache state (as raw does)."""
    cached = engine(spec)
    assert cached.accelerators[-1].startswith(f"{spec}@")
    layer = SKIPPED_LAYER[spec](cached.pipeline.transformer)
    for seed, steps in ((3, STEPS), (4, STEPS + 2)):
        with counting(layer) as calls:
            ours = cached.generate(request(seed, steps)).images
        assert 0 < calls[0] < steps, f"{spec} skipped no step of {steps} ({calls[0]} full computations)"
        assert_images_equal(ours, [raw_image(raw, spec, seed, steps)])
        assert_images_differ(ours, [uncached[seed, steps]], spec)


@pytest.mark.parametrize(
    ("spec", "default"),
    [("first-block-cache@0.5", "first-block-cache"), ("taylorseer@3", "taylorseer"), ("magcache@0.2", "magcache")],
)
def test_a_value_configures_the_diffusers_config(spec: str, default: str, raw: Any) -> None:
    cached = engine(spec)
    assert cached.accelerators[-1] == spec
    ours = cached.generate(request(3)).images
    assert_images_equal(ours, [raw_image(raw, spec, 3)])
    assert_images_differ(ours, [raw_image(raw, default, 3)], f"{spec} instead of {default}")


def test_first_block_cache_is_diffusers_threshold_0_2_by_default(raw: Any) -> None:
    cached = engine("first-block-cache")
    assert cached.accelerators[-1] == "first-block-cache@0.2"
    assert_images_equal(cached.generate(request(3)).images, [raw_image(raw, "first-block-cache@0.2", 3)])


def test_magcache_fits_its_ratios_to_each_requests_steps(raw: Any) -> None:
    """Loaded for the family's 28 steps, a run of 12 uses ratios interpolated to 12 (raw: num_inference_steps=12)."""
    cached = engine("magcache")
    ours = cached.generate(request(5, 12)).images
    assert_images_equal(ours, [raw_image(raw, "magcache", 5, 12)])
    import diffusers
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    raw.transformer.enable_cache(diffusers.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS))  # 28 steps
    try:
        unfitted = raw(generator=cpu_generators(5, 1), prompt=PROMPT, num_inference_steps=12, **SIZE).images
    finally:
        raw.transformer.disable_cache()
    assert_images_differ(ours, unfitted, "ratios fitted to 12 steps instead of 28")


def test_the_caches_follow_true_cfg_branches(raw: Any) -> None:
    """FLUX.1's negative prompt runs a second, uncond branch, which diffusers' context-aware caches keep apart."""
    for spec in ("first-block-cache@0.5", "taylorseer", "magcache"):
        ours = engine(spec).generate(request(3, negative_prompt="blurry", options={"true_cfg_scale": 4.0})).images
        expected = raw_image(raw, spec, 3, negative_prompt="blurry", true_cfg_scale=4.0)
        assert_images_equal(ours, [expected], f"raw diffusers with {spec}")


def test_faster_cache_refuses_a_negative_prompt_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    cached = engine("faster-cache")

    def run(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail("the pipeline ran")

    monkeypatch.setattr(cached.provider, "run", run)
    with pytest.raises(InvalidRequestError, match="negative_prompt.*faster-cache@2.*true CFG"):
        cached.generate(request(3, negative_prompt="blurry", options={"true_cfg_scale": 4.0}))


# -- state: cancelled runs, shared weights, batches ----------------------------------------------


@pytest.mark.parametrize("spec", ["first-block-cache@0.8", "taylorseer", "magcache", "faster-cache"])
def test_a_cancelled_run_leaves_no_state_behind(spec: str, raw: Any) -> None:
    """diffusers resets the hooks when a call ends; a cancelled call never ends, so each run starts afresh.

    (Without the reset, each of these images is 1 to 10 levels off: stale residuals, step counts
    and Taylor factors; an odd number of steps puts FasterCache's skipping out of step.)
    """
    cached = engine(spec)
    with pytest.raises(GenerationCancelled):
        cached.generate(request(4), progress=lambda step, total: step < 5)
    assert_images_equal(cached.generate(request(3)).images, [raw_image(raw, spec, 3)])


def test_engines_over_the_same_weights_each_equal_raw(raw: Any, folder: str) -> None:
    """Engines from one cached load share the transformer and its hooks: alternating, and at once from two threads."""
    spec = "first-block-cache@0.5"
    first, second = engine(spec, cache=True), engine(spec, cache=True)
    assert first.pipeline.transformer is second.pipeline.transformer and first.pipeline is not second.pipeline
    expected = {seed: raw_image(raw, spec, seed) for seed in (3, 4)}
    for one, seed in ((first, 3), (second, 4), (first, 4), (second, 3)):
        assert_images_equal(one.generate(request(seed)).images, [expected[seed]])
    results: dict[int, Any] = {}

    def generate(one: Engine, seed: int) -> None:
        results[seed] = one.generate(request(seed)).images

    threads = [threading.Thread(target=generate, args=(one, seed)) for one, seed in ((first, 3), (second, 4))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (3, 4):
        assert_images_equal(results[seed], [expected[seed]])


def test_faster_cache_reads_the_timestep_of_the_engine_that_runs(raw: Any) -> None:
    """Its timestep callback follows whichever engine over the shared weights is running."""
    first, second = engine("faster-cache", cache=True), engine("faster-cache", cache=True)
    expected = raw_image(raw, "faster-cache", 3)
    assert_images_equal(second.generate(request(3)).images, [expected])
    assert_images_equal(first.generate(request(3)).images, [expected])


def test_a_batch_with_a_cache_runs_each_request_alone(
    monkeypatch: pytest.MonkeyPatch, raw: Any, t2i_registry: Any
) -> None:
    """A cache decides per pipeline call which steps to skip: batched, a request's image would depend on the others."""
    cached = engine("first-block-cache@0.5")
    from t2i_core import ModelProvider

    # FLUX.1's provider runs its own call, which never batches; with the default run it could.
    monkeypatch.setattr(type(cached.provider), "run", ModelProvider.run)
    calls: list[Any] = []
    pipeline_call = type(cached.pipeline).__call__

    def counted(pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("prompt"))
        return pipeline_call(pipeline, *args, **kwargs)

    monkeypatch.setattr(type(cached.pipeline), "__call__", counted)
    results = cached.generate_batch([request(3), request(4)])
    assert calls == [PROMPT, PROMPT]  # one call each, not one call with two prompts
    monkeypatch.setattr(type(cached.pipeline), "__call__", pipeline_call)
    for result, seed in zip(results, (3, 4), strict=True):
        assert_images_equal(result.images, [raw_image(raw, "first-block-cache@0.5", seed)])


# -- refusals, before any weights load ---------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import t2i_core.engine.loading as loading

    def must_not_load(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the refusal must come before loading")

    monkeypatch.setattr(loading, "_load_pipeline", must_not_load)


@pytest.mark.parametrize(
    ("family", "denoiser"),
    [
        ("sd3", "SD3Transformer2DModel"),
        ("z-image", "ZImageTransformer2DModel"),
        ("sd15", "UNet2DConditionModel"),
        ("sdxl", "UNet2DConditionModel"),
        ("kandinsky22", "UNet2DConditionModel"),
    ],
)
@pytest.mark.parametrize("spec", CACHES)
def test_families_without_cache_hooks_are_refused(
    spec: str, family: str, denoiser: str, t2i_tiny_cache: Path, no_loading: None
) -> None:
    require_family(family)
    with pytest.raises(
        IncompatibleAcceleratorsError, match=f"family '{family}' runs its .* {denoiser}: .*CacheMixin"
    ) as caught:
        load(f"tiny:{family}", device="cpu", accelerators=("fp32", spec), cache=False)
    assert caught.value.names == (spec,)


def test_one_cache_at_a_time(folder: str, no_loading: None) -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match="first-block-cache excludes magcache"):
        load("tiny:flux", device="cpu", accelerators=("first-block-cache", "magcache"), cache=False)


@pytest.mark.parametrize("spec", CACHES)
def test_regional_compile_which_cannot_trace_the_hooks_is_refused(spec: str, folder: str, no_loading: None) -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match="excludes compile-regional"):
        load("tiny:flux", device="cpu", accelerators=(spec, "compile-regional"), cache=False)


@pytest.mark.parametrize(
    ("spec", "allowed"),
    [
        ("first-block-cache@1.5", r"threshold a number in \[0, 1\]"),
        ("taylorseer@0", "cache_interval an integer"),
        ("magcache@much", r"threshold a number in \[0, 1\]"),
        ("faster-cache@0.5", "block_skip_range an integer"),
    ],
)
def test_bad_values_name_what_is_allowed(spec: str, allowed: str, no_loading: None) -> None:
    with pytest.raises(InvalidRequestError, match=allowed):
        load("tiny:flux", device="cpu", accelerators=("fp32", spec), cache=False)


def test_compile_on_cuda_is_refused(folder: str, monkeypatch: pytest.MonkeyPatch, no_loading: None) -> None:
    """CUDA graphs overwrite a step's outputs at the next step, while the caches keep them across steps."""
    import t2i_core.engine.loading as loading

    monkeypatch.setattr(loading, "resolve_device", lambda device: device)
    with pytest.raises(IncompatibleAcceleratorsError, match="CUDA graphs"):
        load("tiny:flux", device="cuda", accelerators=("fp16", "first-block-cache", "compile"), cache=False)


@pytest.mark.slow
@pytest.mark.parametrize("spec", CACHES)
def test_whole_compile_on_cpu_keeps_the_cached_image(spec: str, folder: str) -> None:
    """On a CPU, compile has no CUDA graphs: it compiles around the hooks (a graph per path they take)."""
    import warnings

    from t2i_core.testing import assert_images_close

    eager = engine(spec).generate(request(3)).images
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compiled again")
        compiled = load("tiny:flux", device="cpu", accelerators=("fp32", spec, "compile"), cache=False)
        ours = compiled.generate(request(3)).images
    assert_images_close(ours, eager, max_levels=1, why="inductor's kernels round float32 differently")
