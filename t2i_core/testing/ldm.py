"""Write a diffusers Stable Diffusion 1.x or SDXL checkpoint as one file in the original (LDM) layout.

Single-file checkpoints, the ``model.safetensors`` files most users download, keep the tensor
names of the original Stable Diffusion code: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (SD 1.x's CLIP) or
``conditioner.embedders.{0,1}.*`` (SDXL's CLIP-L and OpenCLIP-G). `write_single_file` renames a
diffusers folder's weights into that layout, so that tests and benchmarks can make single files
from tiny checkpoints offline and check ``from_single_file`` against ``from_pretrained``. The
renaming follows the layout diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` and
``from_single_file`` agree on, derived here from the model configs (any number of blocks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the prefix of each component's tensors in a single file, per pipeline class
PREFIXES = {
    "StableDiffusionPipeline": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "StableDiffusionXLPipeline": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def write_single_file(folder: str | Path, path: str | Path) -> Path:
    """Write the SD 1.x or SDXL diffusers checkpoint in `folder` to `path` (``.safetensors``), LDM layout."""
    from safetensors.torch import save_file

    folder, path = Path(folder), Path(path)
    tensors = original_layout(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def original_layout(folder: str | Path) -> dict[str, Any]:
    """Every weight of the checkpoint in `folder`, under its name in the original layout."""
    folder = Path(folder)
    pipeline_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if pipeline_class not in PREFIXES:
        raise ValueError(
            f"{folder}: a {pipeline_class} has no single-file layout here (expected {', '.join(PREFIXES)})"
        )
    prefixes = PREFIXES[pipeline_class]
    tensors: dict[str, Any] = {}
    unet_config = _config(folder / "unet")
    for key, value in _weights(folder / "unet").items():
        tensors[prefixes["unet"] + _unet_key(key, unet_config)] = value
    for key, value in _weights(folder / "vae").items():
        tensors[prefixes["vae"] + _vae_key(key, _config(folder / "vae"))] = _vae_value(key, value)
    for key, value in _weights(folder / "text_encoder").items():
        tensors[prefixes["text_encoder"] + _with_text_model(key)] = value
    if "text_encoder_2" in prefixes:
        tensors.update(_open_clip(_weights(folder / "text_encoder_2"), prefixes["text_encoder_2"]))
    return tensors


def _config(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "config.json").read_text()))


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    weights: dict[str, Any] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def _replace_prefix(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _unet_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers UNet2DConditionModel tensor name → its name in the original UNetModel."""
    top = _replace_prefix(key, {f"{old}.": f"{new}." for old, new in _UNET_TOP.items()})
    if top != key:
        return top
    layers = int(config["layers_per_block"])
    up_types = list(config["up_block_types"])
    parts = key.split(".")
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":  # "op" is the downsampling convolution
            return ".".join(["input_blocks", str((block + 1) * (layers + 1)), "0", "op", *rest[1:]])
        position = 1 + block * (layers + 1) + index
        return _block(f"input_blocks.{position}", kind, rest)
    if parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":  # after the block's last resnet (and attention, if it has one)
            has_attention = "CrossAttn" in up_types[block]
            position = block * (layers + 1) + layers
            return ".".join(["output_blocks", str(position), "2" if has_attention else "1", *rest])
        return _block(f"output_blocks.{block * (layers + 1) + index}", kind, rest)
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        position = 1 if kind == "attentions" else 2 * index
        return _block(f"middle_block.{position}", kind, rest)
    raise ValueError(f"unexpected UNet tensor {key!r}")


def _block(head: str, kind: str, rest: list[str]) -> str:
    """A resnet or attention of a UNet block: the first or second layer of the original block."""
    tail = ".".join(rest)
    middle = head.startswith("middle_block")
    if kind == "resnets":
        tail = _replace_prefix(tail, {f"{old}.": f"{new}." for old, new in _RESNET.items()})
        return f"{head}.{tail}" if middle else f"{head}.0.{tail}"
    if kind == "attentions":
        return f"{head}.{tail}" if middle else f"{head}.1.{tail}"
    raise ValueError(f"unexpected UNet block part {kind!r}")


_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _vae_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers AutoencoderKL tensor name → its name in the original autoencoder."""
    blocks = len(config["block_out_channels"])
    parts = key.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv keep their names
    rest = parts[1:]
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out", *rest[1:]])
    if rest[0] == "mid_block":
        kind, index, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "attentions":
            return f"{side}.mid.attn_1.{_replace_prefix(tail, _VAE_ATTENTION)}"
        return f"{side}.mid.block_{index + 1}.{_resnet_tail(tail)}"
    if rest[0] in ("down_blocks", "up_blocks"):
        block, kind, index, tail = int(rest[1]), rest[2], int(rest[3]), ".".join(rest[4:])
        level = block if rest[0] == "down_blocks" else blocks - 1 - block
        where = "down" if rest[0] == "down_blocks" else "up"
        if kind == "resnets":
            return f"{side}.{where}.{level}.block.{index}.{_resnet_tail(tail)}"
        sampler = "downsample" if where == "down" else "upsample"
        return f"{side}.{where}.{level}.{sampler}.{tail}"
    return key  # conv_in, conv_out


def _resnet_tail(tail: str) -> str:
    return _replace_prefix(tail, {"conv_shortcut.": "nin_shortcut."})


def _vae_value(key: str, value: Any) -> Any:
    # The original autoencoder's mid-block attention uses 1x1 convolutions where diffusers has linear layers.
    if ".mid_block.attentions." in f".{key}" and key.endswith("weight") and value.dim() == 2:
        return value[:, :, None, None]
    return value


def _with_text_model(key: str) -> str:
    # transformers >= 5.6 dropped CLIPTextModel's text_model level; single files always have it.
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                    "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}  # fmt: skip


def _open_clip(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (SDXL's second text encoder)."""
    import torch

    weights = {_with_text_model(key): value for key, value in weights.items()}
    tensors: dict[str, Any] = {}
    layers: dict[str, dict[str, Any]] = {}
    for key, value in weights.items():
        if key == "text_projection.weight":
            tensors[prefix + "text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.position_embedding.weight":
            tensors[prefix + "positional_embedding"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            tensors[prefix + "token_embedding.weight"] = value
        elif key.startswith("text_model.final_layer_norm."):
            tensors[prefix + "ln_final." + key.rsplit(".", 1)[-1]] = value
        elif key.startswith("text_model.encoder.layers."):
            index, tail = key[len("text_model.encoder.layers.") :].split(".", 1)
            head = f"{prefix}transformer.resblocks.{index}."
            if tail.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                layers.setdefault(head, {})[tail] = value
            else:
                tensors[head + _replace_prefix(tail, _OPEN_CLIP_LAYER)] = value
        elif key != "text_model.embeddings.position_ids":
            raise ValueError(f"unexpected text encoder tensor {key!r}")
    for head, parts in layers.items():
        for kind in ("weight", "bias"):
            qkv = [parts[f"self_attn.{name}_proj.{kind}"] for name in ("q", "k", "v")]
            tensors[f"{head}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    return tensors
