"""Where an IP-Adapter comes from (hub id, local folder or file, ``tiny:ip-adapter-<family>``) and whether it fits a base.

Everything here reads names, folders and file headers only; the weights load in `_weights`,
through diffusers' ``load_ip_adapter``. For SD 1.5 and SDXL it reads the CLIP image encoder from
the folder ``image_encoder`` beside the adapter's weights (``models/image_encoder`` in
``h94/IP-Adapter``); FLUX.1 adapters ship none, and take it from `Defaults.image_encoder` unless
an ``image_encoder`` folder is beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from t2i_core import InvalidRequestError
from t2i_core.kit import is_hub_id
from t2i_core.tiny import TINY_PREFIX, ensure_built

#: bump when the tiny adapter recipe changes, so caches are rebuilt
TINY_VERSION = 1
#: the image encoder's folder inside the adapter's subfolder (diffusers' default ``image_encoder_folder``)
IMAGE_ENCODER_FOLDER = "image_encoder"
#: weights files t2i does not read: pickles can run code when loaded (as for LoRAs, t2i_core.kit.resolve_file)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: the tiny image encoder's embedding width (the adapter's image projection reads it)
_TINY_IMAGE_EMBED = 24


@attrs.frozen
class Defaults:
    """The adapter a family uses when an `ImagePrompt` leaves `subfolder` or `weight_name` out."""

    model: str
    subfolder: str
    weight_name: str
    #: where the image encoder is for adapters without one beside them (FLUX.1); None = beside the weights
    image_encoder: str | None = None


#: per family: the reference IP-Adapter repository's layout (safetensors rather than the .bin pickles)
DEFAULTS = {
    "sd15": Defaults("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"),
    "sdxl": Defaults("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors"),
    "flux": Defaults("XLabs-AI/flux-ip-adapter", "", "ip_adapter.safetensors", "openai/clip-vit-large-patch14"),
}
TINY_FAMILIES = tuple(DEFAULTS)
#: the families whose diffusers pipelines load IP-Adapters into a UNet (IPAdapterMixin); FLUX.1 uses FluxIPAdapterMixin
UNET_FAMILIES = ("sd15", "sdxl")
_TINY_NAMES = ", ".join(f"{TINY_PREFIX}ip-adapter-{family}" for family in TINY_FAMILIES)
ALLOWED_MODELS = f"a hub id, a local IP-Adapter folder or weights file, or one of {_TINY_NAMES}"


class IncompatibleAdapterError(InvalidRequestError):
    """An IP-Adapter made for another kind of base model (e.g. an SDXL adapter on SD1.5)."""


@attrs.frozen
class Source:
    """An IP-Adapter as ``load_ip_adapter(location, subfolder=..., weight_name=...)`` takes it."""

    #: as the request named it
    model: str
    location: str
    subfolder: str
    weight_name: str
    #: FLUX.1: the image encoder's hub id or folder (diffusers' ``image_encoder_pretrained_model_name_or_path``)
    image_encoder: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.location, self.subfolder, self.weight_name)

    def local_file(self) -> Path | None:
        """The weights file, when `location` is a local folder."""
        path = Path(self.location) / self.subfolder / self.weight_name
        return path if path.is_file() else None


def resolve(prompt: Any, family: str, field: str) -> Source:
    """Find the IP-Adapter that `prompt` (an `ImagePrompt`) names for an engine of `family`.

    `field` (``image_prompts[0]``) names it in errors. Nothing is downloaded or loaded.
    """
    source = _resolve(prompt, family, field)
    if Path(source.weight_name).suffix.lower() in PICKLE_SUFFIXES:
        named = f"{field}.weight_name" if prompt.weight_name is not None else f"{field}.model"
        raise InvalidRequestError(
            named,
            prompt.weight_name or prompt.model,
            f"a .safetensors file ({source.weight_name} is a pickle, which can run code when read; "
            "h94/IP-Adapter has a .safetensors file beside each .bin)",
        )
    if family in UNET_FAMILIES:
        if Path(source.location).is_dir():
            _check_image_encoder(source, f"{field}.model")
        return source
    beside = Path(source.location) / source.subfolder / IMAGE_ENCODER_FOLDER
    encoder = str(beside) if (beside / "config.json").is_file() else DEFAULTS[family].image_encoder
    return attrs.evolve(source, image_encoder=encoder)


def _resolve(prompt: Any, family: str, field: str) -> Source:
    model: str = prompt.model
    defaults = DEFAULTS[family]
    if model.startswith(TINY_PREFIX):
        tiny_family = _tiny_family(model, f"{field}.model")
        tiny = DEFAULTS[tiny_family]
        return Source(model, str(tiny_adapter_folder(tiny_family)), tiny.subfolder, tiny.weight_name)
    path = Path(model).expanduser()
    if path.is_file():
        for name in ("subfolder", "weight_name"):
            if getattr(prompt, name) is not None:
                raise InvalidRequestError(
                    f"{field}.{name}", getattr(prompt, name), f"None when {field}.model is a weights file"
                )
        return Source(model, str(path.parent), "", path.name)
    if path.is_dir():
        subfolder = prompt.subfolder
        if subfolder is None:
            subfolder = defaults.subfolder if (path / defaults.subfolder).is_dir() else ""
        source = Source(model, str(path), subfolder, prompt.weight_name or defaults.weight_name)
        if source.local_file() is None:
            inside = Path(source.subfolder, source.weight_name).as_posix()
            raise InvalidRequestError(
                f"{field}.model",
                model,
                f"{ALLOWED_MODELS} (the folder has no {inside}: name the file with weight_name= and subfolder=)",
            )
        return source
    if not is_hub_id(model):
        raise InvalidRequestError(f"{field}.model", model, f"{ALLOWED_MODELS} (no such file or folder: {path})")
    return Source(model, model, prompt.subfolder or defaults.subfolder, prompt.weight_name or defaults.weight_name)


def _check_image_encoder(source: Source, field: str) -> None:
    folder = Path(source.location) / source.subfolder / IMAGE_ENCODER_FOLDER
    if not (folder / "config.json").is_file():
        raise InvalidRequestError(
            field,
            source.model,
            f"{ALLOWED_MODELS} with its CLIP image encoder in {folder} (diffusers' load_ip_adapter reads it "
            f"from the folder {IMAGE_ENCODER_FOLDER!r} beside the weights; none is there)",
        )


def describe(model: str) -> str:
    """What kind of adapter `model` names, from its name alone ("an sd15 IP-Adapter"); "" when that cannot be told."""
    if model.startswith(TINY_PREFIX):
        family = model[len(TINY_PREFIX) :].removeprefix("ip-adapter-")
        article = "an" if family.startswith("sd") else "a"  # "an sd15", "a flux"
        return f"{article} {family} IP-Adapter" if family in TINY_FAMILIES else ""
    families = [family for family, defaults in DEFAULTS.items() if defaults.model == model]
    if families:
        article = "an" if families[0].startswith("sd") else "a"
        return f"{article} {'/'.join(families)} IP-Adapter"
    return ""


def _tiny_family(model: str, field: str) -> str:
    from t2i_core import get_registry

    name = model[len(TINY_PREFIX) :]
    family = name.removeprefix("ip-adapter-")
    if not name.startswith("ip-adapter-") or family not in TINY_FAMILIES:
        raise InvalidRequestError(field, model, ALLOWED_MODELS)
    if family not in get_registry().providers:
        raise InvalidRequestError(field, model, f"{ALLOWED_MODELS} whose family is installed (no {family!r} family)")
    return family


def check_fits(source: Source, denoiser: Any, family: str, field: str) -> None:
    """Refuse a local safetensors adapter whose layers cannot go into this denoiser (read from the file's header).

    Hub adapters and ``.bin`` files are checked by diffusers when they load.
    """
    path = source.local_file()
    if path is None or path.suffix != ".safetensors":
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as opened:
        shapes = {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
    if family in UNET_FAMILIES:
        reads = denoiser.config.cross_attention_dim
        ours = [(width, reads) for width in cross_attention_layers(denoiser)]
        names = [f"ip_adapter.{2 * index + 1}.to_k_ip.weight" for index in range(len(ours) + 1)]
        projections: tuple[str, ...] = ("image_proj.",)
    else:  # FLUX.1: every double-stream block, in XLabs' layout or diffusers' own
        reads = denoiser.config.joint_attention_dim
        ours = [(denoiser.inner_dim, reads)] * denoiser.config.num_layers
        xlabs = "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight" in shapes
        template = (
            "double_blocks.{}.processor.ip_adapter_double_stream_k_proj.weight"
            if xlabs
            else "ip_adapter.{}.to_k_ip.weight"
        )
        names = [template.format(index) for index in range(len(ours) + 1)]
        projections = ("image_proj.", "ip_adapter_proj_model.")
    found = [shapes.get(name) for name in names[:-1]]
    if not any(key.startswith(projections) for key in shapes) or found[0] is None:
        raise InvalidRequestError(
            field,
            source.model,
            f"an IP-Adapter weights file for {family} (its image projection and attention layers; {path} has neither)",
        )
    if found != ours or names[-1] in shapes:
        layers = sum(1 for key in shapes if key.endswith(("to_k_ip.weight", "k_proj.weight")))
        raise IncompatibleAdapterError(
            field,
            source.model,
            f"an IP-Adapter made for this {family} model ({len(ours)} attention layers reading {reads} features); "
            f"this one has {layers} layers reading {found[0][1] if found[0] else '?'} features",
        )


def cross_attention_layers(unet: Any) -> list[int]:
    """The width of each cross-attention layer of `unet`, in the order of diffusers' IP-Adapter keys (1, 3, 5, ...)."""
    channels = list(unet.config.block_out_channels)
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            widths.append(channels[-1])
        elif name.startswith("up_blocks"):
            widths.append(channels[::-1][int(name.split(".")[1])])
        else:
            widths.append(channels[int(name.split(".")[1])])
    return widths


def tiny_adapter_folder(family: str) -> Path:
    """The cached tiny IP-Adapter of `family` (h94/IP-Adapter's layout), built on first use for that family's tiny checkpoint."""
    from t2i_core import get_registry

    provider = get_registry().provider(family)
    base = ensure_built(provider.name, provider.tiny_version, provider.build_tiny)
    # The base's recipe version is part of the name: a new tiny base gets a new adapter.
    name = f"ip-adapter-{family}-base{provider.tiny_version}"
    return ensure_built(name, TINY_VERSION, lambda folder: _build_tiny(family, base, folder))


def _build_tiny(family: str, base: Path, folder: Path) -> None:
    """Random adapter weights shaped for the base's denoiser, and a tiny CLIP image encoder beside them."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    defaults = DEFAULTS[family]
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=_TINY_IMAGE_EMBED,
        )
    )
    encoder.save_pretrained(folder / defaults.subfolder / IMAGE_ENCODER_FOLDER)
    tensors = _tiny_unet_adapter(base) if family in UNET_FAMILIES else _tiny_flux_adapter(base)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / defaults.subfolder / defaults.weight_name))


def _tiny_unet_adapter(base: Path) -> dict[str, Any]:
    """h94/IP-Adapter's plain layout: an image projection to 4 tokens, and the keys and values of
    those tokens for every cross-attention layer. The weights are large enough that what the image
    shows, not only that there is one, changes the picture."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    cross = unet.config.cross_attention_dim
    tensors = _tiny_projection("image_proj", cross)
    for index, width in enumerate(cross_attention_layers(unet)):
        key = 2 * index + 1
        tensors[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(width, cross) * 0.5
        tensors[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(width, cross) * 0.5
    return tensors


def _tiny_flux_adapter(base: Path) -> dict[str, Any]:
    """XLabs-AI/flux-ip-adapter's layout: the projection, and keys and values (with biases) for every double-stream block."""
    import torch
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(base / "transformer")
    cross = config["joint_attention_dim"]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    tensors = _tiny_projection("ip_adapter_proj_model", cross)
    for index in range(config["num_layers"]):
        prefix = f"double_blocks.{index}.processor.ip_adapter_double_stream"
        for kind in ("k", "v"):
            tensors[f"{prefix}_{kind}_proj.weight"] = torch.randn(inner, cross) * 0.5
            tensors[f"{prefix}_{kind}_proj.bias"] = torch.randn(inner) * 0.1
    return tensors


def _tiny_projection(prefix: str, cross: int) -> dict[str, Any]:
    import torch

    return {
        f"{prefix}.proj.weight": torch.randn(cross * 4, _TINY_IMAGE_EMBED),
        f"{prefix}.proj.bias": torch.randn(cross * 4) * 0.1,
        f"{prefix}.norm.weight": 1.0 + torch.randn(cross) * 0.1,
        f"{prefix}.norm.bias": torch.randn(cross) * 0.1,
    }
