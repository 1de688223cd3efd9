"""Tiny LoRA and textual-inversion files for tiny checkpoints, built offline (tests, docs, benchmarks).

`lora_file` writes a LoRA for a diffusers checkpoint folder (``load("tiny:sd15").source``) the
way diffusers' own training scripts do: PEFT adapters injected into the checkpoint's UNet and
text encoders (built from their configs), random non-zero weights, saved with the pipeline's
``save_lora_weights``. It can also write the PEFT layout and the Kohya layout that most
downloaded LoRAs use. `embedding_file` writes a textual-inversion embedding: one tensor named
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
    :param unet: adapt the UNet's attention projections (`unet_targets`).
    :param text_encoders: adapt the text encoder(s) too (both for SDXL).
    :param layout: ``"diffusers"`` (what diffusers' training scripts save), ``"peft"`` (raw PEFT
        ``lora_A``/``lora_B`` keys) or ``"kohya"`` (``lora_unet_*``/``lora_te_*`` with ``.alpha``).
    :param text_model_prefix: True writes text-encoder keys with transformers' ``text_model.``
        prefix (as files trained before transformers 5 have them), False without it, None as the
        installed transformers names the layers.
    :param strength: multiplies every ``lora_B`` weight (1 gives a clearly visible change on tiny models).
    """
    folder, path = Path(folder), Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    index = json.loads((folder / "model_index.json").read_text())
    dual = index["_class_name"] == "StableDiffusionXLPipeline"
    alpha = rank if alpha is None else alpha
    parts: dict[str, dict[str, Any]] = {}
    with seeded(seed):
        if unet:
            parts["unet"] = _adapted(_unet(folder), unet_targets, rank, alpha, strength)
        if text_encoders:
            parts["text_encoder"] = _adapted(
                _text_encoder(folder, "text_encoder"), TEXT_ENCODER_TARGETS, rank, alpha, strength
            )
            if dual:
                parts["text_encoder_2"] = _adapted(
                    _text_encoder(folder, "text_encoder_2"), TEXT_ENCODER_TARGETS, rank, alpha, strength
                )
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
        _save_diffusers(parts, path, dual, rank, alpha)
    return path


def _prefixed(key: str, prefix: bool) -> str:
    bare = key.removeprefix("text_model.")
    return f"text_model.{bare}" if prefix else bare


def _unet(folder: Path) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))


def _text_encoder(folder: Path, name: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(folder / name)
    return (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(config)


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


def _save_diffusers(parts: dict[str, dict[str, Any]], path: Path, dual: bool, rank: int, alpha: int) -> None:
    """As diffusers' training scripts save: `convert_state_dict_to_diffusers`, then ``save_lora_weights``."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    pipeline = getattr(diffusers, "StableDiffusionXLPipeline" if dual else "StableDiffusionPipeline")
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(part) for name, part in parts.items()}
    metadata: dict[str, Any] = {}
    if alpha != rank:  # diffusers reads a LoRA's alpha from the file's metadata
        metadata = {f"{name}_lora_adapter_metadata": {"r": rank, "lora_alpha": alpha} for name in parts}
    pipeline.save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)


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
