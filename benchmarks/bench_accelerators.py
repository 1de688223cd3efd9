"""t2i's accelerator presets against raw diffusers, side by side in one process.

    python benchmarks/bench_accelerators.py --family sd15 [--family sdxl ...] [--device cuda] [-o out.json]
    python benchmarks/bench_accelerators.py --device cpu --tiny          # over 20 minutes (compiles)

Full-size mode (the default) builds each family's real architecture with random weights from
the config files each family plugin ships in ``t2i_<family>/architecture/`` (speed does not depend on weight values;
nothing is downloaded): SD1.5 at 512², SDXL at 1024², Kandinsky 2.2 at 512², 30 steps, batch 1,
classifier-free guidance at the family's default scale. ``--tiny`` uses the families'
``tiny:<family>`` checkpoints instead; ``--size`` runs full-size architectures at a small size.

Variants, on identical weights:

- ``raw-eager``: diffusers alone, fp16 (fp32 on CPU), the pipeline as loaded.
- ``raw-compiled``: that plus channels-last and ``torch.compile(mode="reduce-overhead")`` on the
  UNet, as diffusers' documentation recommends (default mode off CUDA: no CUDA graphs there).
- ``raw-fast``: raw-compiled plus the lossless tricks of t2i's ``fast`` (fused QKV projections
  and a compiled VAE decoder), so that what ``fast`` adds beyond them is visible.
- ``t2i-<preset>``: ``t2i_core.load(..., accelerators=[preset])`` (auto, quick, fast, low-memory),
  or ``t2i:<name>+<name>`` for any stack of accelerators.
- ``raw-int8``, ``raw-nf4``, ``raw-fp8``: raw eager loaded with what t2i-quantize's accelerator
  of the same name hands diffusers, written as a diffusers user writes it: ``quantization_config=
  PipelineQuantizationConfig(quant_mapping=...)`` with torchao's ``Int8WeightOnlyConfig()`` or
  ``Float8DynamicActivationFloat8WeightConfig()`` on the denoiser, or bitsandbytes NF4 on the
  denoiser (diffusers' ``BitsAndBytesConfig``) and on the T5 / LLM text encoders (transformers').
  A ``t2i:`` variant with the same quantizer is compared with it (``same_quantization_diff``:
  the image must be the same; ``speedup_vs_raw_same_quantization``). nf4 and fp8 need CUDA (fp8
  compute capability 8.9): elsewhere they are reported as ``skipped``, with the reason. They
  quantize as weights load, so they need a checkpoint on disk: ``--tiny``, or ``--checkpoint DIR``,
  which saves the full-size random weights once in ``DIR/<family>-<dtype>`` and has every variant
  load them from there like a real checkpoint (FLUX.1 in bf16: about 34 GB). On CPU::

      python benchmarks/bench_accelerators.py --device cpu --tiny --family flux --steps 8 --no-warm \
          --phase steady --variants raw-eager,raw-int8,t2i:fp32,t2i:fp32+int8
- ``raw-eager+<cache>``: raw eager with one of t2i's step caches written as a diffusers user
  writes it (``raw-eager+first-block-cache@0.2`` is ``transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))``);
  a ``t2i:`` variant with the same cache spec is compared with it (speed and image: they must
  be the same). Each variant with a step cache reports how many full denoiser calls its first
  image took (``full_denoiser_calls``, out of ``--steps``). For example, on CPU::

      python benchmarks/bench_accelerators.py --device cpu --tiny --family flux --steps 28 --no-warm \
          --variants raw-eager,raw-eager+first-block-cache@0.2,t2i:fp32+first-block-cache@0.2

Two phases (``--phase``; ``all`` runs both), each writing the JSON (``-o``) after every step, so
a run cut off by a time limit still reports what it measured:

- ``steady``: every variant is loaded in this process, makes its first image and ``--warmup``
  more, then the variants take turns, one timed image each, for ``--runs`` rounds (ABAB..., the
  order reversed every other round), so they all see the same machine state; the ratios of
  each round are reported against both raw baselines.
- ``first-image``: each compiled variant in new processes, killed after ``--child-timeout``
  seconds: *cold* with fresh inductor and Triton cache folders, *warm* from the folders the cold
  run filled, and *mega-cache* with fresh folders plus the portable artefacts file the cold run
  saved (``torch.compiler.save_cache_artifacts``; t2i loads it through ``T2I_COMPILE_ARTIFACTS``).
  Each child reports its load and first-image times, peak allocated and reserved GPU memory of
  that variant alone, dynamo's graph and recompile counts, inductor's cache hits and misses,
  CUDA-graph skips, and for t2i variants `compile_stats`.

Everything is written as JSON with the GPU and library versions; each image's distance from
raw eager's is in levels of 255. The default phase, ``sequential``, loads one variant at a time
(freed before the next loads, so two full-size FLUX.1 variants can be compared on one GPU); on
CUDA it reports each variant's peak allocated memory while loading and while making images.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def architecture(family: str) -> Path:
    """The family's full-size config files, shipped with its plugin (``ModelProvider.architecture_folder``)."""
    from t2i_core import get_registry

    folder = get_registry().provider(family).architecture_folder()
    if folder is None:
        raise SystemExit(f"family {family!r} ships no architecture/ config folder; use --tiny")
    return folder


def components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The components of a diffusers ``model_index.json``: name → (library, class); absent ones left out."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and None not in value
    }


def arguments(index: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's other constructor arguments in ``model_index.json`` (``requires_safety_checker``, absent components)."""
    extra: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_") or name in components(index):
            continue
        extra[name] = None if isinstance(value, list) else value
    return extra


#: where diffusers' layout keeps each kind of component's configuration
CONFIG_FILES = {
    "Scheduler": "scheduler_config.json",
    "Tokenizer": "tokenizer_config.json",
    "TokenizerFast": "tokenizer_config.json",
    "Processor": "preprocessor_config.json",
}


def component_config(folder: Path, name: str, class_name: str) -> dict[str, Any]:
    """``<name>/config.json`` (or the scheduler, tokenizer or processor file) of a diffusers-layout folder."""
    file = next((file for suffix, file in CONFIG_FILES.items() if class_name.endswith(suffix)), "config.json")
    config = json.loads((folder / name / file).read_text())
    return {key: value for key, value in config.items() if key != "tokenizer_class"}


def architecture_size(folder: Path) -> int:
    """The checkpoint's native image size: the denoiser's sample size times the autoencoder's scale."""
    index = json.loads((folder / "model_index.json").read_text())
    parts = components(index)
    denoiser = next(name for name in ("unet", "transformer") if name in parts)
    sample = component_config(folder, denoiser, parts[denoiser][1]).get("sample_size")
    autoencoder = next(name for name in ("vae", "movq") if name in parts)
    autoencoder_config = component_config(folder, autoencoder, parts[autoencoder][1])
    if sample is None:  # FLUX.1's transformer has no sample size: its VAE's is the image size (1024)
        return int(autoencoder_config["sample_size"])
    return int(sample) * 2 ** (len(autoencoder_config["block_out_channels"]) - 1)


FAMILIES = ("sd15", "sdxl", "kandinsky22", "flux", "sd3", "z-image")
DEFAULT_VARIANTS = ("raw-eager", "t2i-auto", "t2i-low-memory", "raw-compiled", "raw-fast", "t2i-quick", "t2i-fast")
RAW_VARIANTS = ("raw-eager", "raw-compiled", "raw-fast", "raw-int8", "raw-nf4", "raw-fp8")
#: raw eager loaded with a quantization config: variant -> the t2i-quantize accelerator it mirrors
RAW_QUANTIZED = {"raw-int8": "int8", "raw-nf4": "nf4", "raw-fp8": "fp8"}
#: a raw eager variant with a step cache: ``raw-eager+first-block-cache@0.2``
RAW_CACHE = "raw-eager+"
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
SEED = 31

Runner = Callable[[int], list[Any]]


class Skipped(Exception):
    """A variant that cannot run on this device (nf4 off CUDA): reported with the reason, not as an error."""


# -- building full-size pipelines from config files --------------------------------------------


def build_pipeline(folder: Path, dtype: Any, device: str, seed: int = 0) -> Any:
    """The pipeline described by ``folder/model_index.json``, with random weights made on `device`."""
    import diffusers
    import torch

    index = json.loads((folder / "model_index.json").read_text())
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="t2i-bench-") as scratch:
        for name, (library, class_name) in components(index).items():
            config = component_config(folder, name, class_name)
            # Made in `dtype` directly: FLUX.1's 12B transformer in float32 alone is 48 GB.
            with _default_dtype(dtype):
                part = _build_component(library, class_name, config, Path(scratch) / name, device)
            if isinstance(part, torch.nn.Module):
                part = part.to(dtype=dtype).eval()
            parts[name] = part
    pipeline = getattr(diffusers, index["_class_name"])(**parts, **arguments(index))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_component(library: str, class_name: str, config: dict[str, Any], scratch: Path, device: str) -> Any:
    import torch

    if class_name in ("T5TokenizerFast", "T5Tokenizer"):  # transformers 5 names the fast one T5Tokenizer
        from t2i_core.tiny import t5_tokenizer

        # A Unigram vocabulary built offline (FLUX.1's T5): ids differ from T5's, the sequence length does not.
        return t5_tokenizer(scratch, model_max_length=config["model_max_length"])
    if class_name == "CLIPTokenizer":
        from t2i_core.tiny import clip_tokenizer

        # A byte-level vocabulary built offline: token ids differ from CLIP's, the cost does not.
        return clip_tokenizer(scratch, max_length=config["model_max_length"], pad_token=config["pad_token"])
    if library == "transformers":
        import transformers

        if class_name.endswith("Processor"):
            return getattr(transformers, class_name)(**config)
        settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        model_config = transformers.AutoConfig.for_model(config["model_type"], **settings)
        with torch.device(device):
            return getattr(transformers, class_name)(model_config)
    import diffusers

    cls = getattr(diffusers, class_name)
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    if "Scheduler" in class_name:
        return cls.from_config(settings)
    with torch.device(device):
        return cls.from_config(settings)


# -- where the models come from ------------------------------------------------------------------


class Source:
    """One family's checkpoint for every variant: full-size from configs (or saved from them), or the tiny one."""

    def __init__(
        self, family: str, tiny: bool, device: str, *, checkpoint: Path | None = None, dtype: str = "float32"
    ) -> None:
        from t2i_core import get_registry

        self.family = family
        self.tiny = tiny
        self.device = device
        #: how the full-size weights came to be on disk (``--checkpoint``), for the report
        self.saved: dict[str, Any] | None = None
        registry = get_registry()
        self.base = base = registry.providers.get(family)
        #: the provider that loads `folder` (the family's own, or one that builds from configs)
        self.provider: Any = base
        if (tiny or checkpoint is not None) and base is None:
            raise SystemExit(
                f"--tiny and --checkpoint need the t2i-{family} plugin (family {family!r} is not registered)"
            )
        if tiny:
            from t2i_core.tiny import ensure_built

            assert base is not None
            self.folder = ensure_built(base.name, base.tiny_version, base.build_tiny)
            self.model, self.load_family = f"tiny:{family}", None
            self.source = f"tiny:{family}"
            return
        self.architecture = architecture(family)
        index = json.loads((self.architecture / "model_index.json").read_text())
        self.source = index.get("_name_or_path", self.architecture.name)
        if checkpoint is not None:
            self.folder, self.saved = saved_checkpoint(
                self.architecture, checkpoint / f"{family}-{dtype}", dtype, device
            )
            self.model, self.load_family = str(self.folder), family
            self.source += f" (random weights saved in {self.folder})"
        else:
            self.folder = self.architecture
            self.model, self.load_family = str(self.folder), f"bench-{family}"
            self.provider = _register_config_provider(registry, family, self.folder, self.base, device)

    @property
    def from_disk(self) -> bool:
        """Whether variants load weights from a folder (and so can quantize them as they load)."""
        return self.tiny or self.saved is not None

    def raw_pipeline(self, dtype: Any, *, quantization: str | None = None) -> Any:
        """A fresh pipeline on the benchmark device, loaded the way a diffusers user does (with
        `quantization`: ``int8``, ``nf4`` or ``fp8`` weights, quantized as they load)."""
        if self.from_disk:
            kwargs = {"torch_dtype": dtype, "use_safetensors": True}
            if quantization is not None:
                kwargs["quantization_config"] = quantization_config(quantization, self.folder, dtype)
            pipeline = self.provider.load(str(self.folder), kwargs)
            pipeline.to(self.device)
        elif quantization is not None:
            raise ValueError(f"raw-{quantization} quantizes as weights load: use --tiny or --checkpoint DIR")
        else:
            pipeline = build_pipeline(self.folder, dtype, self.device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def native_size(self) -> int:
        if self.tiny:
            import torch

            height, _ = self.provider.native_size(self.provider.load(str(self.folder), {"torch_dtype": torch.float32}))
            return height
        return architecture_size(self.architecture)


#: the file that marks a folder of full-size random weights as this benchmark's, and how it was made
CHECKPOINT_MARKER = "t2i-bench-checkpoint.json"


def saved_checkpoint(architecture: Path, folder: Path, dtype: str, device: str) -> tuple[Path, dict[str, Any]]:
    """`architecture` with random weights (seed 0, `dtype`), saved once in `folder` in diffusers' layout.

    Quantizing accelerators quantize as weights load, so full-size variants with them load a
    checkpoint from disk, as a user's would. A folder saved earlier with the same settings is
    reused; one cut off while saving (``<folder>.partial``) is made again. A folder that this
    benchmark did not save is never written over.
    """
    import torch

    configs = sorted(architecture.rglob("*.json"))
    digest = hashlib.sha256(b"".join(file.read_bytes() for file in configs)).hexdigest()[:16]
    made = {"architecture": architecture.name, "configs_sha256": digest, "dtype": dtype, "seed": 0}
    partial = folder.with_name(f"{folder.name}.partial")
    for existing in (folder, partial):
        if existing.exists() and not (existing / CHECKPOINT_MARKER).is_file():
            raise SystemExit(
                f"--checkpoint: {existing} exists and was not saved by this benchmark; name another folder"
            )
    if folder.exists() and json.loads((folder / CHECKPOINT_MARKER).read_text()) == made:
        return folder, {"path": str(folder), "reused": True}
    for existing in (folder, partial):
        shutil.rmtree(existing, ignore_errors=True)
    start = time.perf_counter()
    partial.mkdir(parents=True)
    (partial / CHECKPOINT_MARKER).write_text(json.dumps({**made, "complete": False}))
    pipeline = build_pipeline(architecture, getattr(torch, dtype), device)
    built = time.perf_counter()
    pipeline.save_pretrained(partial, safe_serialization=True)
    del pipeline
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    (partial / CHECKPOINT_MARKER).write_text(json.dumps(made))
    partial.rename(folder)
    size = sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())
    saved = time.perf_counter()
    return folder, {"path": str(folder), "build_s": built - start, "save_s": saved - built, "gib": size / 2**30}


def quantization_config(name: str, folder: Path, dtype: Any) -> Any:
    """What a diffusers user passes as ``from_pretrained(quantization_config=...)`` for t2i-quantize's `name`.

    ``int8`` and ``fp8``: torchao's ``Int8WeightOnlyConfig()`` or ``Float8DynamicActivationFloat8WeightConfig()``
    on the denoiser; ``nf4``: bitsandbytes 4-bit NF4 computing in `dtype` on the denoiser (diffusers'
    ``BitsAndBytesConfig``) and on each text encoder that is not CLIP (T5, an LLM; transformers').
    """
    from diffusers import PipelineQuantizationConfig

    parts = components(json.loads((folder / "model_index.json").read_text()))
    denoiser = next(part for part in ("unet", "transformer", "prior") if part in parts)
    if name == "int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return PipelineQuantizationConfig(quant_mapping={denoiser: TorchAoConfig(Int8WeightOnlyConfig())})
    if name == "fp8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return PipelineQuantizationConfig(
            quant_mapping={denoiser: TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())}
        )
    import diffusers
    import transformers

    nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    mapping: dict[str, Any] = {denoiser: diffusers.BitsAndBytesConfig(**nf4)}
    for part, (library, class_name) in parts.items():
        if part.startswith("text_encoder") and library == "transformers" and not class_name.startswith("CLIP"):
            mapping[part] = transformers.BitsAndBytesConfig(**nf4)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def quantization_problem(name: str, device: str) -> str | None:
    """Why `name` cannot quantize on `device` (the devices t2i-quantize allows it), or None when it can."""
    if name == "int8":
        return None
    if not device.startswith("cuda"):
        what = "bitsandbytes' 4-bit NF4" if name == "nf4" else "float8 matrix multiplication"
        return f"{name}: {what} needs a CUDA GPU, not {device}"
    if name == "fp8":
        import torch

        index = torch.device(device).index or 0
        capability = torch.cuda.get_device_capability(index)
        if capability < (8, 9):
            return (
                f"fp8: float8 matrix multiplication needs compute capability 8.9 or newer; "
                f"{torch.cuda.get_device_name(index)} has {capability[0]}.{capability[1]}"
            )
    return None


def _register_config_provider(registry: Any, family: str, folder: Path, base: Any, device: str) -> Any:
    """Register (through the public plugin API) a provider whose `load` builds from config files."""
    from t2i_core import FamilyDefaults, ModelProvider, hookimpl

    name = f"bench-{family}"
    if name in registry.providers:
        return registry.providers[name]
    delegate = base if base is not None else ModelProvider()

    class ConfigProvider(ModelProvider):
        """``family``'s provider, except that weights are random, built from the plugin's ``architecture/`` configs."""

        defaults = base.defaults if base is not None else FamilyDefaults()

        def load(self, source: str, load_kwargs: Any) -> Any:
            import torch

            if "quantization_config" in load_kwargs:  # built weights would leave it out unsaid
                raise ValueError("a quantizing accelerator quantizes as weights load: run with --checkpoint DIR")
            return build_pipeline(folder, load_kwargs.get("torch_dtype", torch.float32), device)

        def share(self, pipeline: Any) -> Any:
            return delegate.share(pipeline)

        def native_size(self, pipeline: Any) -> tuple[int, int]:
            size = architecture_size(folder)
            return size, size

        def scheduler_owner(self, pipeline: Any) -> Any:
            return delegate.scheduler_owner(pipeline)

        def check(self, request: Any) -> dict[str, Any]:
            return dict(delegate.check(request)) if base is not None else super().check(request)

        def call_kwargs(self, request: Any, options: Any) -> dict[str, Any]:
            return dict(delegate.call_kwargs(request, options))

        def run(self, pipeline: Any, kwargs: dict[str, Any], progress: Any = None) -> list[Any]:
            return list(delegate.run(pipeline, kwargs, progress))

    ConfigProvider.name = name
    provider = ConfigProvider()

    class Plugin:
        @hookimpl
        def register_providers(self, register: Callable[[Any], None]) -> None:
            register(provider)

    registry.register_plugin(Plugin(), name)
    return provider


# -- the variants ----------------------------------------------------------------------------------


def _raw_dtype(family: str, device: str) -> str:
    """Raw variants' default dtype: float16 on CUDA (bfloat16 for FLUX.1, whose activations overflow float16)."""
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if family == "flux" else "float16"


def accelerators_of(variant: str) -> list[str] | None:
    """The accelerator names a ``t2i-<preset>`` / ``t2i:<a>+<b>`` variant loads with; None for raw ones."""
    if variant.startswith("t2i-"):
        return [variant.removeprefix("t2i-")]
    if variant.startswith("t2i:"):
        return variant.removeprefix("t2i:").split("+")
    if variant in RAW_VARIANTS:
        return None
    if variant.startswith(RAW_CACHE):
        cache_name(variant)
        return None
    raise SystemExit(
        f"unknown variant {variant!r}: {', '.join(RAW_VARIANTS)}, raw-eager+<cache>, t2i-<preset> or t2i:<name>+<name>"
    )


#: each step cache's value when a spec names none (t2i's defaults): ``first-block-cache`` is ``first-block-cache@0.2``
CACHE_DEFAULTS = {"first-block-cache": 0.2, "taylorseer": 5, "magcache": 0.06, "faster-cache": 2}


#: t2i's step caches, each as a diffusers user writes it: (spec value or None, raw pipeline, steps) -> config
def _cache_configs() -> dict[str, Callable[[str | None, Any, int], Any]]:
    import diffusers
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    def value_of(name: str, value: str | None) -> float:
        return float(value) if value else CACHE_DEFAULTS[name]

    return {
        "first-block-cache": lambda value, pipeline, steps: diffusers.FirstBlockCacheConfig(
            threshold=value_of("first-block-cache", value)
        ),
        "taylorseer": lambda value, pipeline, steps: diffusers.TaylorSeerCacheConfig(
            cache_interval=int(value_of("taylorseer", value))
        ),
        "magcache": lambda value, pipeline, steps: diffusers.MagCacheConfig(
            threshold=value_of("magcache", value), mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps
        ),
        "faster-cache": lambda value, pipeline, steps: diffusers.FasterCacheConfig(
            spatial_attention_block_skip_range=int(value_of("faster-cache", value)),
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,
            current_timestep_callback=lambda: pipeline.current_timestep,
        ),
    }


CACHES = ("first-block-cache", "taylorseer", "magcache", "faster-cache")


def cache_name(variant: str) -> str:
    """The step cache of a ``raw-eager+<cache>`` variant (``magcache`` of ``raw-eager+magcache@0.1``)."""
    name = variant.removeprefix(RAW_CACHE).partition("@")[0]
    if name not in CACHES:
        raise SystemExit(f"unknown step cache in variant {variant!r}: one of {', '.join(CACHES)}")
    return name


def cache_spec(stack: list[str]) -> str | None:
    """The step cache spec (``first-block-cache@0.2``) among the accelerators a t2i variant resolved to."""
    return next((name for name in stack if name.partition("@")[0] in CACHES), None)


def same_cache(spec: str, other: str) -> bool:
    """Whether two step cache specs are one cache with one value (``first-block-cache`` is ``first-block-cache@0.2``)."""

    def settings(text: str) -> tuple[str, float]:
        name, _, value = text.partition("@")
        return name, float(value) if value else CACHE_DEFAULTS.get(name, 0.0)

    return settings(spec) == settings(other)


def make_runner(variant: str, source: Source, settings: dict[str, Any]) -> tuple[Runner, list[str], Any]:
    """Load `variant` and return (a function seed → images, the accelerators it resolved to, its pipeline)."""
    import torch

    from t2i_core import GenerationRequest, load

    request = GenerationRequest(
        prompt=PROMPT,
        height=settings["size"],
        width=settings["size"],
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance_scale"],
        num_images=settings["batch"],
        seed=SEED,
        scheduler=settings.get("scheduler"),
    )
    names = accelerators_of(variant)
    if names is not None:
        from t2i_core import IncompatibleAcceleratorsError

        try:
            engine = load(
                source.model, family=source.load_family, device=source.device, accelerators=names, cache=False
            )
        except IncompatibleAcceleratorsError as exc:  # a stack this device cannot take (nf4 on a CPU)
            raise Skipped(str(exc)) from exc
        run = lambda seed: engine.generate(request.evolve(seed=seed)).images  # noqa: E731
        return run, list(engine.accelerators), engine.pipeline

    dtype = getattr(torch, settings["dtype"])
    quantization = RAW_QUANTIZED.get(variant)
    problem = quantization_problem(quantization, source.device) if quantization is not None else None
    if problem is not None:
        raise Skipped(problem)
    pipeline = source.raw_pipeline(dtype, quantization=quantization)
    applied = [settings["dtype"], *([f"quantization_config={quantization}"] if quantization else [])]
    if settings.get("scheduler"):
        from t2i_core import schedulers

        owner = source.provider.scheduler_owner(pipeline)
        owner.scheduler = schedulers.build(settings["scheduler"], owner.scheduler.config)
    if variant.startswith(RAW_CACHE):
        spec = variant.removeprefix(RAW_CACHE)
        name, _, value = spec.partition("@")
        denoiser = pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer
        config = _cache_configs()[name](value or None, pipeline, settings["steps"])
        denoiser.enable_cache(config)
        applied.append(f"enable_cache({type(config).__name__})")
    if variant in ("raw-compiled", "raw-fast"):
        owner = getattr(pipeline, "decoder_pipe", pipeline)  # Kandinsky's combined pipeline
        mode = "reduce-overhead" if source.device.startswith("cuda") else None
        denoiser = "unet" if getattr(owner, "unet", None) is not None else "transformer"  # FLUX.1: a transformer
        if variant == "raw-fast" and hasattr(getattr(owner, denoiser), "fuse_qkv_projections"):
            getattr(owner, denoiser).fuse_qkv_projections()
            applied.append(f"{denoiser}.fuse_qkv_projections()")
        if denoiser == "unet":
            owner.unet.to(memory_format=torch.channels_last)
            applied.append("channels_last")
        setattr(owner, denoiser, torch.compile(getattr(owner, denoiser), mode=mode, fullgraph=True))
        applied.append(f"torch.compile({denoiser}, mode={mode!r}, fullgraph=True)")
        vae = getattr(owner, "vae", None) or getattr(owner, "movq", None)
        if variant == "raw-fast" and vae is not None:
            if hasattr(vae, "fuse_qkv_projections"):
                vae.fuse_qkv_projections()
            vae.decoder = torch.compile(vae.decoder, mode=mode)
            applied.append(f"torch.compile(vae.decoder, mode={mode!r})")
    # The arguments t2i passes for this request, so that both sides do the same work.
    kwargs = source.provider.call_kwargs(request, source.provider.check(request))

    def run(seed: int) -> list[Any]:
        generator = torch.Generator("cpu").manual_seed(seed)
        return list(pipeline(**kwargs, generator=generator).images)

    return run, applied, pipeline


def measure(variant: str, source: Source, settings: dict[str, Any], *, first_only: bool = False) -> dict[str, Any]:
    import torch

    cuda = source.device.startswith("cuda")
    record: dict[str, Any] = {"variant": variant}
    with _fresh_memory(cuda):
        if cuda:  # what an earlier variant left allocated (nothing, unless something holds on to it)
            record["gpu_memory_before_load_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run, applied, pipeline = make_runner(variant, source, settings)
        record["accelerators"] = applied
        _sync(cuda)
        loaded = time.perf_counter()
        if cuda:
            # Built random weights are made on the GPU, before an offloading stack moves them out,
            # which a real checkpoint load does not do: making images is measured on its own.
            record["load_peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        with full_denoiser_calls(pipeline, applied) as calls:
            first = run(SEED)
        if calls:
            record["full_denoiser_calls"] = calls[0]
        _sync(cuda)
        done = time.perf_counter()
        record.update(load_s=loaded - start, first_image_s=done - loaded, ttfi_s=done - start)
        if first_only:
            if cuda:
                record["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            record["counters"] = compile_counters(pipeline)
            return record
        for _ in range(settings["warmup"]):
            run(SEED)
        times, cpu_times = [], []
        for index in range(settings["runs"]):
            _sync(cuda)
            begin, cpu_begin = time.perf_counter(), time.process_time()
            run(SEED + 1 + index)
            _sync(cuda)
            times.append(time.perf_counter() - begin)
            cpu_times.append(time.process_time() - cpu_begin)
        per_call = statistics.median(times)
        record.update(
            s_per_image=per_call / settings["batch"],
            it_per_s=settings["steps"] / per_call,
            s_per_image_min=min(times) / settings["batch"],
            runs=len(times),
            peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        )
        if not cuda:
            # CPU seconds of this process: steadier than wall time on a shared machine.
            record["cpu_s_per_image"] = statistics.median(cpu_times) / settings["batch"]
        record["_first_image"] = first[0]
        del run
    return record


@contextlib.contextmanager
def full_denoiser_calls(pipeline: Any, applied: list[str]) -> Iterator[list[int]]:
    """With a step cache among `applied`: the calls of the denoiser's last block (those a cache did not
    skip), counted into the yielded list on exit; otherwise an empty list."""
    from t2i_core.kit import denoiser

    model = denoiser(pipeline) if any("cache" in name for name in applied) else None
    blocks = [getattr(model, name, None) for name in ("single_transformer_blocks", "transformer_blocks")]
    last = next((block[-1] for block in blocks if block), None)
    counted: list[int] = []
    if last is None:
        yield counted
        return
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = last.register_forward_pre_hook(count)
    try:
        yield counted
    finally:
        handle.remove()
        counted.append(calls)


def compile_counters(pipeline: Any) -> dict[str, Any]:
    """What compiling did in this process: graphs, recompiles, cache hits, CUDA-graph skips, t2i's own counts."""
    from torch._dynamo.utils import counters

    from t2i_core.builtins.compile import compile_stats

    picked = {
        "graphs": counters["stats"].get("unique_graphs", 0),
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
        "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
        "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
        "autograd_cache_hit": counters["aot_autograd"].get("autograd_cache_hit", 0),
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
        "t2i_compile_stats": compile_stats(pipeline),
    }
    return {key: value for key, value in picked.items() if value not in (0, {}) or key == "graphs"}


def measure_interleaved(
    variants: list[str], source: Source, settings: dict[str, Any], report: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """The steady phase: load and warm every variant, then time them in turns (see the module docstring)."""
    cuda = source.device.startswith("cuda")
    records: list[dict[str, Any]] = []
    runners: dict[str, Runner] = {}
    for variant in variants:
        record: dict[str, Any] = {"variant": variant}
        try:
            start = time.perf_counter()
            run, applied, pipeline = make_runner(variant, source, settings)
            record["accelerators"] = applied
            _sync(cuda)
            loaded = time.perf_counter()
            with full_denoiser_calls(pipeline, applied) as calls:
                first = run(SEED)
            _sync(cuda)
            record.update(load_s=loaded - start, in_process_first_image_s=time.perf_counter() - loaded)
            if calls:
                record["full_denoiser_calls"] = calls[0]
            for _ in range(settings["warmup"]):
                run(SEED)
            record["_first_image"] = first[0]
            record["counters_after_warmup"] = compile_counters(pipeline)
            runners[variant] = run
        except Skipped as exc:
            record["skipped"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        records.append(record)
        print(f"  {variant}: {_brief(record) if not measured(record) else 'loaded and warm'}", file=sys.stderr)
        report(records)
    times: dict[str, list[float]] = {name: [] for name in runners}
    ratios: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    for index in range(settings["runs"]):
        order = list(runners) if index % 2 == 0 else list(reversed(runners))
        round_times: dict[str, float] = {}
        for name in order:
            _sync(cuda)
            begin = time.perf_counter()
            runners[name](SEED + 1 + index)
            _sync(cuda)
            round_times[name] = time.perf_counter() - begin
        for name, seconds in round_times.items():
            times[name].append(seconds)
            for base in RAW_VARIANTS:
                if base in round_times and base != name:
                    ratios[name].setdefault(base, []).append(round_times[base] / seconds)
    for record in records:
        name = record["variant"]
        if name not in times or not times[name]:
            continue
        per_call = statistics.median(times[name])
        record.update(
            s_per_image=per_call / settings["batch"],
            it_per_s=settings["steps"] / per_call,
            s_per_image_min=min(times[name]) / settings["batch"],
            runs=len(times[name]),
        )
        for base, values in ratios[name].items():
            record[f"speedup_vs_{base}"] = round(statistics.median(values), 3)
    report(records)
    return records


@contextlib.contextmanager
def _fresh_memory(cuda: bool) -> Iterator[None]:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        torch._dynamo.reset()  # compiled code of this variant never serves the next one
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def image_difference(image: Any, reference: Any) -> dict[str, float]:
    import numpy as np

    ours, theirs = np.asarray(image, dtype=np.int16), np.asarray(reference, dtype=np.int16)
    difference = np.abs(ours - theirs)
    return {"max_abs_diff": int(difference.max()), "mean_abs_diff": round(float(difference.mean()), 3)}


def first_image_in_new_processes(
    records: list[dict[str, Any]],
    family: str,
    argv: list[str],
    timeout: float,
    report: Callable[[], None],
    *,
    alone: bool = False,
) -> None:
    """Cold, warm and mega-cache time to first image of each compiled variant, each in a new process.

    In one process, an earlier compiled variant warms inductor's in-memory and on-disk caches
    for the next one, so only a new process measures a cold start. Cold: fresh inductor and
    Triton folders (a child inheriting the parent's Triton cache would be partly warm). Warm: the
    folders the cold run filled. Mega-cache: fresh folders plus the cold run's artefacts file.
    With `alone`, variants that compile nothing get one new process too, for their peak memory.
    """
    parent_args = [
        a
        for a in _strip(argv, ("--family", "--variants", "--output", "-o", "--cache-dir", "--phase"))
        if a != "--no-warm"
    ]
    for record in records:
        compiled = any("compile" in name for name in record.get("accelerators", []))
        if not measured(record):
            continue
        scratch = Path(tempfile.mkdtemp(prefix="t2i-bench-first-"))
        if not compiled:
            if alone:  # load time, first image and peak memory of this variant alone in a process
                fresh = {"inductor": scratch / "inductor", "triton": scratch / "triton"}
                record["first_image_alone"] = warm_first_image(record["variant"], family, parent_args, fresh, timeout)
                report()
            continue
        artefacts = scratch / "mega.cache"
        cold_dirs = {"inductor": scratch / "cold-inductor", "triton": scratch / "cold-triton"}
        cold = warm_first_image(record["variant"], family, parent_args, cold_dirs, timeout, save=artefacts)
        record["first_image_cold"] = cold
        report()
        record["first_image_warm"] = warm_first_image(record["variant"], family, parent_args, cold_dirs, timeout)
        report()
        if artefacts.exists():
            fresh = {"inductor": scratch / "mega-inductor", "triton": scratch / "mega-triton"}
            record["first_image_megacache"] = warm_first_image(
                record["variant"], family, parent_args, fresh, timeout, load=artefacts
            )
            report()


def warm_first_image(
    variant: str,
    family: str,
    argv: list[str],
    folders: dict[str, Path],
    timeout: float,
    *,
    save: Path | None = None,
    load: Path | None = None,
) -> dict[str, Any]:
    """Time to first image of `variant` in a new process with the given inductor and Triton folders."""
    command = [sys.executable, __file__, *argv, "--family", family, "--variants", variant, "--child"]
    command += ["--cache-dir", str(folders["inductor"])]
    if save is not None:
        command += ["--save-artifacts", str(save)]
    if load is not None:
        command += ["--load-artifacts", str(load)]
    env = {**os.environ, "TRITON_CACHE_DIR": str(folders["triton"])}
    env.pop("T2I_COMPILE_ARTIFACTS", None)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"child failed ({done.returncode}): {tail[0]}"}
    return dict(json.loads(lines[-1]))


# -- the report ---------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    import t2i_core

    info: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "t2i_core": t2i_core.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(ImportError):
            import triton

            info["triton"] = triton.__version__
    else:
        from t2i_core.builtins.compile import device_key

        info["cpu"] = device_key("cpu")
    return info


def summarise(records: list[dict[str, Any]]) -> None:
    """Speed-ups against both raw baselines, and each image's distance from raw eager's.

    A t2i variant with a step cache is compared with ``raw-eager+<the same cache>`` too: its
    speed-up (``speedup_vs_raw_same_cache``) and its distance from that image (``same_cache_diff``);
    one with ``int8``, ``nf4`` or ``fp8`` with ``raw-<the same>`` (``speedup_vs_raw_same_quantization``,
    ``same_quantization_diff``).
    """
    by_name = {r["variant"]: r for r in records if measured(r)}
    reference = by_name.get("raw-eager") or next(iter(by_name.values()), None)
    for record in records:
        if not measured(record):
            continue
        if reference is not None:
            record["image_vs"] = reference["variant"]
            record.update(image_difference(record["_first_image"], reference["_first_image"]))
        # On CPU, this process's CPU seconds: other load on a shared machine inflates wall time.
        basis = "cpu_s_per_image" if "cpu_s_per_image" in record else "s_per_image"
        for raw, quantization in RAW_QUANTIZED.items():
            twin = by_name.get(raw)
            if twin is None or record is twin or quantization not in record.get("accelerators", []):
                continue
            record["same_quantization_diff"] = image_difference(record["_first_image"], twin["_first_image"])
            if basis in record and basis in twin:
                record["speedup_vs_raw_same_quantization"] = round(twin[basis] / record[basis], 3)
        spec = cache_spec(record.get("accelerators", [])) if not record["variant"].startswith("raw") else None
        same = next(
            (
                raw
                for name, raw in by_name.items()
                if spec is not None and name.startswith(RAW_CACHE) and same_cache(name.removeprefix(RAW_CACHE), spec)
            ),
            None,
        )
        if same is not None and basis in record and basis in same:
            record["speedup_vs_raw_same_cache"] = round(same[basis] / record[basis], 3)
            record["same_cache_diff"] = image_difference(record["_first_image"], same["_first_image"])
        for base in RAW_VARIANTS:
            key = f"speedup_vs_{base}"
            if base in by_name and record is not by_name[base] and key not in record and basis in record:
                record[key] = round(by_name[base][basis] / record[basis], 3)
                record["speedup_basis"] = basis
    for record in records:
        record.pop("_first_image", None)
        for key, value in list(record.items()):
            if isinstance(value, float):
                record[key] = round(value, 4)


def measured(record: dict[str, Any]) -> bool:
    """Whether `record` holds measurements (it neither failed nor was skipped)."""
    return "error" not in record and "skipped" not in record


def _public(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` as JSON can hold them (without the kept first images)."""
    return [{key: value for key, value in record.items() if not key.startswith("_")} for record in records]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default sd15")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny:<family> checkpoints instead of full-size ones")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="full-size weights: save them once in DIR/<family>-<dtype> and load every variant from there "
        "(needed to quantize as they load: raw-int8, int8, nf4, ...)",
    )
    parser.add_argument("--size", type=int, default=None, help="height = width (default: the family's native size)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the family's (CFG on)")
    parser.add_argument("--dtype", default=None, help="raw variants' dtype: float16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--scheduler", default=None, help="a t2i scheduler name for every variant (default: the checkpoint's)"
    )
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="timed images per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed images after the first")
    parser.add_argument("--cache-dir", default=None, help="inductor cache folder (default: a fresh one: cold)")
    parser.add_argument(
        "--no-warm", action="store_true", help="skip the cold and warm first-image runs in new processes"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--phase",
        choices=("all", "steady", "first-image", "sequential"),
        default="sequential",
        help="steady: interleaved steady state; first-image: cold/warm/mega-cache in new processes; "
        "all: both; sequential: each variant measured alone in turn (the CPU default)",
    )
    parser.add_argument("--child-timeout", type=float, default=480, help="seconds before a child process is killed")
    parser.add_argument("--save-artifacts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load-artifacts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", default=None, help="write the JSON here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cache_dir is None and not args.child:
        args.cache_dir = tempfile.mkdtemp(prefix="t2i-bench-inductor-")
    if args.cache_dir is not None:
        # Set before torch reads it; t2i's compile accelerators honour a folder the user chose.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_dir).resolve())

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    families = args.family or ["sd15"]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        names = accelerators_of(variant)
        quantizes = variant in RAW_QUANTIZED or bool(set(names or ()) & set(RAW_QUANTIZED.values()))
        if quantizes and not args.tiny and args.checkpoint is None:
            raise SystemExit(
                f"variant {variant!r} quantizes as weights load, and full-size weights are built in memory: "
                "add --checkpoint DIR (saves them there once) or --tiny"
            )
    if args.tiny and args.checkpoint is not None:
        raise SystemExit("--checkpoint saves full-size weights: leave it out with --tiny")
    report: dict[str, Any] = {
        "benchmark": "t2i accelerators vs raw diffusers",
        "mode": "tiny checkpoints" if args.tiny else "full-size architectures, random weights",
        "environment": environment(device),
        "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "results": {},
    }
    for family in families:
        dtype = args.dtype or _raw_dtype(family, device)
        checkpoint = Path(args.checkpoint) if args.checkpoint is not None else None
        if checkpoint is not None:  # saving full-size weights takes minutes: say so, in case it is cut off
            report["results"][family] = {"saving_weights_in": str(checkpoint)}
            _write(report, args.output)
        source = Source(family, args.tiny, device, checkpoint=checkpoint, dtype=dtype)
        guidance = args.guidance_scale if args.guidance_scale is not None else source.provider.defaults.guidance_scale
        settings = {
            "size": args.size or source.native_size(),
            "steps": args.steps,
            "batch": args.batch,
            "guidance_scale": guidance,
            "dtype": dtype,
            "scheduler": args.scheduler,
            "runs": args.runs,
            "warmup": args.warmup,
        }
        if args.child:
            return _child(variants[0], source, settings, args)
        entry: dict[str, Any] = {"checkpoint": source.source, "settings": settings, "variants": []}
        if source.saved is not None:
            entry["saved_weights"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in source.saved.items()}
        report["results"][family] = entry

        def save(records: list[dict[str, Any]], entry: dict[str, Any] = entry) -> None:
            entry["variants"] = _public(records)
            _write(report, args.output)

        save([])

        if args.phase in ("steady", "all"):
            records = measure_interleaved(variants, source, settings, save)
        elif args.phase == "first-image":
            # Only what the first-image runs need: which variants compile (nothing is loaded here).
            records = [{"variant": v, "accelerators": _stack_of(v, device)} for v in variants]
        else:
            records = []
            for variant in variants:
                try:
                    record = measure(variant, source, settings)
                except Skipped as exc:
                    record = {"variant": variant, "skipped": str(exc)}
                except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
                    record = {
                        "variant": variant,
                        "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    }
                records.append(record)
                print(f"[{family}] {variant}: {_brief(record)}", file=sys.stderr)
                save(records)
        if args.phase in ("first-image", "all") or (args.phase == "sequential" and not args.no_warm):
            first_image_in_new_processes(
                records,
                family,
                argv,
                args.child_timeout,
                lambda records=records: save(records),
                alone=args.phase == "first-image",
            )
        summarise(records)
        save(records)
    text = json.dumps(report, indent=2)
    print(text)
    return report


def _child(variant: str, source: Source, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One first image in this fresh process (``--child``), loading or saving portable compile artefacts."""
    import torch

    if args.load_artifacts:
        if variant.startswith("t2i"):
            os.environ["T2I_COMPILE_ARTIFACTS"] = args.load_artifacts  # what a t2i user does
        else:
            torch.compiler.load_cache_artifacts(Path(args.load_artifacts).read_bytes())
    record = measure(variant, source, settings, first_only=True)
    if args.save_artifacts:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(args.save_artifacts).write_bytes(saved[0])
            record["artifacts_bytes"] = len(saved[0])
    record = {key: round(value, 4) if isinstance(value, float) else value for key, value in record.items()}
    print(json.dumps(record))
    return record


def _stack_of(variant: str, device: str) -> list[str]:
    """The accelerators a variant would load with on `device`, without loading it."""
    names = accelerators_of(variant)
    if names is None:
        return ["torch.compile"] if variant in ("raw-compiled", "raw-fast") else []
    from t2i_core import get_registry

    return [a.name for a in get_registry().resolve_accelerators(names, device)]


def _write(report: dict[str, Any], output: str | None) -> None:
    """Write the report now (atomically), so that a run cut off later still leaves what it measured."""
    if not output:
        return
    path = Path(output)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, path)


def _strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`argv` without the given options and their values."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in options:
            skip = True
            continue
        if any(arg.startswith(f"{option}=") for option in options):
            continue
        kept.append(arg)
    return kept


def _brief(record: dict[str, Any]) -> str:
    if not measured(record):
        return str(record.get("error") or f"skipped: {record['skipped']}")
    return f"first image {record['ttfi_s']:.2f}s, {record['s_per_image']:.3f} s/image, {record['it_per_s']:.2f} it/s"


if __name__ == "__main__":
    main()
