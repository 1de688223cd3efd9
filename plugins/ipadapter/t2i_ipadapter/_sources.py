"""Where an IP-Adapter comes from (hub id, local folder or file, ``tiny:ip-adapter-<family>``) and whether it fits a base.

Everything here reads names, folders and file headers only; the weights load in `_weights`,
through diffusers' ``load_ip_adapter``, which reads the CLIP image encoder from the folder
``image_encoder`` beside the adapter's weights (``models/image_encoder`` in ``h94/IP-Adapter``).
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
#: the tiny image encoder's embedding width (the adapter's image projection reads it)
_TINY_IMAGE_EMBED = 24


@attrs.frozen
class Defaults:
    """The adapter a family uses when an `ImagePrompt` leaves `subfolder` or `weight_name` out."""

    model: str
    subfolder: str
    weight_name: str


#: per family: the reference IP-Adapter repository's layout (safetensors rather than the .bin pickles)
DEFAULTS = {
    "sd15": Defaults("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors"),
    "sdxl": Defaults("h94/IP-Adapter", "sdxl_models", "ip-adapter_sdxl.safetensors"),
}
TINY_FAMILIES = tuple(DEFAULTS)
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
        source = Source(model, str(path.parent), "", path.name)
        _check_image_encoder(source, f"{field}.model")
        return source
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
        _check_image_encoder(source, f"{field}.model")
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
        return f"an {family} IP-Adapter" if family in TINY_FAMILIES else ""
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


def check_fits(source: Source, unet: Any, family: str, field: str) -> None:
    """Refuse a local safetensors adapter whose layers cannot go into this UNet (read from the file's header).

    Hub adapters and ``.bin`` files are checked by diffusers when they load.
    """
    path = source.local_file()
    if path is None or path.suffix != ".safetensors":
        return
    from safetensors import safe_open

    wanted = cross_attention_layers(unet)
    with safe_open(str(path), framework="pt") as opened:
        shapes = {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
    found = [shapes.get(f"ip_adapter.{2 * index + 1}.to_k_ip.weight") for index in range(len(wanted))]
    if not any(key.startswith("image_proj.") for key in shapes) or found[0] is None:
        raise InvalidRequestError(
            field, source.model, f"an IP-Adapter weights file (image_proj.* and ip_adapter.* tensors; {path} has none)"
        )
    ours = [(hidden, unet.config.cross_attention_dim) for hidden in wanted]
    extra = f"ip_adapter.{2 * len(wanted) + 1}.to_k_ip.weight" in shapes
    if found != ours or extra:
        layers = sum(1 for key in shapes if key.endswith(".to_k_ip.weight"))
        raise IncompatibleAdapterError(
            field,
            source.model,
            f"an IP-Adapter made for this {family} model ({len(wanted)} cross-attention layers reading "
            f"{unet.config.cross_attention_dim} features); this one has {layers} layers reading "
            f"{found[0][1] if found[0] else '?'} features",
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
    return ensure_built(name, TINY_VERSION, lambda folder: _build_tiny(DEFAULTS[family], base, folder))


def _build_tiny(defaults: Defaults, base: Path, folder: Path) -> None:
    """Random adapter weights shaped for the base's UNet, and a tiny CLIP image encoder beside them."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    cross = unet.config.cross_attention_dim
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
    # The layout of h94/IP-Adapter's plain adapters: an image projection to 4 tokens, and the
    # keys and values of those tokens for every cross-attention layer. The weights are large
    # enough that what the image shows, not only that there is one, changes the picture.
    tensors = {
        "image_proj.proj.weight": torch.randn(cross * 4, _TINY_IMAGE_EMBED),
        "image_proj.proj.bias": torch.randn(cross * 4) * 0.1,
        "image_proj.norm.weight": 1.0 + torch.randn(cross) * 0.1,
        "image_proj.norm.bias": torch.randn(cross) * 0.1,
    }
    for index, width in enumerate(cross_attention_layers(unet)):
        key = 2 * index + 1
        tensors[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(width, cross) * 0.5
        tensors[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(width, cross) * 0.5
    save_file(tensors, str(folder / defaults.subfolder / defaults.weight_name))
