"""Built-in accelerators and presets: each takes effect, they apply in phase order, impossible
combinations are refused before loading, and images stay within a stated tolerance of fp32.

Tolerances (tiny SD1.5, 3 steps, CPU, levels of 255 per pixel, against plain fp32):
sdpa, vae_slicing (batch 1) and vae_tiling at native size: 0 (bit-exact), as on CPU they leave
the computation as it is; cpu_offload, fuse_qkv, channels_last, torch.compile: <= 1, as they
change it (offloading copies the weights to new memory, where float32 matmuls may round
differently); fp16 <= 3; bf16 <= 8. Measured on an x86 CPU: 0 for sdpa, cpu_offload and
fuse_qkv, 1 for channels_last and compile, 1 for fp16, 4 for bf16.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from t2i_core import (
    PHASES,
    Accelerator,
    GenerationRequest,
    IncompatibleAcceleratorsError,
    LoadContext,
    UnknownAcceleratorError,
    hookimpl,
    load,
)
from t2i_core.testing import as_array

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
STEPS = 3
SEEDS = (31, 7)


def tiny(*accelerators: str) -> Any:
    return load("tiny:sd15", device="cpu", accelerators=list(accelerators), cache=False)


def image(engine: Any, seed: int = SEEDS[0], **kwargs: Any) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", STEPS)
    request = GenerationRequest(prompt=kwargs.pop("prompt", PROMPT), seed=seed, **kwargs)
    return as_array(engine.generate(request).images[0])


def levels(ours: np.ndarray, theirs: np.ndarray) -> int:
    return int(np.abs(ours - theirs).max())


@pytest.fixture(scope="module")
def fp32() -> Any:
    return tiny("fp32")


@pytest.fixture(scope="module")
def reference(fp32: Any) -> dict[int, np.ndarray]:
    return {seed: image(fp32, seed) for seed in SEEDS}


def context(engine: Any, device: str) -> LoadContext:
    return LoadContext(
        model=engine.model,
        source=engine.source,
        family=engine.family,
        provider=engine.provider,
        device=device,
        accelerators=engine.accelerators,
    )


def attention_processors(module: Any) -> set[str]:
    return {type(p).__name__ for p in module.attn_processors.values()}


# -- registration ------------------------------------------------------------------------------

BUILTINS = (
    "fp32",
    "fp16",
    "bf16",
    "sdpa",
    "fuse_qkv",
    "channels_last",
    "cpu_offload",
    "sequential_offload",
    "group_offload",
    "vae_tiling",
    "vae_slicing",
    "compile",
    "compile-regional",
    "compile-vae",
    "graph-step",
)
PRESETS = ("auto", "fast", "quick", "low-memory")


def test_builtins_are_registered_through_the_accelerator_hook(registry: Any) -> None:
    info = registry.plugins["accelerators"]
    assert info.distribution == "t2i-core" and info.error is None
    assert {f"accelerator:{name}" for name in BUILTINS} <= set(info.registered)
    assert {f"preset:{name}" for name in PRESETS} <= set(info.registered)
    for name in BUILTINS:
        accelerator = registry.accelerator(name)
        assert accelerator.phase in PHASES and accelerator.description
        assert set(accelerator.devices) <= {"cpu", "cuda", "mps"}


def test_registering_imports_no_torch() -> None:
    code = "import sys; from t2i_core import get_registry; r = get_registry(); assert 'compile' in r.accelerators; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- each accelerator takes effect -------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype", "tolerance"), [("fp16", "float16", 3), ("bf16", "bfloat16", 8)])
def test_half_dtypes_set_every_weight(name: str, dtype: str, tolerance: int, reference: dict[int, np.ndarray]) -> None:
    import torch

    engine = tiny(name)
    for component in ("unet", "vae", "text_encoder"):
        dtypes = {p.dtype for p in getattr(engine.pipeline, component).parameters()}
        assert dtypes == {getattr(torch, dtype)}, f"{component}: {dtypes}"
    for seed in SEEDS:
        assert levels(image(engine, seed), reference[seed]) <= tolerance


def test_fp32_weights(fp32: Any) -> None:
    import torch

    assert {p.dtype for p in fp32.pipeline.unet.parameters()} == {torch.float32}


def test_sdpa_replaces_classic_attention_and_is_bit_exact(
    registry: Any, fp32: Any, reference: dict[int, np.ndarray]
) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    engine = tiny("fp32")
    engine.pipeline.unet.set_attn_processor(AttnProcessor())
    engine.pipeline.vae.set_attn_processor(AttnProcessor())
    registry.accelerator("sdpa").apply(engine.pipeline, context(engine, "cpu"))
    assert attention_processors(engine.pipeline.unet) == {"AttnProcessor2_0"}
    assert attention_processors(engine.pipeline.vae) == {"AttnProcessor2_0"}

    loaded = tiny("fp32", "sdpa")
    assert attention_processors(loaded.pipeline.unet) == {"AttnProcessor2_0"}
    # The fp32 reference runs diffusers' default processors, SDPA already: sdpa changes nothing
    # on a freshly loaded pipeline, so the two do the same work and compare bit for bit.
    assert attention_processors(fp32.pipeline.unet) == attention_processors(fp32.pipeline.vae) == {"AttnProcessor2_0"}
    for seed in SEEDS:
        assert levels(image(loaded, seed), reference[seed]) == 0


def kandinsky_like_unet() -> Any:
    """A tiny UNet with Kandinsky 2.2's attention: added key/value projections, no transformer blocks."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4,
        out_channels=8,
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )


class Components:
    """Just enough of a pipeline for an accelerator's ``apply``."""

    def __init__(self, **components: Any) -> None:
        self.components = components


def test_sdpa_keeps_added_kv_attention_and_fuse_qkv_leaves_it(registry: Any, fp32: Any, caplog: Any) -> None:
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    unet = kandinsky_like_unet()
    unet.set_attn_processor(AttnAddedKVProcessor())
    pipeline = Components(unet=unet)
    registry.accelerator("sdpa").apply(pipeline, context(fp32, "cpu"))
    assert attention_processors(unet) == {"AttnAddedKVProcessor2_0"}
    with caplog.at_level(logging.WARNING, logger="t2i.accelerators"):
        registry.accelerator("fuse_qkv").apply(pipeline, context(fp32, "cpu"))
    assert attention_processors(unet) == {"AttnAddedKVProcessor2_0"}
    assert "fuse_qkv" in caplog.text and "changed nothing" in caplog.text


def test_fuse_qkv_fuses_unet_and_vae_attention(reference: dict[int, np.ndarray]) -> None:
    from diffusers.models.attention_processor import Attention

    engine = tiny("fp32", "fuse_qkv")
    for component in (engine.pipeline.unet, engine.pipeline.vae):
        assert attention_processors(component) == {"FusedAttnProcessor2_0"}
        attentions = [m for m in component.modules() if isinstance(m, Attention)]
        assert attentions
        for attention in attentions:
            fused = "to_kv" if attention.is_cross_attention else "to_qkv"
            assert hasattr(attention, fused), f"{type(component).__name__} attention lacks {fused}"
    assert any(m.is_cross_attention for m in engine.pipeline.unet.modules() if isinstance(m, Attention))
    for seed in SEEDS:
        assert levels(image(engine, seed), reference[seed]) <= 1


def test_channels_last_converts_convolution_weights(reference: dict[int, np.ndarray]) -> None:
    import torch

    engine = tiny("fp32", "channels_last")
    for weight in (engine.pipeline.unet.conv_in.weight, engine.pipeline.vae.decoder.conv_in.weight):
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()
    for seed in SEEDS:
        assert levels(image(engine, seed), reference[seed]) <= 1


def test_vae_tiling_and_slicing(reference: dict[int, np.ndarray], fp32: Any, registry: Any) -> None:
    engine = tiny("fp32", "vae_tiling", "vae_slicing")
    assert engine.pipeline.vae.use_tiling and engine.pipeline.vae.use_slicing
    # At the tiny checkpoint's native size the image fits one tile and a lone image is no batch to
    # slice: the VAE decodes as without them, so the images compare bit for bit.
    assert engine.pipeline.vae.tile_sample_min_size >= max(reference[SEEDS[0]].shape[:2])
    for seed in SEEDS:
        assert levels(image(engine, seed), reference[seed]) == 0
    # Slicing decodes a batch image by image: one level of batched-matmul rounding at most.
    batch = GenerationRequest(prompt=PROMPT, seed=5, num_images=2, num_inference_steps=STEPS)
    for ours, theirs in zip(engine.generate(batch).images, fp32.generate(batch).images, strict=True):
        assert levels(as_array(ours), as_array(theirs)) <= 1
    assert registry.accelerator("vae_tiling").lossless is False  # blended tiles change large images


def test_low_memory_preset_on_cpu_is_exact(reference: dict[int, np.ndarray]) -> None:
    engine = tiny("low-memory")
    assert engine.accelerators == ("fp32", "sdpa", "vae_tiling", "vae_slicing")
    assert levels(image(engine), reference[SEEDS[0]]) == 0


def test_fast_and_quick_presets_on_cpu_are_exact(reference: dict[int, np.ndarray]) -> None:
    for preset in ("fast", "quick"):
        engine = tiny(preset)
        assert engine.accelerators == ("fp32", "sdpa")
        assert levels(image(engine), reference[SEEDS[0]]) == 0


def test_cached_engines_share_accelerated_weights() -> None:
    from t2i_core import clear_cache

    clear_cache()
    try:
        first = load("tiny:sd15", device="cpu", accelerators=["fp32", "fuse_qkv"])
        second = load("tiny:sd15", device="cpu", accelerators=["fuse_qkv", "fp32"])
        assert second.pipeline is not first.pipeline
        assert second.pipeline.unet is first.pipeline.unet  # fused once, at the first load
        other = load("tiny:sd15", device="cpu", accelerators=["fp32"])
        assert other.pipeline.unet is not first.pipeline.unet
    finally:
        clear_cache()


# -- offloading: CUDA only, so refused here; the hooks it installs are checked directly ---------


@pytest.mark.parametrize("name", ["cpu_offload", "sequential_offload"])
def test_offload_is_refused_on_cpu(name: str) -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match=rf"{name} .*runs on cuda, not on cpu") as caught:
        tiny("fp32", name)
    assert caught.value.names == (name,)


def test_cpu_offload_installs_model_hooks(registry: Any, reference: dict[int, np.ndarray]) -> None:
    import torch
    from accelerate.hooks import CpuOffload

    engine = tiny("fp32")
    pipeline = engine.pipeline
    registry.accelerator("cpu_offload").apply(pipeline, context(engine, "cuda"))
    for name in ("text_encoder", "unet", "vae"):
        hook = getattr(pipeline, name)._hf_hook
        assert isinstance(hook, CpuOffload) and hook.execution_device == torch.device("cuda:0"), name
        assert next(getattr(pipeline, name).parameters()).device.type == "cpu"  # offloaded until it runs
    assert pipeline._offload_device == torch.device("cuda:0")
    # An engine-cache copy of the pipeline sees the same hooks, so it runs on the GPU too.
    assert engine.provider.share(pipeline)._execution_device == torch.device("cuda:0")

    # With the CPU as the "accelerator" the hooks run here. Not the same computation as the
    # reference: each hook moves its model to "cpu:0", which copies the weights out of the
    # checkpoint's memory map into new memory, where float32 matmuls may round differently on some
    # CPUs (0 levels measured here on SD1.5, 1 on Kandinsky 2.2 on an AMD EPYC): at most 1 level.
    local = tiny("fp32")
    registry.accelerator("cpu_offload").apply(local.pipeline, context(local, "cpu"))
    assert isinstance(local.pipeline.unet._hf_hook, CpuOffload)
    assert levels(image(local), reference[SEEDS[0]]) <= 1


def test_sequential_offload_installs_layer_hooks(registry: Any) -> None:
    import torch
    from accelerate.hooks import AlignDevicesHook

    engine = tiny("fp32")
    # accelerate moves small buffers to the execution device at once, so a CPU-only torch cannot
    # use "cuda" here; "meta" needs no device and shows the same hooks.
    registry.accelerator("sequential_offload").apply(engine.pipeline, context(engine, "meta"))
    unet = engine.pipeline.unet
    hook = unet.conv_in._hf_hook
    assert isinstance(hook, AlignDevicesHook) and hook.offload
    assert hook.execution_device == torch.device("meta:0")
    assert hook.weights_map["weight"].device.type == "cpu"  # the weights wait in CPU memory ...
    assert {p.device.type for p in unet.parameters()} == {"meta"}  # ... and nowhere else
    hooked = [m for m in unet.modules() if isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook)]
    assert len(hooked) > 50


# -- refusals, before any weights load ---------------------------------------------------------


@pytest.fixture
def pretend_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`load(device="cuda")` on a CPU machine, for the checks that run before the pipeline loads."""
    import t2i_core.engine.loading as engine_module
    from t2i_core.builtins.accelerators import dtype_problem

    monkeypatch.setattr(engine_module, "resolve_device", lambda device: device)

    def must_not_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the refusal must come before loading")

    monkeypatch.setattr(engine_module, "_load_pipeline", must_not_load)
    dtype_problem.cache_clear()
    yield
    dtype_problem.cache_clear()


@pytest.mark.parametrize(
    ("stack", "culprits", "reason"),
    [
        (["fp16", "cpu_offload", "compile"], ("cpu_offload", "compile"), "cpu_offload excludes compile"),
        (["fp16", "compile-vae", "cpu_offload"], ("cpu_offload", "compile-vae"), "excludes compile-vae"),
        (
            ["sequential_offload", "cpu_offload"],
            ("cpu_offload", "sequential_offload"),
            "sequential_offload excludes cpu_offload",
        ),
        (
            ["compile-regional", "sequential_offload"],
            ("sequential_offload", "compile-regional"),
            "excludes compile-regional",
        ),
        (["compile", "compile-regional"], ("compile", "compile-regional"), "compile excludes compile-regional"),
        (["fp16", "bf16"], ("fp16", "bf16"), "fp16 excludes bf16"),
    ],
)
def test_impossible_combinations_are_refused(
    pretend_cuda: None, stack: list[str], culprits: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match=reason) as caught:
        load("tiny:sd15", device="cuda", accelerators=stack, cache=False)
    assert set(caught.value.names) == set(culprits)


def test_low_memory_preset_with_compile_is_refused(pretend_cuda: None) -> None:
    with pytest.raises(IncompatibleAcceleratorsError, match="group_offload excludes compile"):
        load("tiny:sd15", device="cuda", accelerators=["low-memory", "compile"], cache=False)


def test_bf16_is_refused_on_a_gpu_without_it(pretend_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    with pytest.raises(
        IncompatibleAcceleratorsError, match=r"Tesla T4 \(compute capability 7.5\) has no native bfloat16"
    ):
        load("tiny:sd15", device="cuda", accelerators=["bf16"], cache=False)


def test_half_dtype_is_refused_when_the_cpu_lacks_an_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.nn.functional as F

    from t2i_core.builtins.accelerators import dtype_problem

    real_group_norm = F.group_norm

    def group_norm(x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.dtype == torch.float16:
            raise RuntimeError("\"GroupNorm\" not implemented for 'Half'")
        return real_group_norm(x, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", group_norm)
    dtype_problem.cache_clear()
    try:
        with pytest.raises(
            IncompatibleAcceleratorsError, match=r"group_norm is not implemented for float16 on cpu"
        ) as caught:
            tiny("fp16")
        assert caught.value.names == ("fp16",)
        assert dtype_problem("cpu", "bfloat16") is None  # the probe names what fails, not a blanket no
    finally:
        dtype_problem.cache_clear()


def test_compile_is_refused_without_its_toolchain(monkeypatch: pytest.MonkeyPatch, pretend_cuda: None) -> None:
    import torch._inductor.cpp_builder as cpp_builder
    import torch.utils._triton as triton_utils

    def no_compiler() -> str:
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(IncompatibleAcceleratorsError, match="needs a C\\+\\+ compiler.*No working C"):
        load("tiny:sd15", device="cpu", accelerators=["compile-regional"], cache=False)
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    with pytest.raises(IncompatibleAcceleratorsError, match="needs triton"):
        load("tiny:sd15", device="cuda", accelerators=["fp16", "compile"], cache=False)


def test_unknown_accelerator_names_the_known_ones() -> None:
    with pytest.raises(UnknownAcceleratorError) as caught:
        tiny("fp32", "warp-speed")
    message = str(caught.value)
    assert "accelerator='warp-speed'" in message
    for name in ("compile-regional", "fast", "low-memory", "vae_tiling"):
        assert name in message


# -- order and presets -------------------------------------------------------------------------


def test_accelerators_apply_in_phase_order_whatever_the_listed_order(registry: Any) -> None:
    calls: list[str] = []

    def recorder(name: str, phase: str) -> Accelerator:
        class Recorder(Accelerator):
            description = "records when it is applied"

            def apply(self, pipeline: Any, context: LoadContext) -> None:
                calls.append(self.name)

        Recorder.name, Recorder.phase = name, phase
        return Recorder()

    class Plugin:
        @hookimpl
        def register_accelerators(self, register: Callable[[Any], None]) -> None:
            for name, phase in (
                ("rec-compile", "compile"),
                ("rec-memory", "memory"),
                ("rec-dtype", "dtype"),
                ("rec-fusion", "fusion"),
            ):
                register(recorder(name, phase))

    registry.register_plugin(Plugin(), "test-recorders")
    try:
        listed = [
            "rec-compile",
            "vae_slicing",
            "rec-memory",
            "channels_last",
            "rec-fusion",
            "sdpa",
            "rec-dtype",
            "fp32",
        ]
        engine = tiny(*listed)
        phases = [registry.accelerator(name).phase for name in engine.accelerators]
        assert phases == sorted(phases, key=PHASES.index)  # and listing order within a phase
        assert engine.accelerators == (
            "rec-dtype",
            "fp32",
            "sdpa",
            "rec-fusion",
            "channels_last",
            "vae_slicing",
            "rec-memory",
            "rec-compile",
        )
        assert calls == ["rec-dtype", "rec-fusion", "rec-memory", "rec-compile"]
    finally:
        registry.unregister_plugin("test-recorders")


EXPECTED_PRESETS = {
    ("auto", "cuda"): ("fp16", "sdpa"),
    ("auto", "cpu"): ("fp32",),
    ("fast", "cuda"): ("fp16", "sdpa", "fuse_qkv", "channels_last", "compile", "compile-vae"),
    ("fast", "mps"): ("fp16", "sdpa", "fuse_qkv"),
    ("fast", "cpu"): ("fp32", "sdpa"),
    ("quick", "cuda"): ("fp16", "sdpa", "fuse_qkv", "channels_last", "compile-regional"),
    ("quick", "cpu"): ("fp32", "sdpa"),
    ("low-memory", "cuda"): ("fp16", "sdpa", "group_offload", "vae_tiling", "vae_slicing"),
    ("low-memory", "mps"): ("fp16", "sdpa", "vae_tiling", "vae_slicing"),
    ("low-memory", "cpu"): ("fp32", "sdpa", "vae_tiling", "vae_slicing"),
}


@pytest.mark.parametrize(("preset", "device"), sorted(EXPECTED_PRESETS))
def test_presets_expand_per_device(registry: Any, preset: str, device: str) -> None:
    names = tuple(a.name for a in registry.resolve_accelerators([preset], device))
    assert names == EXPECTED_PRESETS[preset, device]
    assert (
        tuple(a.name for a in registry.resolve_accelerators([preset], f"{device}:1" if device == "cuda" else device))
        == names
    )


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_every_preset_stack_is_consistent(registry: Any, preset: str, device: str) -> None:
    chosen = registry.resolve_accelerators([preset], device)
    names = {a.name for a in chosen}
    for accelerator in chosen:
        assert device in accelerator.devices, f"{preset} on {device} includes {accelerator.name}"
        assert not names.intersection(accelerator.conflicts), f"{preset} on {device}: {accelerator.name} conflicts"
    phases = [a.phase for a in chosen]
    assert phases == sorted(phases, key=PHASES.index)


def test_a_preset_combines_with_more_accelerators(registry: Any) -> None:
    names = [a.name for a in registry.resolve_accelerators(["vae_tiling", "auto", "sdpa"], "cuda")]
    assert names == ["fp16", "sdpa", "vae_tiling"]


# -- torch.compile -----------------------------------------------------------------------------


def test_compile_cache_folder_is_keyed_by_torch_python_and_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import torch

    from t2i_core.builtins.compile import cache

    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    cpu = cache.compile_cache_dir("cpu")
    assert cpu.parent.parent == tmp_path / "compile"
    assert (
        torch.__version__.split("+")[0] in cpu.parent.name
        and f"py{sys.version_info.major}.{sys.version_info.minor}" in cpu.parent.name
    )
    assert cpu.name.startswith("cpu-")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    gpu = cache.compile_cache_dir("cuda:0")
    assert gpu.parent == cpu.parent and gpu.name == "NVIDIA-H200-sm90"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    assert cache.compile_cache_dir("cuda").name == "NVIDIA-GeForce-RTX-4090-sm89"


def test_compile_cache_activation_respects_the_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import os

    from t2i_core.builtins.compile import cache

    monkeypatch.setattr(cache, "_active_cache", None)
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "t2i"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.activate_compile_cache("cpu") == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    chosen = cache.activate_compile_cache("cpu")
    assert chosen == cache.compile_cache_dir("cpu") and chosen.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)
    assert cache.activate_compile_cache("cpu") == chosen  # one folder per process


@pytest.mark.parametrize(("setting", "wanted"), [(None, False), ("0", False), ("1", True), ("on", True)])
def test_the_compile_cache_folder_is_opt_in(
    monkeypatch: pytest.MonkeyPatch, registry: Any, setting: str | None, wanted: bool
) -> None:
    """Only ``T2I_COMPILE_CACHE=1`` lets a compile accelerator point inductor at t2i's folder."""
    from t2i_core.builtins.compile import accelerators, calls

    if setting is None:
        monkeypatch.delenv("T2I_COMPILE_CACHE", raising=False)
    else:
        monkeypatch.setenv("T2I_COMPILE_CACHE", setting)
    monkeypatch.delenv("T2I_COMPILE_ARTIFACTS", raising=False)
    activated: list[str] = []
    monkeypatch.setattr(accelerators, "activate_compile_cache", activated.append)
    monkeypatch.setattr(calls, "compile_function", lambda function, options: function)
    engine = tiny("fp32")
    registry.accelerator("compile-vae").apply(engine.pipeline, context(engine, "cpu"))
    assert activated == (["cpu"] if wanted else [])


def test_compiling_accelerators_declare_what_they_compile(registry: Any) -> None:
    """What a plugin reads instead of a list of names (t2i-lora hot-swaps for a compiled denoiser)."""
    compiles = {name: a.compiles for name, a in registry.accelerators.items() if a.compiles}
    assert compiles == {"compile": ("denoiser",), "compile-regional": ("denoiser",), "compile-vae": ("decoder",)}


def test_regional_compile_falls_back_to_resnet_and_attention_blocks() -> None:
    from t2i_core.builtins.compile import compile_regions

    unet = kandinsky_like_unet()  # no BasicTransformerBlock, so no declared repeated block is present
    count = compile_regions(unet)
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert count == len(compiled) > 0
    assert {type(m).__name__ for m in compiled} == {"ResnetBlock2D", "Attention"}
    assert unet._compiled_call_impl is None


@pytest.mark.parametrize(
    ("device", "dtype", "stack", "unet_graphs", "vae_graphs"),
    [
        ("cuda", "fp16", (), True, True),
        ("cuda", "fp16", ("vae_tiling",), True, False),  # tiles outlive a CUDA graph's output
        ("cuda", "fp16", ("vae_slicing",), True, False),
        ("cpu", "fp32", (), False, False),  # CUDA graphs exist on CUDA only
    ],
)
def test_compile_options_per_device_and_stack(
    registry: Any,
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    dtype: str,
    stack: tuple[str, ...],
    unet_graphs: bool,
    vae_graphs: bool,
) -> None:
    from t2i_core.builtins.compile import calls as compiled
    from t2i_core.builtins.compile import compile_options

    engine = tiny("fp32")  # the options depend on the stack's names, not on the weights
    calls: dict[str, dict[str, Any]] = {}
    owners = {engine.pipeline.unet.forward.__func__: "unet", engine.pipeline.vae.decoder.forward.__func__: "vae"}
    monkeypatch.setattr(
        compiled, "compile_function", lambda function, options: calls.__setitem__(owners[function.__func__], options)
    )
    ctx = LoadContext(
        model=engine.model,
        source=engine.source,
        family=engine.family,
        provider=engine.provider,
        device=device,
        accelerators=(dtype, *stack, "compile", "compile-vae"),
    )
    registry.accelerator("compile").compile(engine.pipeline, ctx)
    registry.accelerator("compile-vae").compile(engine.pipeline, ctx)
    assert calls["unet"] == compile_options(device, cuda_graphs=unet_graphs)
    assert calls["vae"] == compile_options(device, cuda_graphs=vae_graphs)
    assert compiled.uses_cuda_graphs(calls["unet"]) is unet_graphs
    assert compiled.uses_cuda_graphs(calls["vae"]) is vae_graphs


@pytest.mark.parametrize(("family", "cuda_graphs"), [("sdxl", False), ("sd15", True)])
def test_compiled_vae_skips_cuda_graphs_only_when_the_pipeline_upcasts_it(
    registry: Any, monkeypatch: pytest.MonkeyPatch, family: str, cuda_graphs: bool
) -> None:
    """SDXL's pipeline casts an fp16 VAE with force_upcast to fp32 around every decode; SD 1.5's
    VAE config inherits force_upcast=True too, but its pipeline never upcasts (no upcast_vae)."""
    import torch

    from t2i_core.builtins.compile import calls as compiled
    from t2i_core.builtins.compile import compile_options

    engine = load(f"tiny:{family}", device="cpu", accelerators=["fp32"], cache=False)
    vae = engine.pipeline.vae
    vae.to(torch.float16)
    vae.register_to_config(force_upcast=True)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(compiled, "compile_function", lambda function, options: calls.append(options))
    registry.accelerator("compile-vae").compile(engine.pipeline, context(engine, "cuda"))
    assert calls == [compile_options("cuda", cuda_graphs=cuda_graphs)]


@pytest.fixture
def compile_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """t2i's own persistent compile folder under the test cache (warm after the first run)."""
    import torch

    from t2i_core.builtins.compile import cache
    from t2i_core.tiny import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("T2I_COMPILE_CACHE", "1")
    monkeypatch.setattr(cache, "_active_cache", None)
    torch._dynamo.reset()
    yield cache_dir() / "compile"
    torch._dynamo.reset()


def test_regional_compile_recompiles_for_size_and_batch_only(
    compile_cache: Any, reference: dict[int, np.ndarray]
) -> None:
    import torch
    from torch._dynamo.exc import RecompileError

    engine = tiny("fp32", "compile-regional")
    unet = engine.pipeline.unet
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert unet._compiled_call_impl is None  # only the repeated blocks
    assert levels(image(engine), reference[SEEDS[0]]) <= 1
    assert any(compile_cache.rglob("*")), "the inductor artefacts go to t2i's compile cache"

    with torch._dynamo.config.patch(error_on_recompile=True):
        # Prompt, seed, guidance (while above 1) and step count reuse the compiled code ...
        image(engine, seed=99, prompt="a lighthouse at dusk", guidance_scale=3.0, num_inference_steps=STEPS + 2)
        # ... a new size or batch does not; nor does turning guidance off, which halves the batch.
        for change in ({"height": 96}, {"num_images": 2}, {"guidance_scale": 1.0}):
            with pytest.raises(RecompileError):
                image(engine, **change)


@pytest.mark.slow
def test_full_compile_and_compiled_vae(compile_cache: Any, reference: dict[int, np.ndarray]) -> None:
    from t2i_core.builtins.compile import compiled_call

    engine = tiny("fp32", "compile", "compile-vae")
    assert compiled_call(engine.pipeline.unet) is not None
    assert compiled_call(engine.pipeline.vae.decoder) is not None
    for seed in SEEDS:
        assert levels(image(engine, seed), reference[seed]) <= 1


@pytest.mark.slow
def test_a_new_process_reuses_the_persistent_compile_cache(tmp_path: Any) -> None:
    import os

    code = (
        "import torch\n"
        "from torch._dynamo.utils import counters\n"
        "from t2i_core import GenerationRequest, load\n"
        "engine = load('tiny:sd15', device='cpu', accelerators=['fp32', 'compile-regional'], cache=False)\n"
        "engine.generate(GenerationRequest(prompt='a cat', seed=1, num_inference_steps=2))\n"
        "print(dict(counters['inductor']).get('fxgraph_cache_hit', 0), dict(counters['inductor']).get('fxgraph_cache_miss', 0))\n"
    )
    env = {**os.environ, "T2I_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "T2I_COMPILE_CACHE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    (cold_hits, cold_misses), (warm_hits, warm_misses) = (map(int, r.stdout.split()[-2:]) for r in runs)
    assert cold_misses > 0 and cold_hits == 0
    assert warm_hits > 0 and warm_misses == 0


@pytest.mark.parametrize("family", ["sdxl", "kandinsky22"])
def test_images_stay_within_tolerance_on_the_other_families(family: str) -> None:
    """The bounds of docs/optimize.md, on tiny SDXL and Kandinsky 2.2 too (3 steps, levels of 255)."""
    from t2i_core import GenerationRequest

    request = GenerationRequest(prompt="a red fox", negative_prompt="blurry", seed=3, num_inference_steps=3)

    def picture(*accelerators: str) -> np.ndarray:
        engine = load(f"tiny:{family}", device="cpu", accelerators=list(accelerators), cache=False)
        return np.asarray(engine.generate(request).images[0], dtype=np.int16)

    reference = picture("fp32")
    # sdpa: every family's default attention processors are SDPA ones already, so the same work (0);
    # channels-last and fused projections change the kernels (1).
    bounds = {("fp32", "sdpa"): 0, ("fp32", "channels_last"): 1, ("fp32", "fuse_qkv"): 1}
    if family == "sdxl":  # Kandinsky's random-weight prior makes half precision meaningless (docs/optimize.md)
        bounds.update({("fp16",): 3, ("bf16",): 8})
    for stack, bound in bounds.items():
        distance = int(np.abs(picture(*stack) - reference).max())
        assert distance <= bound, f"{'+'.join(stack)} is {distance} levels from fp32 on {family}"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fuse_qkv_frees_the_projections_it_replaces(family: str) -> None:
    """Parameter memory after fusing equals the unfused model's: the fused weights replace q/k/v
    instead of sitting beside them (diffusers alone keeps both: +1.2 GiB on SDXL's fp16 UNet)."""
    from diffusers.models.attention_processor import Attention

    def parameter_bytes(engine: Any) -> int:
        return sum(p.numel() * p.element_size() for p in engine.pipeline.unet.parameters())

    plain = load(f"tiny:{family}", device="cpu", accelerators=["fp32"], cache=False)
    fused = load(f"tiny:{family}", device="cpu", accelerators=["fp32", "fuse_qkv"], cache=False)
    attentions = [m for m in fused.pipeline.unet.modules() if isinstance(m, Attention)]
    assert all(hasattr(a, "to_kv" if a.is_cross_attention else "to_qkv") for a in attentions)
    assert parameter_bytes(fused) == parameter_bytes(plain)
    request = GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=2)
    assert levels(as_array(fused.generate(request).images[0]), as_array(plain.generate(request).images[0])) <= 1


def test_group_offload_streams_layers_and_keeps_the_image(registry: Any, fp32: Any) -> None:
    """Leaf-level group offload, run with the CPU as its "GPU" (no side stream there): every layer
    is onloaded only while it runs, and the image stays within a level of plain fp32 (the onload
    copies weights into new memory, whose alignment can change float32 rounding)."""
    from t2i_core.accelerator import is_offloaded

    engine = tiny("fp32")
    assert not is_offloaded(engine.pipeline.unet)
    registry.accelerator("group_offload").apply(engine.pipeline, context(engine, "cpu"))
    assert is_offloaded(engine.pipeline.unet) and is_offloaded(engine.pipeline.vae)
    request = GenerationRequest(prompt=PROMPT, seed=SEEDS[0], num_inference_steps=STEPS)
    assert levels(as_array(engine.generate(request).images[0]), as_array(fp32.generate(request).images[0])) <= 1


def test_vae_tiling_applies_at_sdxl_native_size() -> None:
    """SDXL's VAE config says 1024-pixel tiles, so tiling would do nothing at 1024x1024; t2i caps tiles at 512."""
    from t2i_core.builtins.memory import MAX_TILE

    engine = load("tiny:sdxl", device="cpu", accelerators=["fp32"], cache=False)
    vae = engine.pipeline.vae
    factor = vae.tile_sample_min_size // vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 1024, 1024 // factor  # as the real SDXL VAE
    get_registry_accelerator = engine._registry.accelerator
    get_registry_accelerator("vae_tiling").apply(engine.pipeline, context(engine, "cpu"))
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (MAX_TILE, MAX_TILE // factor)
