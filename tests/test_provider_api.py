"""What the provider API lets a family plugin do, and how a broken family plugin is reported.

Transformer denoisers, a family's own named schedulers, a check of the request against the
loaded pipeline, loading with model_index.json, 0.1-style providers unchanged; a family whose
plugin failed to load is named by load(), T2I_DEBUG shows the traceback, T2I_STRICT_PLUGINS fails.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from support import tiny_folder

import t2i_core
from t2i_core import (
    GenerationRequest,
    InvalidRequestError,
    ModelProvider,
    PluginError,
    UndetectedFamilyError,
    UnknownFamilyError,
    hookimpl,
    schedulers,
)
from t2i_core.cli import main
from t2i_core.registry import Registry
from t2i_core.testing import assert_images_equal, cpu_generators, raw_pipeline

PROMPT = "a lighthouse at dusk"


def register(registry: Registry, provider: ModelProvider) -> None:
    plugin = types.SimpleNamespace(register_providers=hookimpl(lambda register: register(provider)))
    info = registry.register_plugin(plugin, f"plugin-{provider.name}")
    assert info.error is None, info.error


def sd15_like(**attributes: Any) -> type[ModelProvider]:
    """A family over the tiny SD 1.5 checkpoint (forced with family=), with `attributes` set."""
    from t2i_sd15 import StableDiffusion15

    return type("Family", (StableDiffusion15,), {"aliases": {}, **attributes})


# -- loading ------------------------------------------------------------------------------------


def test_a_provider_written_for_0_1_overriding_load_still_works(t2i_registry: Registry) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def load(self: Any, source: str, load_kwargs: Mapping[str, Any]) -> Any:
        calls.append((source, dict(load_kwargs)))
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(source, **load_kwargs)

    register(t2i_registry, sd15_like(name="old-style", load=load)())
    engine = t2i_core.load(tiny_folder("sd15"), family="old-style", device="cpu", cache=False)
    assert [source for source, _ in calls] == [tiny_folder("sd15")]
    assert calls[0][1]["use_safetensors"] is True
    assert engine.family == "old-style"


def test_load_pipeline_gets_the_model_index_and_load_delegates_to_it(t2i_registry: Registry) -> None:
    seen: list[Any] = []

    def load_pipeline(self: Any, source: str, load_kwargs: Mapping[str, Any], model_index: Any) -> Any:
        seen.append(model_index)
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(source, **load_kwargs)

    provider = sd15_like(name="new-style", load_pipeline=load_pipeline)()
    register(t2i_registry, provider)
    folder = tiny_folder("sd15")
    t2i_core.load(folder, family="new-style", device="cpu", cache=False)
    assert seen[-1]["_class_name"] == "StableDiffusionPipeline" and "unet" in seen[-1]
    provider.load(folder, {})  # what callers of the 0.1 method (benchmarks) get
    assert len(seen) == 2 and seen[-1]["_class_name"] == "StableDiffusionPipeline"


def test_load_pipeline_may_call_the_base_load(t2i_registry: Registry) -> None:
    """``super().load()`` inside `load_pipeline` loads with diffusers (no recursion), from either entry."""
    calls: list[str] = []

    def load_pipeline(self: Any, source: str, load_kwargs: Mapping[str, Any], model_index: Any) -> Any:
        calls.append(model_index["_class_name"])
        return ModelProvider.load(self, source, load_kwargs)

    provider = sd15_like(name="delegating", load_pipeline=load_pipeline)()
    register(t2i_registry, provider)
    engine = t2i_core.load(tiny_folder("sd15"), family="delegating", device="cpu", cache=False)
    assert type(engine.pipeline).__name__ == "StableDiffusionPipeline"
    assert type(provider.load(tiny_folder("sd15"), {})).__name__ == "StableDiffusionPipeline"
    assert calls == ["StableDiffusionPipeline", "StableDiffusionPipeline"]


# -- the request against the loaded pipeline -----------------------------------------------------


def test_check_request_sees_the_pipeline_and_the_resolved_request_before_any_work(
    t2i_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Any, GenerationRequest]] = []

    def check_request(self: Any, pipeline: Any, request: GenerationRequest) -> None:
        seen.append((pipeline, request))
        if request.width != request.height:
            raise InvalidRequestError("width", request.width, f"{request.height}, the height: square images only")

    register(t2i_registry, sd15_like(name="squares", check_request=check_request)())
    engine = t2i_core.load(tiny_folder("sd15"), family="squares", device="cpu")
    monkeypatch.setattr(engine.provider, "run", lambda *a, **k: pytest.fail("the pipeline ran"))
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(GenerationRequest(prompt=PROMPT, width=128))
    assert caught.value.field == "width" and "square images only" in str(caught.value)
    pipeline, request = seen[-1]
    assert pipeline is engine.pipeline and request.height == 64 and request.seed is not None


# -- schedulers ---------------------------------------------------------------------------------


def test_a_family_s_own_named_scheduler_runs_and_equals_diffusers(t2i_registry: Registry) -> None:
    import diffusers

    own = {"euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})}
    register(t2i_registry, sd15_like(name="own-samplers", schedulers=("ddim",), named_schedulers=own)())
    engine = t2i_core.load(tiny_folder("sd15"), family="own-samplers", device="cpu")
    result = engine.generate(
        GenerationRequest(prompt=PROMPT, seed=3, num_inference_steps=3, scheduler="euler-trailing")
    )
    raw = raw_pipeline(tiny_folder("sd15"))
    raw.scheduler = diffusers.EulerDiscreteScheduler.from_config(raw.scheduler.config, timestep_spacing="trailing")
    assert_images_equal(result.images, raw(PROMPT, num_inference_steps=3, generator=cpu_generators(3, 1)).images)
    with pytest.raises(InvalidRequestError, match="can run: default, ddim, euler-trailing"):
        engine.resolve(GenerationRequest(prompt=PROMPT, scheduler="euler"))
    with pytest.raises(InvalidRequestError, match="expected one of default, ddim, euler-trailing"):
        engine.resolve(GenerationRequest(prompt=PROMPT, scheduler="nonsense"))


def test_the_step_limit_of_a_flow_matching_scheduler_is_found() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # It has no scale_model_input; the search must not take that for an unusable schedule.
    assert schedulers.max_steps(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)) >= 999


# -- transformer denoisers ----------------------------------------------------------------------


def test_native_size_reads_a_transformer_and_says_when_it_cannot() -> None:
    config = types.SimpleNamespace(sample_size=(96, 64))
    pipeline = types.SimpleNamespace(transformer=types.SimpleNamespace(config=config), vae_scale_factor=8)
    assert ModelProvider().native_size(pipeline) == (768, 512)
    with pytest.raises(NotImplementedError, match="override ModelProvider.native_size"):
        ModelProvider().native_size(types.SimpleNamespace(prior=object()))


def test_accelerators_find_the_denoiser_of_a_transformer_family() -> None:
    from t2i_core.builtins._components import autoencoders, denoisers

    engine = t2i_core.load("tiny:pixart-sigma", device="cpu", accelerators=["fp32"])  # docs/examples/t2i-pixart-sigma
    assert list(denoisers(engine.pipeline)) == ["transformer"]
    assert list(autoencoders(engine.pipeline)) == ["vae"]
    assert engine.provider.native_size(engine.pipeline) == (64, 64)


# -- a broken family plugin ---------------------------------------------------------------------


@pytest.fixture
def broken_family(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Registry]]:
    """Installs a plugin 'painter' whose import fails; returns a function that loads the registry."""
    from t2i_core.registry import current

    broken = metadata.EntryPoint(name="painter", value="t2i_painter_is_not_installed", group="t2i")
    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda group: [*real(group=group), broken])
    monkeypatch.setattr(current, "_registry", None)

    def registry() -> Registry:
        return t2i_core.get_registry()

    yield registry
    current._registry = None


def test_load_names_the_plugin_that_failed_to_offer_a_family(broken_family: Callable[[], Registry]) -> None:
    broken_family()
    with pytest.raises(UnknownFamilyError) as caught:
        t2i_core.load("tiny:painter", device="cpu")
    message = str(caught.value)
    assert message.startswith("family='painter' is not available: its plugin failed to load: plugin 'painter'")
    assert "ModuleNotFoundError" in message and "T2I_DEBUG=1" in message and "Traceback" not in message
    assert caught.value.plugin_error is not None
    # Another unknown family still lists the known ones, and mentions the broken plugin.
    with pytest.raises(
        UnknownFamilyError, match=r"expected one of .*sd15.*failed to load, and may offer it: 'painter'"
    ):
        t2i_core.load("tiny:sculptor", device="cpu")


def test_t2i_debug_shows_the_plugin_traceback(
    broken_family: Callable[[], Registry], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("T2I_DEBUG", "1")
    broken_family()
    with pytest.raises(UnknownFamilyError, match="(?s)Traceback.*t2i_painter_is_not_installed"):
        t2i_core.load("tiny:painter", device="cpu")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "ERROR: plugin 'painter': import failed" in out and "    Traceback (most recent call last):" in out


def test_an_undetected_checkpoint_mentions_broken_plugins(
    broken_family: Callable[[], Registry], tmp_path: Path
) -> None:
    broken_family()
    (tmp_path / "model_index.json").write_text('{"_class_name": "PainterPipeline"}')
    with pytest.raises(UndetectedFamilyError, match="failed to load, and may offer it: 'painter'"):
        t2i_core.load(str(tmp_path), device="cpu")


def test_strict_plugins_turns_a_broken_plugin_into_an_error(
    broken_family: Callable[[], Registry], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("T2I_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'painter': it failed to load and \\$T2I_STRICT_PLUGINS is set"):
        broken_family()
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "T2I_STRICT_PLUGINS" in err
    monkeypatch.setenv("T2I_STRICT_PLUGINS", "0")
    assert "painter" in broken_family().plugins


def test_first_party_items_exclude_third_party_ones(t2i_registry: Registry) -> None:
    register(t2i_registry, sd15_like(name="outsider")())
    providers = t2i_registry.first_party("provider")
    assert {"sd15", "sdxl", "kandinsky22"} <= set(providers) and "outsider" not in providers
    assert "pixart-sigma" in t2i_registry.providers and "pixart-sigma" not in providers  # the tutorial's example
    assert "fp16" in t2i_registry.first_party("accelerator") and "auto" in t2i_registry.first_party("preset")
