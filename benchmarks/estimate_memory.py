"""Peak GPU memory of a stack of accelerators, estimated on a CPU with fake tensors.

    python benchmarks/estimate_memory.py [--family sdxl] [--size 1024] [-o out.json]
    python benchmarks/estimate_memory.py --family flux --quantized [-o out.json]
    python benchmarks/estimate_memory.py --table flux.json sd3.json z-image.json

Until a GPU measures it, this is the figure the Optimize guide states. The family's full-size
models are built from the plugin's ``architecture/`` configs under torch's ``FakeTensorMode``
(shapes and dtypes, no storage, no arithmetic), and torch's ``MemTracker`` follows every tensor
alive during one call of each, as its pipeline makes it, split into parameters and activations:

- SD 1.5 / SDXL (``low-memory``): the UNet in fp16 at the given size, batch 2 (classifier-free
  guidance); the VAE decoder in fp32 (SDXL's pipeline upcasts its fp16 VAE to decode), on one
  512-pixel tile — what ``vae_tiling`` decodes at a time — and on the whole image;
- FLUX.1, SD3.5 Large, Z-Image (bf16): each text encoder, the transformer (one step) and the VAE
  decoder (the whole image, and one 512-pixel tile).

With leaf-level group offloading (``group_offload``) only the running layer and the next,
prefetched one hold weights on the GPU: the estimate adds the two largest leaf layers of the
model running at the time. Model offload (``cpu_offload``) holds the running model; without
offloading every model stays resident and the largest activations come on top.

``--quantized`` (FLUX.1, SD3, Z-Image) builds the denoiser once per quantizing accelerator (``int8``,
``fp8``, ``fp8-storage``, ``nf4``) and per GGUF file type (Q8_0, Q4_K_S), and T5 / Qwen3 in NF4, and
runs each on fake tensors too: the weights are counted exactly, and the activations include what a
quantized layer makes while it runs (a dequantized weight, float8 inputs and their float32
intermediates). torchao and diffusers quantize the fake models themselves; bitsandbytes and GGUF
weights cannot wrap a fake tensor, so stand-in layers with the same storage and the same
dequantize-then-``F.linear`` forward take their place: `_quantized_memory` says how, layer by layer.
Its weights include buffers (SD3's float32 position-embedding table, 0.33 GiB), which the bf16
report's parameters leave out.

The report then combines the components per stack (the denoiser in the stack's scheme, the text
encoders in bf16 but under ``nf4``) with each offload, with and without ``vae_tiling``. Every
figure leaves out the CUDA context, the caching allocator's rounding and cached blocks, and
cuBLAS/cuDNN workspaces, which ``max_memory_reserved`` on a GPU shows on top.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

GIB = 2**30


def _config(folder: Path, name: str) -> dict[str, Any]:
    config = json.loads((folder / name / "config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _largest_leaves(model: Any, count: int = 2) -> int:
    sizes = sorted(
        (
            sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            for module in model.modules()
            if not list(module.children())
        ),
        reverse=True,
    )
    return sum(sizes[:count])


def _peak(model: Any, run: Any) -> dict[str, float]:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, torch.no_grad():
        run()
    snapshot = tracker.get_tracker_snapshot("peak")
    (device_peaks,) = snapshot.values()
    by_kind = {str(getattr(kind, "value", kind)).lower(): value for kind, value in device_peaks.items()}
    return {
        "parameters_gib": round(by_kind.get("parameter", 0) / GIB, 3),
        "activations_gib": round(by_kind.get("activation", 0) / GIB, 3),
        "two_largest_layers_gib": round(_largest_leaves(model) / GIB, 3),
    }


def offload_peaks(figures: list[dict[str, float]]) -> dict[str, float]:
    """The peak of each memory accelerator from the per-component figures (one model runs at a time):

    - none: every component resident, plus the largest activations;
    - ``cpu_offload`` (model offload): the running model's weights and activations;
    - ``group_offload`` / ``sequential_offload`` (leaf level): the running model's activations and its two
      largest layers (the running one and the prefetched next).
    """
    return {
        "none": sum(f["parameters_gib"] for f in figures) + max(f["activations_gib"] for f in figures),
        "cpu_offload": max(f["parameters_gib"] + f["activations_gib"] for f in figures),
        "group_offload": max(f["two_largest_layers_gib"] + f["activations_gib"] for f in figures),
    }


def with_memory_accelerators(report: dict[str, Any], parts: tuple[str, ...], prefix: str = "") -> None:
    """`offload_peaks` of the components `parts` of `report`, written into it."""
    peaks = offload_peaks([report[part] for part in parts])
    report[f"{prefix}parameters_gib"] = sum(report[part]["parameters_gib"] for part in parts)
    report[f"{prefix}without_offload_peak_estimate_gib"] = peaks["none"]
    report[f"{prefix}cpu_offload_peak_estimate_gib"] = peaks["cpu_offload"]
    report[f"{prefix}group_offload_peak_estimate_gib"] = peaks["group_offload"]


def _bf16_from_config(model_class: Any, config: Any) -> Any:
    """`model_class` built from `config` with bfloat16 parameters (inside FakeTensorMode: no storage)."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    finally:
        torch.set_default_dtype(default)


class Part(NamedTuple):
    """One component as its pipeline runs it; `build` and `inputs` are called inside ``FakeTensorMode``."""

    #: the name in the quantized report: ``transformer``, ``t5``, ``qwen3``, ``clip``, ``vae_decode``, ...
    name: str
    #: the component, bf16 parameters
    build: Callable[[], Any]
    #: what it is called with, made before tracking starts
    inputs: Callable[[], Any]
    #: one call: ``call(model, inputs)``
    call: Callable[[Any, Any], Any]
    #: ``denoiser``, ``text_encoder`` (T5, an LLM: what ``nf4`` quantizes too), ``vae`` or ``other``
    role: str = "other"


def _folder(family: str) -> Path:
    from t2i_core import get_registry

    folder = get_registry().provider(family).architecture_folder()
    if folder is None:
        raise SystemExit(f"family {family!r} ships no architecture/ folder")
    return Path(folder)


def _vae_parts(vae_config: dict[str, Any], latent: int) -> dict[str, Part]:
    """The VAE decoding the whole image, and one 512-pixel tile (what ``vae_tiling`` decodes at a time), in bf16."""
    import torch
    from diffusers import AutoencoderKL

    tile = 512 // 2 ** (len(vae_config["block_out_channels"]) - 1)

    def latents(side: int) -> Callable[[], Any]:
        return lambda: torch.zeros(1, vae_config["latent_channels"], side, side, dtype=torch.bfloat16)

    def build() -> Any:
        return _bf16_from_config(AutoencoderKL, vae_config)

    return {
        "vae_decode_bf16": Part("vae_decode", build, latents(latent), lambda vae, x: vae.decoder(x), "vae"),
        "vae_decode_bf16_512_tile": Part(
            "vae_decode_512_tile", build, latents(min(tile, latent)), lambda vae, x: vae.decoder(x), "vae_tile"
        ),
    }


def flux_parts(size: int) -> dict[str, Part]:
    """FLUX.1 as ``FluxPipeline`` runs it on one GPU in bf16: CLIP-L and T5-XXL encode the prompt (512 T5
    tokens), the transformer runs once per step (batch 1: the guidance is embedded, no classifier-free
    batch), the VAE decodes in bf16 (FluxPipeline does not upcast)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = _folder("flux")
    transformer_config, vae_config = _config(folder, "transformer"), _config(folder, "vae")
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    tokens, text_tokens = (latent // 2) ** 2, 512
    bf16 = torch.bfloat16

    def transformer_inputs() -> dict[str, Any]:
        return {
            "hidden_states": torch.zeros(1, tokens, transformer_config["in_channels"], dtype=bf16),
            "encoder_hidden_states": torch.zeros(1, text_tokens, transformer_config["joint_attention_dim"], dtype=bf16),
            "pooled_projections": torch.zeros(1, transformer_config["pooled_projection_dim"], dtype=bf16),
            "timestep": torch.ones(1, dtype=bf16),
            "img_ids": torch.zeros(tokens, 3, dtype=bf16),
            "txt_ids": torch.zeros(text_tokens, 3, dtype=bf16),
            "guidance": torch.full((1,), 3.5, dtype=torch.float32) if transformer_config["guidance_embeds"] else None,
            "return_dict": False,
        }

    return {
        "transformer_bf16": Part(
            "transformer",
            lambda: _bf16_from_config(FluxTransformer2DModel, transformer_config),
            transformer_inputs,
            lambda model, kwargs: model(**kwargs),
            "denoiser",
        ),
        "t5_bf16": Part(
            "t5",
            lambda: _bf16_from_config(T5EncoderModel, T5Config.from_pretrained(folder / "text_encoder_2")),
            lambda: torch.zeros(1, text_tokens, dtype=torch.long),
            lambda model, ids: model(ids),
            "text_encoder",
        ),
        "clip_bf16": Part(
            "clip",
            lambda: _bf16_from_config(CLIPTextModel, CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            lambda: torch.zeros(1, 77, dtype=torch.long),
            lambda model, ids: model(ids),
        ),
        **_vae_parts(vae_config, latent),
    }


def sd3_parts(size: int) -> dict[str, Part]:
    """Stable Diffusion 3.5 Large as ``StableDiffusion3Pipeline`` runs it on one GPU in bf16: CLIP-L, CLIP-G
    and T5-XXL encode the prompt and the negative prompt (256 T5 tokens), the transformer runs once per
    step on batch 2 (classifier-free guidance) over 77 + 256 text tokens (zeros stand in for T5's
    without it), the VAE decodes in bf16 (the SD3 pipeline does not upcast it)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = _folder("sd3")
    transformer_config, vae_config = _config(folder, "transformer"), _config(folder, "vae")
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    t5_tokens = 256
    bf16 = torch.bfloat16

    def transformer_inputs() -> dict[str, Any]:
        return {
            "hidden_states": torch.zeros(2, transformer_config["in_channels"], latent, latent, dtype=bf16),
            "encoder_hidden_states": torch.zeros(
                2, 77 + t5_tokens, transformer_config["joint_attention_dim"], dtype=bf16
            ),
            "pooled_projections": torch.zeros(2, transformer_config["pooled_projection_dim"], dtype=bf16),
            "timestep": torch.ones(2, dtype=bf16),
            "return_dict": False,
        }

    def clip(name: str) -> Part:
        return Part(
            name,
            lambda: _bf16_from_config(CLIPTextModelWithProjection, CLIPTextConfig.from_pretrained(folder / name)),
            lambda: torch.zeros(2, 77, dtype=torch.long),
            lambda model, ids: model(ids),
        )

    return {
        "transformer_bf16_batch2": Part(
            "transformer",
            lambda: _bf16_from_config(SD3Transformer2DModel, transformer_config),
            transformer_inputs,
            lambda model, kwargs: model(**kwargs),
            "denoiser",
        ),
        "t5_bf16": Part(
            "t5",
            lambda: _bf16_from_config(T5EncoderModel, T5Config.from_pretrained(folder / "text_encoder_3")),
            lambda: torch.zeros(2, t5_tokens, dtype=torch.long),
            lambda model, ids: model(ids),
            "text_encoder",
        ),
        "text_encoder_bf16": clip("text_encoder"),
        "text_encoder_2_bf16": clip("text_encoder_2"),
        **_vae_parts(vae_config, latent),
    }


def zimage_parts(size: int, *, guided: bool = False) -> dict[str, Part]:
    """Z-Image-Turbo as ``ZImagePipeline`` runs it on one GPU in bf16: Qwen3-4B encodes the chat-templated
    prompt (512 tokens, every hidden state kept: the pipeline reads the second-to-last), the transformer
    runs once per step on 512 caption and (size/16)² image tokens (batch 1 at the default guidance 0;
    2 with `guided`, CFG), and the VAE decodes in bf16 (ZImagePipeline does not upcast)."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    folder = _folder("z-image")
    transformer_config, vae_config = _config(folder, "transformer"), _config(folder, "vae")
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    text_tokens, batch = 512, 2 if guided else 1
    bf16 = torch.bfloat16

    def transformer_inputs() -> tuple[Any, ...]:
        channels = transformer_config["in_channels"]
        images = [torch.zeros(channels, 1, latent, latent, dtype=bf16) for _ in range(batch)]
        captions = [torch.zeros(text_tokens, transformer_config["cap_feat_dim"], dtype=bf16) for _ in range(batch)]
        return images, torch.full((batch,), 0.5, dtype=torch.float32), captions

    def qwen_inputs() -> dict[str, Any]:
        return {
            "input_ids": torch.zeros(batch, text_tokens, dtype=torch.long),
            "attention_mask": torch.ones(batch, text_tokens, dtype=torch.long),
            "output_hidden_states": True,
        }

    return {
        "transformer_bf16": Part(
            "transformer",
            lambda: _bf16_from_config(ZImageTransformer2DModel, transformer_config),
            transformer_inputs,
            lambda model, args: model(*args, return_dict=False),
            "denoiser",
        ),
        "qwen3_bf16": Part(
            "qwen3",
            lambda: _bf16_from_config(Qwen3Model, Qwen3Config.from_pretrained(folder / "text_encoder")),
            qwen_inputs,
            lambda model, kwargs: model(**kwargs),
            "text_encoder",
        ),
        **_vae_parts(vae_config, latent),
    }


FAMILY_PARTS: dict[str, Callable[[int], dict[str, Part]]] = {
    "flux": flux_parts,
    "sd3": sd3_parts,
    "z-image": zimage_parts,
}


def _bf16_report(parts: dict[str, Part]) -> dict[str, Any]:
    """Each part's bf16 figures (`_peak`), keyed as in `parts`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    report: dict[str, Any] = {}
    with FakeTensorMode():
        for key, part in parts.items():
            model, inputs = part.build(), part.inputs()
            report[key] = _peak(model, lambda part=part, model=model, inputs=inputs: part.call(model, inputs))
    return report


def _rounded(report: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}


def estimate_flux(size: int) -> dict[str, Any]:
    """FLUX.1 in bf16 with every component resident (``.to("cuda")``), and per memory accelerator; see `flux_parts`."""
    report: dict[str, Any] = {"family": "flux", "size": size, "method": "FakeTensorMode + MemTracker on CPU"}
    report.update(_bf16_report(flux_parts(size)))
    with_memory_accelerators(report, ("transformer_bf16", "t5_bf16", "clip_bf16", "vae_decode_bf16"))
    return _rounded(report)


def estimate_sd3(size: int) -> dict[str, Any]:
    """SD3.5 Large in bf16 with every component resident, with T5 and without (the ``no-t5`` accelerator),
    and per memory accelerator; see `sd3_parts`."""
    report: dict[str, Any] = {"family": "sd3", "size": size, "method": "FakeTensorMode + MemTracker on CPU"}
    report.update(_bf16_report(sd3_parts(size)))
    parts = ("transformer_bf16_batch2", "t5_bf16", "text_encoder_bf16", "text_encoder_2_bf16", "vae_decode_bf16")
    without = tuple(part for part in parts if part != "t5_bf16")
    for key, chosen in (("", parts), ("no_t5_", without)):
        with_memory_accelerators(report, chosen, key)
    return _rounded(report)


def estimate_zimage(size: int, *, guided: bool = False) -> dict[str, Any]:
    """Z-Image-Turbo in bf16 with every component resident, and per memory accelerator; see `zimage_parts`."""
    report: dict[str, Any] = {"family": "z-image", "size": size, "cfg": guided}
    report["method"] = "FakeTensorMode + MemTracker on CPU"
    report.update(_bf16_report(zimage_parts(size, guided=guided)))
    with_memory_accelerators(report, ("transformer_bf16", "qwen3_bf16", "vae_decode_bf16"))
    return _rounded(report)


def estimate(family: str, size: int) -> dict[str, Any]:
    if family == "z-image":
        return estimate_zimage(size)
    if family == "flux":
        return estimate_flux(size)
    if family == "sd3":
        return estimate_sd3(size)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from t2i_core import get_registry

    folder = get_registry().provider(family).architecture_folder()
    if folder is None:
        raise SystemExit(f"family {family!r} ships no architecture/ folder")
    unet_config, vae_config = _config(folder, "unet"), _config(folder, "vae")
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    report: dict[str, Any] = {"family": family, "size": size, "method": "FakeTensorMode + MemTracker on CPU"}
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            unet = UNet2DConditionModel.from_config(unet_config)
        finally:
            torch.set_default_dtype(default)
        cross = unet_config["cross_attention_dim"]
        extra: dict[str, Any] = {}
        if unet_config.get("addition_embed_type") == "text_time":
            pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(2, pooled, dtype=torch.float16),
                "time_ids": torch.zeros(2, 6, dtype=torch.float16),
            }
        sample = torch.zeros(2, unet_config["in_channels"], latent, latent, dtype=torch.float16)
        text = torch.zeros(2, 77, cross, dtype=torch.float16)
        report["unet_fp16_batch2"] = _peak(unet, lambda: unet(sample, torch.tensor(999.0), text, **extra))
        report["unet_two_largest_layers_gib"] = _largest_leaves(unet) / GIB
        vae = AutoencoderKL.from_config(vae_config)  # fp32: the pipeline upcasts SDXL's VAE to decode
        tile = 512 // 2 ** (len(vae_config["block_out_channels"]) - 1)
        tile_latent = torch.zeros(1, vae_config["latent_channels"], tile, tile)
        whole_latent = torch.zeros(1, vae_config["latent_channels"], latent, latent)
        report["vae_decode_fp32_512_tile"] = _peak(vae, lambda: vae.decoder(tile_latent))
        report["vae_decode_fp32_whole_image"] = _peak(vae, lambda: vae.decoder(whole_latent))
        report["vae_two_largest_layers_gib"] = _largest_leaves(vae) / GIB
    output_image = 3 * size * size * 4 / GIB  # the decoded image in fp32, kept while tiles are blended
    unet_phase = report["unet_fp16_batch2"]["activations_gib"] + report["unet_two_largest_layers_gib"]
    vae_phase = (
        report["vae_decode_fp32_512_tile"]["activations_gib"] + report["vae_two_largest_layers_gib"] + output_image
    )
    report["low_memory_peak_estimate_gib"] = max(unet_phase, vae_phase)
    report["without_offload_peak_estimate_gib"] = (
        report["unet_fp16_batch2"]["parameters_gib"]
        + report["unet_fp16_batch2"]["activations_gib"]
        + report["vae_decode_fp32_whole_image"]["parameters_gib"]
    )
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}


#: the stacks of the quantized report, as the accelerators name them (bf16: none, for comparison)
STACKS = ("bf16", "int8", "fp8", "fp8-storage", "nf4", "gguf-Q8_0", "gguf-Q4_K_S")
#: the memory accelerators each stack is combined with
OFFLOADS = ("none", "cpu_offload", "group_offload")


def estimate_quantized(family: str, size: int) -> dict[str, Any]:
    """Every quantized stack of `family` (flux, sd3, z-image) at `size`, alone and with each offload, with
    and without ``vae_tiling``: each denoiser scheme built and run on fake tensors (`_quantized_memory`),
    the text encoders in bf16 except under ``nf4``, which quantizes T5 / the LLM too."""
    import _quantized_memory as quantized
    from torch._subclasses.fake_tensor import FakeTensorMode

    parts = FAMILY_PARTS[family](size)
    components: dict[str, dict[str, Any]] = {}
    with FakeTensorMode():
        for part in parts.values():
            schemes: tuple[str, ...] = ("bf16", *quantized.SCHEMES) if part.role == "denoiser" else ("bf16",)
            schemes += ("nf4",) if part.role == "text_encoder" else ()
            for scheme in schemes:
                model, inputs = part.build(), part.inputs()
                if part.role == "text_encoder" and scheme == "nf4":
                    quantized.quantize_text_encoder_nf4(model)
                elif scheme != "bf16":
                    quantized.quantize_denoiser(model, scheme, family)
                components.setdefault(part.name, {})[scheme] = quantized.peak(model, inputs, part.call)
                print(f"{family} {part.name} {scheme}: {components[part.name][scheme]}", file=sys.stderr)
    report: dict[str, Any] = {"family": family, "size": size, "method": _QUANTIZED_METHOD, "versions": _versions()}
    report["components"] = components
    report["stacks"] = _stacks(parts, components)
    if family == "sd3":
        without_t5 = {key: part for key, part in parts.items() if part.role != "text_encoder"}
        report["stacks_no_t5"] = _stacks(without_t5, components)
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "diffusers", "transformers", "torchao", "bitsandbytes", "gguf"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


_QUANTIZED_METHOD = (
    "FakeTensorMode + MemTracker on CPU; int8/fp8 by torchao's quantize_, fp8-storage by diffusers' "
    "layerwise casting, nf4 and GGUF by stand-in layers with the same storage and dequantize-then-linear forward"
)


def _stacks(parts: dict[str, Part], components: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Peaks per stack and offload: the denoiser in the stack's scheme, T5 / the LLM in NF4 under ``nf4``."""
    stacks: dict[str, dict[str, float]] = {}
    for stack in STACKS:
        row: dict[str, float] = {}
        for tiled in (False, True):
            figures = []
            for part in parts.values():
                if part.role == ("vae" if tiled else "vae_tile"):
                    continue
                scheme = stack if part.role == "denoiser" else "bf16"
                if part.role == "text_encoder" and stack == "nf4":
                    scheme = "nf4"
                figures.append(components[part.name][scheme])
            for offload, value in offload_peaks(figures).items():
                row[offload + ("+vae_tiling" if tiled else "")] = round(value, 2)
        stacks[stack] = row
    return stacks


#: the table's column names
FAMILY_LABELS = {"flux": "FLUX.1-dev", "sd3": "SD3.5 Large", "z-image": "Z-Image-Turbo"}
#: the table's row names
STACK_LABELS = {
    "bf16": "bf16 (no quantization)",
    "int8": "`int8`",
    "fp8": "`fp8`",
    "fp8-storage": "`fp8-storage`",
    "nf4": "`nf4`",
    "gguf-Q8_0": "GGUF Q8_0 denoiser",
    "gguf-Q4_K_S": "GGUF Q4_K_S denoiser",
}


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """A Markdown table of quantized reports: a row per stack and offload, a column per family; each cell
    "peak (peak with vae_tiling)" in GiB."""
    header = "| stack | " + " | ".join(FAMILY_LABELS[report["family"]] for report in reports) + " |"
    lines = [header, "|---" * (len(reports) + 1) + "|"]
    for stack in STACKS:
        for offload in OFFLOADS:
            label = STACK_LABELS[stack] + ("" if offload == "none" else f" + `{offload}`")
            cells = [
                f"{report['stacks'][stack][offload]:.1f} ({report['stacks'][stack][offload + '+vae_tiling']:.1f})"
                for report in reports
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--quantized", action="store_true", help="every quantized stack (flux, sd3, z-image)")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the Markdown table of quantized reports")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    if args.table:
        print(markdown_table([json.loads(Path(name).read_text()) for name in args.table]))
        return
    if args.quantized and args.family not in FAMILY_PARTS:
        raise SystemExit(f"--quantized covers {', '.join(FAMILY_PARTS)}, not {args.family!r}")
    report = estimate_quantized(args.family, args.size) if args.quantized else estimate(args.family, args.size)
    text = json.dumps(report, indent=2, default=lambda value: round(value, 3))
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
