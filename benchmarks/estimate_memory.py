"""Peak GPU memory of the ``low-memory`` stack, estimated on a CPU with fake tensors.

    python benchmarks/estimate_memory.py [--family sdxl] [--size 1024] [-o out.json]

Until a GPU measures it, this is the figure the Optimize guide states. The family's full-size
UNet and VAE are built from the plugin's ``architecture/`` configs under torch's
``FakeTensorMode`` (shapes and dtypes, no storage, no arithmetic), and torch's ``MemTracker``
follows every tensor alive during one guided UNet call and one VAE decode, split into
parameters and activations:

- the UNet in fp16 at the given size, batch 2 (classifier-free guidance);
- the VAE decoder in fp32 (SDXL's pipeline upcasts its fp16 VAE to decode), on one 512-pixel
  tile — what ``vae_tiling`` decodes at a time — and on the whole image, for comparison.

With leaf-level group offloading (``group_offload``) only the running layer and the next,
prefetched one hold weights on the GPU: the estimate adds the two largest leaf layers of the
model running at the time. It leaves out the CUDA context and the allocator's rounding, which
``max_memory_reserved`` on a GPU will show on top.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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


def with_memory_accelerators(report: dict[str, Any], parts: tuple[str, ...], prefix: str = "") -> None:
    """The peak of each memory accelerator from the per-component figures of `parts` (one model runs at a time):

    - ``cpu_offload`` (model offload): the running model's weights and activations;
    - ``group_offload`` / ``sequential_offload`` (leaf level): the running model's activations and its two
      largest layers (the running one and the prefetched next);
    - none: every component resident, plus the largest activations.
    """
    parameters = sum(report[part]["parameters_gib"] for part in parts)
    report[f"{prefix}parameters_gib"] = parameters
    report[f"{prefix}without_offload_peak_estimate_gib"] = parameters + max(
        report[part]["activations_gib"] for part in parts
    )
    report[f"{prefix}cpu_offload_peak_estimate_gib"] = max(
        report[part]["parameters_gib"] + report[part]["activations_gib"] for part in parts
    )
    report[f"{prefix}group_offload_peak_estimate_gib"] = max(
        report[part]["two_largest_layers_gib"] + report[part]["activations_gib"] for part in parts
    )


def _bf16_from_config(model_class: Any, config: Any) -> Any:
    """`model_class` built from `config` with bfloat16 parameters (inside FakeTensorMode: no storage)."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    finally:
        torch.set_default_dtype(default)


def estimate_flux(size: int) -> dict[str, Any]:
    """FLUX.1 as ``FluxPipeline`` runs it on one GPU in bf16 with every component resident (``.to("cuda")``):
    CLIP-L and T5-XXL encode the prompt (512 T5 tokens), the transformer runs once per step (batch 1:
    the guidance is embedded, no classifier-free batch), the VAE decodes in bf16 (FluxPipeline does not upcast)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from t2i_core import get_registry

    folder = get_registry().provider("flux").architecture_folder()
    if folder is None:
        raise SystemExit("family 'flux' ships no architecture/ folder")
    transformer_config, vae_config = _config(folder, "transformer"), _config(folder, "vae")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    latent = size // factor
    tokens, text_tokens = (latent // 2) ** 2, 512
    report: dict[str, Any] = {"family": "flux", "size": size, "method": "FakeTensorMode + MemTracker on CPU"}
    bf16 = torch.bfloat16
    with FakeTensorMode():
        transformer = _bf16_from_config(FluxTransformer2DModel, transformer_config)
        inputs = {
            "hidden_states": torch.zeros(1, tokens, transformer_config["in_channels"], dtype=bf16),
            "encoder_hidden_states": torch.zeros(1, text_tokens, transformer_config["joint_attention_dim"], dtype=bf16),
            "pooled_projections": torch.zeros(1, transformer_config["pooled_projection_dim"], dtype=bf16),
            "timestep": torch.ones(1, dtype=bf16),
            "img_ids": torch.zeros(tokens, 3, dtype=bf16),
            "txt_ids": torch.zeros(text_tokens, 3, dtype=bf16),
            "guidance": torch.full((1,), 3.5, dtype=torch.float32) if transformer_config["guidance_embeds"] else None,
            "return_dict": False,
        }
        report["transformer_bf16"] = _peak(transformer, lambda: transformer(**inputs))
        t5 = _bf16_from_config(T5EncoderModel, T5Config.from_pretrained(folder / "text_encoder_2"))
        ids = torch.zeros(1, text_tokens, dtype=torch.long)
        report["t5_bf16"] = _peak(t5, lambda: t5(ids))
        clip = _bf16_from_config(CLIPTextModel, CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        report["clip_bf16"] = _peak(clip, lambda: clip(torch.zeros(1, 77, dtype=torch.long)))
        vae = _bf16_from_config(AutoencoderKL, vae_config)
        latents = torch.zeros(1, vae_config["latent_channels"], latent, latent, dtype=bf16)
        report["vae_decode_bf16"] = _peak(vae, lambda: vae.decoder(latents))
    with_memory_accelerators(report, ("transformer_bf16", "t5_bf16", "clip_bf16", "vae_decode_bf16"))
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}


def estimate_sd3(size: int) -> dict[str, Any]:
    """Stable Diffusion 3.5 Large as ``StableDiffusion3Pipeline`` runs it on one GPU in bf16 with every
    component resident (``.to("cuda")``), with T5 and without (the ``no-t5`` accelerator): CLIP-L,
    CLIP-G and T5-XXL encode the prompt and the negative prompt (256 T5 tokens), the transformer runs
    once per step on batch 2 (classifier-free guidance) over 77 + 256 text tokens (zeros stand in for
    T5's without it), the VAE decodes in bf16 (the SD3 pipeline does not upcast it)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from t2i_core import get_registry

    folder = get_registry().provider("sd3").architecture_folder()
    if folder is None:
        raise SystemExit("family 'sd3' ships no architecture/ folder")
    transformer_config, vae_config = _config(folder, "transformer"), _config(folder, "vae")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    latent = size // factor
    t5_tokens = 256
    report: dict[str, Any] = {"family": "sd3", "size": size, "method": "FakeTensorMode + MemTracker on CPU"}
    bf16 = torch.bfloat16
    with FakeTensorMode():
        transformer = _bf16_from_config(SD3Transformer2DModel, transformer_config)
        inputs = {
            "hidden_states": torch.zeros(2, transformer_config["in_channels"], latent, latent, dtype=bf16),
            "encoder_hidden_states": torch.zeros(
                2, 77 + t5_tokens, transformer_config["joint_attention_dim"], dtype=bf16
            ),
            "pooled_projections": torch.zeros(2, transformer_config["pooled_projection_dim"], dtype=bf16),
            "timestep": torch.ones(2, dtype=bf16),
            "return_dict": False,
        }
        report["transformer_bf16_batch2"] = _peak(transformer, lambda: transformer(**inputs))
        t5 = _bf16_from_config(T5EncoderModel, T5Config.from_pretrained(folder / "text_encoder_3"))
        ids = torch.zeros(2, t5_tokens, dtype=torch.long)
        report["t5_bf16"] = _peak(t5, lambda: t5(ids))
        for name in ("text_encoder", "text_encoder_2"):
            clip = _bf16_from_config(CLIPTextModelWithProjection, CLIPTextConfig.from_pretrained(folder / name))
            ids = torch.zeros(2, 77, dtype=torch.long)
            report[f"{name}_bf16"] = _peak(clip, lambda clip=clip, ids=ids: clip(ids))
        vae = _bf16_from_config(AutoencoderKL, vae_config)
        latents = torch.zeros(1, vae_config["latent_channels"], latent, latent, dtype=bf16)
        report["vae_decode_bf16"] = _peak(vae, lambda: vae.decoder(latents))
    parts = ("transformer_bf16_batch2", "t5_bf16", "text_encoder_bf16", "text_encoder_2_bf16", "vae_decode_bf16")
    without = tuple(part for part in parts if part != "t5_bf16")
    for key, chosen in (("", parts), ("no_t5_", without)):
        with_memory_accelerators(report, chosen, key)
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}


def estimate_zimage(size: int, *, guided: bool = False) -> dict[str, Any]:
    """Z-Image-Turbo as ``ZImagePipeline`` runs it on one GPU in bf16 with every component resident
    (``.to("cuda")``): Qwen3-4B encodes the chat-templated prompt (512 tokens, every hidden state kept:
    the pipeline reads the second-to-last), the transformer runs once per step on 512 caption and
    (size/16)² image tokens (batch 1 at the default guidance 0; 2 with `guided`, CFG), and the VAE
    decodes in bf16 (ZImagePipeline does not upcast)."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen3Config, Qwen3Model

    from t2i_core import get_registry

    folder = get_registry().provider("z-image").architecture_folder()
    if folder is None:
        raise SystemExit("family 'z-image' ships no architecture/ folder")
    transformer_config, vae_config = _config(folder, "transformer"), _config(folder, "vae")
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    text_tokens, batch = 512, 2 if guided else 1
    report: dict[str, Any] = {"family": "z-image", "size": size, "cfg": guided}
    report["method"] = "FakeTensorMode + MemTracker on CPU"
    bf16 = torch.bfloat16
    with FakeTensorMode():
        transformer = _bf16_from_config(ZImageTransformer2DModel, transformer_config)
        channels = transformer_config["in_channels"]
        images = [torch.zeros(channels, 1, latent, latent, dtype=bf16) for _ in range(batch)]
        captions = [torch.zeros(text_tokens, transformer_config["cap_feat_dim"], dtype=bf16) for _ in range(batch)]
        timestep = torch.full((batch,), 0.5, dtype=torch.float32)
        report["transformer_bf16"] = _peak(
            transformer, lambda: transformer(images, timestep, captions, return_dict=False)
        )
        qwen = _bf16_from_config(Qwen3Model, Qwen3Config.from_pretrained(folder / "text_encoder"))
        ids = torch.zeros(batch, text_tokens, dtype=torch.long)
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        report["qwen3_bf16"] = _peak(qwen, lambda: qwen(input_ids=ids, attention_mask=mask, output_hidden_states=True))
        vae = _bf16_from_config(AutoencoderKL, vae_config)
        latents = torch.zeros(1, vae_config["latent_channels"], latent, latent, dtype=bf16)
        report["vae_decode_bf16"] = _peak(vae, lambda: vae.decoder(latents))
    with_memory_accelerators(report, ("transformer_bf16", "qwen3_bf16", "vae_decode_bf16"))
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in report.items()}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    report = estimate(args.family, args.size)
    text = json.dumps(report, indent=2, default=lambda value: round(value, 3))
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
