"""Tiny LoRA and textual-inversion files for tiny checkpoints, built offline (tests, docs, benchmarks).

`lora_file` writes a LoRA for a diffusers checkpoint folder (``load("tiny:sd15").source``) the
way diffusers' own training scripts do: PEFT adapters injected into the checkpoint's denoiser
(UNet or transformer) and CLIP text encoders (built from their configs), random non-zero
weights, saved with the pipeline's ``save_lora_weights``. It can also write the PEFT layout and
the Kohya layout that most downloaded LoRAs use (for FLUX.1: sd-scripts' names of the original
model's layers, which diffusers converts). `embedding_file` writes a textual-inversion embedding: one tensor named
by its token (SD 1.x) or ``clip_l`` / ``clip_g`` (SDXL).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from t2i_core.tiny import seeded

#: the layers diffusers' LoRA trainers adapt
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LAYOUTS = ("diffusers", "peft", "kohya")


def lora_file(
    folder: str | Path,
    path: str | Path,
    *,
    rank: int = 4,
    alpha: int | None = None,
    seed: int = 0,
    unet: bool = True,
    text_encoders: bool = False,
    unet_targets: Sequence[str] = UNET_TARGETS,
    layout: str = "diffusers",
    text_model_prefix: bool | None = None,
    strength: float = 1.0,
) -> Path:
    """Write a LoRA for the checkpoint in `folder` to `path` (a ``.safetensors`` file) and return `path`.

    :param rank: the rank of every adapted layer; `alpha` its LoRA alpha (None = `rank`, scaling 1).
    :param unet: adapt the denoiser's (UNet's or transformer's) attention projections (`unet_targets`).
    :param text_encoders: adapt the CLIP text encoder(s) the pipeline loads LoRAs into too (both
        for SDXL and SD3, the first for FLUX.1, none for Z-Image).
    :param layout: ``"diffusers"`` (what diffusers' training scripts save), ``"peft"`` (raw PEFT
        ``lora_A``/``lora_B`` keys) or ``"kohya"`` (``lora_unet_*``/``lora_te_*`` with ``.alpha``;
        for FLUX.1 the double blocks' attention, ignoring `unet_targets`; not for SD3 or Z-Image).
    :param text_model_prefix: True writes text-encoder keys with transformers' ``text_model.``
        prefix (as files trained before transformers 5 have them), False without it, None as the
        installed transformers names the layers.
    :param strength: multiplies every ``lora_B`` weight (1 gives a clearly visible change on tiny models).
    """
    import diffusers

    folder, path = Path(folder), Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = getattr(diffusers, index["_class_name"])
    denoiser = "unet" if "unet" in index else "transformer"
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in pipeline._lora_loadable_modules]
    dual = len(encoders) == 2
    alpha = rank if alpha is None else alpha
    if layout == "kohya" and denoiser == "transformer":
        if index["_class_name"] != "FluxPipeline":
            raise ValueError(f"the kohya layout is written for SD 1.x, SDXL and FLUX.1, not {index['_class_name']}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with seeded(seed):
            tensors = _kohya_flux(folder, rank, alpha, strength)
            if text_encoders:
                clip = _adapted(
                    _text_encoder(folder, "text_encoder", index), TEXT_ENCODER_TARGETS, rank, alpha, strength
                )
                tensors.update(_kohya({"text_encoder": clip}, alpha, dual=True))
        _save(tensors, path)
        return path
    parts: dict[str, dict[str, Any]] = {}
    with seeded(seed):
        if unet:
            parts[denoiser] = _adapted(_denoiser(folder, denoiser, index), unet_targets, rank, alpha, strength)
        if text_encoders:
            for name in encoders:
                parts[name] = _adapted(_text_encoder(folder, name, index), TEXT_ENCODER_TARGETS, rank, alpha, strength)
    if text_model_prefix is not None:
        for name in ("text_encoder", "text_encoder_2"):
            if name in parts:
                parts[name] = {_prefixed(key, text_model_prefix): value for key, value in parts[name].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "kohya":
        _save(_kohya(parts, alpha, dual), path)
    elif layout == "peft":
        _save({f"{name}.{key}": value for name, part in parts.items() for key, value in part.items()}, path)
    else:
        _save_diffusers(parts, path, pipeline, rank, alpha)
    return path


def _prefixed(key: str, prefix: bool) -> str:
    bare = key.removeprefix("text_model.")
    return f"text_model.{bare}" if prefix else bare


def _denoiser(folder: Path, name: str, index: dict[str, Any]) -> Any:
    import diffusers

    model = getattr(diffusers, index[name][1])
    return model.from_config(model.load_config(folder / name))


def _text_encoder(folder: Path, name: str, index: dict[str, Any]) -> Any:
    import transformers

    model = getattr(transformers, index[name][1])
    return model(model.config_class.from_pretrained(folder / name))


def _adapted(model: Any, targets: Sequence[str], rank: int, alpha: int, strength: float) -> dict[str, Any]:
    """PEFT's LoRA state dict of `model` with adapters on `targets`: random A and B (not PEFT's zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    state = get_peft_model_state_dict(model)
    with torch.no_grad():
        for key, value in state.items():
            if "lora_B" in key:
                value.mul_(strength)
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def _save(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _save_diffusers(parts: dict[str, dict[str, Any]], path: Path, pipeline: Any, rank: int, alpha: int) -> None:
    """As diffusers' training scripts save: ``save_lora_weights`` of the PEFT state dicts (for a
    UNet's, after `convert_state_dict_to_diffusers`, as the SD 1.x and SDXL scripts do)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {
        f"{name}_lora_layers": convert_state_dict_to_diffusers(part)
        if "unet" in pipeline._lora_loadable_modules
        else part
        for name, part in parts.items()
    }
    metadata: dict[str, Any] = {}
    if alpha != rank:  # diffusers reads a LoRA's alpha from the file's metadata
        # The whole LoRA config, as diffusers' training scripts save it (peft reads more than r and alpha).
        metadata = {f"{name}_lora_adapter_metadata": _lora_config(part, rank, alpha) for name, part in parts.items()}
    pipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)


def _lora_config(part: dict[str, Any], rank: int, alpha: int) -> dict[str, Any]:
    from peft import LoraConfig

    targets = sorted({key.split(".lora_")[0] for key in part})  # full layer paths, as diffusers' get_peft_kwargs
    config: dict[str, Any] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets).to_dict()  # type: ignore[no-untyped-call]
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def _kohya(parts: dict[str, dict[str, Any]], alpha: int, dual: bool) -> dict[str, Any]:
    """Kohya's layout: ``lora_unet_<module_path>.lora_down.weight``, ``lora_te[1|2]_...``, and an ``.alpha`` per layer."""
    import torch

    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if dual else "lora_te", "text_encoder_2": "lora_te2"}
    tensors: dict[str, Any] = {}
    for name, part in parts.items():
        for key, value in part.items():
            module, _, kind = key.rpartition(".lora_")
            # Kohya files name text-encoder layers from transformers' text_model.* paths.
            if name != "unet" and not module.startswith("text_model."):
                module = f"text_model.{module}"
            stem = f"{prefixes[name]}_{module.replace('.', '_')}"
            tensors[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return tensors


#: FLUX.1's double-block attention layers in sd-scripts' names (the original model's): fused
#: query/key/value of the image and text streams, and their output projections
_FLUX_KOHYA_LAYERS = {"img_attn_qkv": 3, "img_attn_proj": 1, "txt_attn_qkv": 3, "txt_attn_proj": 1}


def _kohya_flux(folder: Path, rank: int, alpha: int, strength: float) -> dict[str, Any]:
    """A FLUX.1 LoRA as sd-scripts saves it: ``lora_unet_double_blocks_<i>_<layer>`` with one
    down and one up matrix per fused layer (diffusers splits them at load) and an ``.alpha``."""
    import torch

    config = json.loads((folder / "transformer" / "config.json").read_text())
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    tensors: dict[str, Any] = {}
    for block in range(int(config["num_layers"])):
        for layer, fused in _FLUX_KOHYA_LAYERS.items():
            stem = f"lora_unet_double_blocks_{block}_{layer}"
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, width) / width**0.5
            tensors[f"{stem}.lora_up.weight"] = torch.randn(fused * width, rank) * (strength / rank**0.5)
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return tensors


def embedding_file(
    folder: str | Path,
    path: str | Path,
    *,
    token: str = "<tiny>",
    vectors: int = 1,
    seed: int = 0,
    scale: float = 1.0,
    layout: str = "diffusers",
) -> Path:
    """Write a textual-inversion embedding for the checkpoint in `folder` to `path` and return `path`.

    SD 1.x: one tensor of shape ``[vectors, width]`` named `token` (diffusers' ``learned_embeds``
    layout), or named ``emb_params`` with ``layout="a1111"`` (the file's name is then its token).
    SDXL: ``clip_l`` and ``clip_g`` tensors, one per text encoder (the layout SDXL embeddings are
    shared in). Random normal vectors times `scale`.
    """
    import torch

    folder, path = Path(folder), Path(path)
    index = json.loads((folder / "model_index.json").read_text())
    widths = {name: _hidden_size(folder / name) for name in ("text_encoder", "text_encoder_2") if name in index}
    with seeded(seed):
        vectors_of = {name: torch.randn(vectors, width) * scale for name, width in widths.items()}
    if "text_encoder_2" in widths:
        tensors = {"clip_l": vectors_of["text_encoder"], "clip_g": vectors_of["text_encoder_2"]}
    else:
        tensors = {"emb_params" if layout == "a1111" else token: vectors_of["text_encoder"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    _save({key: value.contiguous() for key, value in tensors.items()}, path)
    return path


def _hidden_size(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["hidden_size"])
