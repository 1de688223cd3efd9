"""Presets per kind of denoiser: transformer families stack bf16, step caches and quantizers; UNets keep theirs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from t2i_core import Engine, GenerationRequest, Preset, UnknownAcceleratorError, get_registry
from t2i_core.registry import Registry
from t2i_core.testing import assert_images_equal


def test_transformer_denoisers_get_their_own_stacks() -> None:
    registry = get_registry()
    for device in ("cuda", "mps"):
        assert registry.resolve_accelerators(["auto"], device, "transformer")[0].name == "bf16"
        assert registry.resolve_accelerators(["auto"], device, "unet")[0].name == "fp16"
        assert registry.resolve_accelerators(["auto"], device)[0].name == "fp16"  # kind unknown: the plain stack
    turbo = [a.spec for a in registry.resolve_accelerators(["turbo"], "cuda", "transformer")]
    assert turbo == ["bf16", "sdpa", "first-block-cache@0.2", "compile-vae"]
    fast = [a.spec for a in registry.resolve_accelerators(["fast"], "cuda", "unet")]
    assert [a.spec for a in registry.resolve_accelerators(["turbo"], "cuda", "unet")] == fast


def test_an_optional_name_is_left_out_only_when_nothing_registers_it(t2i_registry: Registry) -> None:
    preset = Preset(
        name="test-optional",
        description="a stack with one accelerator from a plugin that may be absent",
        stacks={"*": ("fp32", "test-absent", "vae_slicing")},
        optional=("test-absent",),
    )
    t2i_registry.register_plugin(_registers(preset), "test-optional-preset")
    assert [a.name for a in t2i_registry.resolve_accelerators(["test-optional"], "cpu")] == ["fp32", "vae_slicing"]
    with pytest.raises(UnknownAcceleratorError, match="test-absent"):  # asked for by name, it is refused
        t2i_registry.resolve_accelerators(["test-absent"], "cpu")
    if "int8" in t2i_registry.accelerators:  # t2i-quantize installed: low-memory quantizes a transformer on CPU
        names = [a.name for a in t2i_registry.resolve_accelerators(["low-memory"], "cpu", "transformer")]
        assert names == ["fp32", "int8", "sdpa", "vae_tiling", "vae_slicing"]


def test_load_picks_the_stack_of_the_checkpoints_denoiser(t2i_engine_factory: Callable[..., Engine]) -> None:
    flux = t2i_engine_factory("tiny:flux", accelerators=["turbo"])
    assert flux.accelerators == ("fp32", "sdpa", "first-block-cache@0.2")
    sd15 = t2i_engine_factory("tiny:sd15", accelerators=["turbo"])
    assert sd15.accelerators == ("fp32", "sdpa")


def test_a_preset_leaves_out_what_the_checkpoint_cannot_take(t2i_engine_factory: Callable[..., Engine]) -> None:
    """SD3's transformer has no cache hooks: turbo runs without the cache there; asked for by name, it is refused."""
    from t2i_core import IncompatibleAcceleratorsError

    sd3 = t2i_engine_factory("tiny:sd3", accelerators=["turbo"])
    assert sd3.accelerators == ("fp32", "sdpa")
    with pytest.raises(IncompatibleAcceleratorsError, match="first-block-cache"):
        t2i_engine_factory("tiny:sd3", accelerators=["turbo", "first-block-cache"])


def test_a_single_files_denoiser_is_read_from_its_config(t2i_tiny_cache: object) -> None:
    from t2i_core.engine.loading import _denoiser_kind
    from t2i_core.engine.sources import Resolved
    from t2i_core.testing import tiny_folder

    registry = get_registry()
    source = str(tiny_folder("flux"))
    flux = registry.providers["flux"]

    single = Resolved(source="model.safetensors", family="flux", provider=flux, is_local=True, config=source)
    assert _denoiser_kind("model.safetensors", ["turbo"], single, registry) == "transformer"
    assert _denoiser_kind("model.safetensors", ["fp32"], single, registry) is None  # no preset asks


def test_turbo_makes_the_image_of_its_stack(t2i_engine_factory: Callable[..., Engine]) -> None:
    """The preset is only a name: its image is that of the accelerators it stands for (themselves
    compared with raw diffusers' enable_cache in tests/test_caches.py)."""
    request = GenerationRequest(prompt="a lighthouse at dusk", seed=3, num_inference_steps=6)
    turbo = t2i_engine_factory("tiny:flux", accelerators=["turbo"], cache=False)
    spelled = t2i_engine_factory("tiny:flux", accelerators=["fp32", "sdpa", "first-block-cache"], cache=False)
    assert_images_equal(turbo.generate(request).images, spelled.generate(request).images, "the spelled-out stack")


def _registers(item: object) -> object:
    from types import SimpleNamespace

    from t2i_core import hookimpl

    @hookimpl
    def register_accelerators(register: Callable[[object], None]) -> None:
        register(item)

    return SimpleNamespace(register_accelerators=register_accelerators)
