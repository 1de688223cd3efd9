"""Where a ControlNet comes from (hub id, local folder, ``tiny:controlnet-<family>``) and whether it fits a base.

Everything here reads configs only; weights are loaded by the conditioner, once per engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_core import InvalidRequestError, ModelNotFoundError
from t2i_core.kit import hub_offline, is_hub_id
from t2i_core.tiny import TINY_PREFIX, ensure_built

#: the families that offer a tiny ControlNet, built from that family's tiny checkpoint
TINY_FAMILIES = ("sd15", "sdxl")
#: bump when the tiny ControlNet recipe changes, so caches are rebuilt
TINY_VERSION = 1
#: the config entries that must agree between a ControlNet and the base UNet it steers
MATCHED_KEYS = ("cross_attention_dim", "addition_embed_type", "block_out_channels")
#: entries that must agree too where both configs write them (older configs may omit them)
MATCHED_IF_PRESENT = ("layers_per_block", "down_block_types", "transformer_layers_per_block")

_CONTROLNET_CLASS = "ControlNetModel"
_TINY_NAMES = ", ".join(f"{TINY_PREFIX}controlnet-{family}" for family in TINY_FAMILIES)
ALLOWED_MODELS = f"a hub id, a local ControlNet folder or one of {_TINY_NAMES}"


class IncompatibleControlNetError(InvalidRequestError):
    """A ControlNet made for another kind of base model (e.g. an SDXL ControlNet on SD1.5)."""


@attrs.frozen
class Source:
    """A ControlNet as `ControlNetModel.from_pretrained` takes it, with its config."""

    model: str
    location: str
    config: Mapping[str, Any]


def resolve(model: str, field: str) -> Source:
    """Find the ControlNet `model` names and read its config (no weights). `field` names it in errors."""
    if model.startswith(TINY_PREFIX):
        location = str(tiny_controlnet_folder(_tiny_family(model, field)))
        return Source(model, location, _read_config(model, location, field))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InvalidRequestError(field, model, f"{ALLOWED_MODELS} ({path} has no config.json)")
        return Source(model, str(path), _read_config(model, str(path), field))
    if not is_hub_id(model):
        raise InvalidRequestError(field, model, f"{ALLOWED_MODELS} (the folder {path} does not exist)")
    return Source(model, model, _read_config(model, model, field))


def describe(model: str) -> str:
    """What kind of ControlNet `model` names, e.g. "an sd15 ControlNet", from its name or a config
    already on disk (nothing is built or downloaded); "" when that cannot be told."""
    if model.startswith(TINY_PREFIX):
        family = model[len(TINY_PREFIX) :].removeprefix("controlnet-")
        return f"an {family} ControlNet" if family in TINY_FAMILIES else ""
    config = _config_on_disk(model)
    if config is None:
        return ""
    if config.get("_class_name") != _CONTROLNET_CLASS:
        return f"a {config.get('_class_name')}"
    if config.get("addition_embed_type") == "text_time":
        return "an sdxl ControlNet"
    # SD 1.x reads CLIP-L's 768 features, SD 2.x OpenCLIP-H's 1024; other widths are custom (or tiny) bases.
    return {768: "an sd15 ControlNet", 1024: "an SD 2.x ControlNet"}.get(
        config.get("cross_attention_dim"), "an SD 1.x/2.x ControlNet"
    )


def _config_on_disk(model: str) -> Mapping[str, Any] | None:
    """The config.json of a local ControlNet folder, or of a hub ControlNet in the local Hugging Face cache."""
    import json

    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        if not is_hub_id(model):
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _tiny_family(model: str, field: str) -> str:
    from t2i_core import get_registry

    name = model[len(TINY_PREFIX) :]
    family = name.removeprefix("controlnet-")
    if not name.startswith("controlnet-") or family not in TINY_FAMILIES:
        raise InvalidRequestError(field, model, ALLOWED_MODELS)
    if family not in get_registry().providers:
        raise InvalidRequestError(field, model, f"{ALLOWED_MODELS} whose family is installed (no {family!r} family)")
    return family


def tiny_controlnet_folder(family: str) -> Path:
    """The cached tiny ControlNet of `family`, built on first use from that family's tiny checkpoint."""
    from t2i_core import get_registry

    provider = get_registry().provider(family)
    base = ensure_built(provider.name, provider.tiny_version, provider.build_tiny)
    # The base's recipe version is part of the name: a new tiny base gets a new ControlNet.
    name = f"controlnet-{family}-base{provider.tiny_version}"
    return ensure_built(name, TINY_VERSION, lambda folder: _build_tiny(base, folder))


def _build_tiny(base: Path, folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    # The conditioning embedding must shrink the image by the VAE's factor: one stage per VAE level.
    levels = len(AutoencoderKL.load_config(base / "vae")["block_out_channels"])
    channels = (16, 32, 96, 256, 512)[:levels]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    # from_unet zero-initialises the output convolutions, so a fresh ControlNet changes nothing.
    # Random ones make it steer the result; the embedding's is large so that what the control
    # image shows, not only that there is one, changes the picture (tests tell images apart).
    with torch.no_grad():
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.normal_(conv.bias, std=0.3)
        embedding_out = controlnet.controlnet_cond_embedding.conv_out
        torch.nn.init.normal_(embedding_out.weight, std=10.0)
        torch.nn.init.normal_(embedding_out.bias, std=0.3)
    controlnet.save_pretrained(folder)


def _read_config(model: str, location: str, field: str) -> Mapping[str, Any]:
    from diffusers import ControlNetModel

    try:
        config = dict(ControlNetModel.load_config(location))
    except Exception as exc:  # noqa: BLE001 - hub, network and JSON failures all mean "cannot read it"
        raise ModelNotFoundError(model, f"the ControlNet of {field} has no readable config ({_why(exc)})") from None
    if config.get("_class_name") != _CONTROLNET_CLASS:
        raise InvalidRequestError(
            field, model, f"a diffusers ControlNetModel checkpoint (this one is a {config.get('_class_name')!r})"
        )
    return config


def _why(exc: BaseException) -> str:
    if hub_offline():
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"


def check_fits(source: Source, base_config: Mapping[str, Any], family: str, field: str) -> None:
    """Refuse a ControlNet whose residuals cannot feed this base UNet."""
    present = [k for k in MATCHED_IF_PRESENT if source.config.get(k) is not None and base_config.get(k) is not None]
    keys = [*MATCHED_KEYS, *present]
    theirs = {key: _plain(source.config.get(key)) for key in keys}
    ours = {key: _plain(base_config.get(key)) for key in keys}
    if theirs == ours:
        return
    wanted = ", ".join(f"{key}={value!r}" for key, value in ours.items())
    found = ", ".join(f"{key}={theirs[key]!r}" for key in keys if theirs[key] != ours[key])
    raise IncompatibleControlNetError(
        field,
        source.model,
        f"a ControlNet made for this {family} model ({wanted}); this one has {found}{_kind_hint(theirs, ours)}",
    )


def _kind_hint(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    if theirs["addition_embed_type"] == "text_time" and ours["addition_embed_type"] != "text_time":
        return " (an SDXL ControlNet)"
    if ours["addition_embed_type"] == "text_time" and theirs["addition_embed_type"] != "text_time":
        return " (a ControlNet for SD 1.x/2.x, not SDXL)"
    return ""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
