"""What a LoRA or embedding file holds, read from its safetensors header (names and shapes), and whether
its weights are finite numbers (read once per file content).

Everything a request can be refused for is found here, before any weights load: a file for
another family, a format diffusers cannot convert, a rank beyond the hot-swap slots.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_core import InvalidRequestError
from t2i_core.kit import WeightsFile, file_digest, resolve_file

#: cross-attention widths of the real families, to name what a LoRA was made for
KNOWN_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
#: text-encoder widths of the real families' embeddings
KNOWN_EMBEDDING_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}

#: key endings diffusers' LoRA loader understands (PEFT, diffusers and Kohya layouts)
_LORA_PARTS = re.compile(
    r"(\.|_)(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(\.[\w-]+)?\.(weight|bias)$|\.alpha$|\.dora_scale$|\.lora_magnitude_vector(\.[\w-]+)?(\.weight)?$"
)
#: adapter kinds diffusers does not load, by a key part that gives them away
_OTHER_KINDS = {
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "oft_": "OFT",
    ".diff": "a full weight difference (LyCORIS diff)",
    "glora": "GLoRA",
}
#: key parts that give away a LoRA for the other kind of denoiser (diffusers' and Kohya's names)
_UNET_KEYS = re.compile(
    r"^unet\.|^lora_unet_(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_"
)
_TRANSFORMER_KEYS = re.compile(r"^transformer\.|^lora_transformer_|^lora_unet_(double_blocks|single_blocks)_")
_TEXT_ENCODER_2 = ("text_encoder_2.", "lora_te2_")
_TEXT_ENCODER = ("text_encoder.", "lora_te_", "lora_te1_", "te_text_model")


def header(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a safetensors file with its shape (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


@attrs.frozen
class LoraFile:
    """A resolved LoRA file: where it is, its content hash, and what its header says."""

    file: WeightsFile
    digest: str
    #: the largest rank of its layers
    rank: int
    #: whether it adapts a text encoder (first or second)
    text_encoder: bool
    text_encoder_2: bool

    @property
    def adapter_name(self) -> str:
        """The diffusers adapter name: the content's hash, so the same file loads once whatever its path."""
        return f"t2i_{self.digest[:16]}"


def lora_file(
    source: str,
    weight_name: str | None,
    field: str,
    *,
    family: str,
    denoiser: Any,
    has_text_encoder_2: bool,
) -> LoraFile:
    """Resolve a `Lora` and refuse a file that cannot go into this model, before any weights load.

    `denoiser` is the model's UNet or transformer; `has_text_encoder_2` whether the pipeline
    loads LoRAs into a second text encoder.
    """
    found = resolve_file(source, weight_name, field=field)
    shapes = _read(found, field)
    if not shapes:
        raise InvalidRequestError(field, source, f"a LoRA file ({found.name} holds no tensors)")
    _check_kind(found, shapes, field)
    _check_denoiser(found, shapes, field, family, denoiser)
    _check_width(found, shapes, field, family, denoiser.config)
    _check_layers(found, shapes, field, family, denoiser)
    text_encoder_2 = any(key.startswith(_TEXT_ENCODER_2) for key in shapes)
    if text_encoder_2 and not has_text_encoder_2:
        raise InvalidRequestError(
            field, source, f"a LoRA for {family} ({found.name} adapts a second text encoder: an SDXL LoRA)"
        )
    ranks = [shape[0] for key, shape in shapes.items() if _is_down(key) and shape]
    digest = file_digest(found.path)
    check_finite(found, digest, field, "a LoRA")
    return LoraFile(
        file=found,
        digest=digest,
        rank=max(ranks, default=0),
        text_encoder=any(key.startswith(_TEXT_ENCODER) for key in shapes),
        text_encoder_2=text_encoder_2,
    )


def _read(found: WeightsFile, field: str) -> dict[str, tuple[int, ...]]:
    try:
        return header(found.path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
        raise InvalidRequestError(
            field, found.source, f"a readable .safetensors file ({found.name}: {type(exc).__name__}: {exc})"
        ) from None


def _is_down(key: str) -> bool:
    return any(part in key for part in ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down"))


def _check_kind(found: WeightsFile, shapes: Mapping[str, Any], field: str) -> None:
    unknown = [key for key in shapes if not _LORA_PARTS.search(key)]
    if not unknown:
        return
    example = unknown[0]
    kind = next((name for part, name in _OTHER_KINDS.items() if part in example), None)
    pattern = re.sub(r"\d+", "N", example)
    what = f"{kind}, which diffusers does not load" if kind else "a layout diffusers does not know"
    raise InvalidRequestError(
        field,
        found.source,
        f"a LoRA in the diffusers, PEFT or Kohya layout ({found.name} has keys like {pattern!r}: {what})",
    )


def _check_denoiser(found: WeightsFile, shapes: Mapping[str, Any], field: str, family: str, denoiser: Any) -> None:
    """Refuse a UNet LoRA for a transformer model and the other way round (diffusers would skip its layers)."""
    unet = type(denoiser).__name__.startswith("UNet")
    other = _TRANSFORMER_KEYS if unet else _UNET_KEYS
    example = next((key for key in shapes if other.search(key)), None)
    if example is None:
        return
    made = "a transformer (FLUX.1, SD3, Z-Image...)" if unet else "a UNet (SD 1.x, SDXL)"
    raise InvalidRequestError(
        field,
        found.source,
        f"a LoRA for this {family} model, whose denoiser is a {'UNet' if unet else 'transformer'} "
        f"({found.name} is for {made}: keys like {re.sub(r'[0-9]+', 'N', example)!r})",
    )


def _check_layers(
    found: WeightsFile, shapes: Mapping[str, tuple[int, ...]], field: str, family: str, denoiser: Any
) -> None:
    """Refuse a transformer LoRA (diffusers or PEFT names) whose matrices do not fit the layers they name.

    A UNet LoRA's widths are checked by `_check_width`; Kohya names are converted by diffusers at
    load, which then raises on a mismatch (and `_adapters` names the file).
    """
    if type(denoiser).__name__.startswith("UNet"):
        return
    for key, shape in shapes.items():
        match = _PEFT_KEY.match(key)
        if match is None or len(shape) != 2:
            continue
        module_name, kind = match.group("module"), match.group("kind")
        try:
            module = denoiser.get_submodule(module_name)
        except AttributeError:
            if not key.startswith("transformer."):
                continue  # perhaps another component's layer: diffusers decides
            # diffusers would load the rest and skip this layer with a warning: half a LoRA
            raise InvalidRequestError(
                field,
                found.source,
                f"a LoRA for this {family} model ({found.name} adapts a layer it lacks, {module_name}: "
                "a LoRA for another model size or family)",
            ) from None
        ours = getattr(module, "in_features" if kind == "A" else "out_features", None)
        theirs = shape[-1] if kind == "A" else shape[0]
        if isinstance(ours, int) and ours != theirs:
            side = "input" if kind == "A" else "output"
            raise InvalidRequestError(
                field,
                found.source,
                f"a LoRA for this {family} model ({found.name} gives its layer {module_name} an {side} width of "
                f"{theirs}; this model's is {ours}: a LoRA for another model size or family)",
            )


#: a transformer LoRA key in diffusers' or PEFT's names: its layer and which matrix
_PEFT_KEY = re.compile(
    r"^(?:transformer\.|base_model\.model\.)?(?P<module>[\w.]+?)\.lora_(?P<kind>A|B)(?:\.[\w-]+)?\.weight$"
)


def _check_width(
    found: WeightsFile, shapes: Mapping[str, tuple[int, ...]], field: str, family: str, config: Mapping[str, Any]
) -> None:
    """Refuse a UNet LoRA whose cross-attention keys and values read text features of another width
    (a transformer's config has no ``cross_attention_dim``: `_check_layers` checks those)."""
    ours = config.get("cross_attention_dim")
    if isinstance(ours, (list, tuple)):
        ours = ours[0]
    widths = {
        shape[-1]
        for key, shape in shapes.items()
        if "attn2" in key and ("to_k" in key or "to_v" in key) and _is_down(key) and len(shape) == 2
    }
    if not widths or ours is None or widths == {ours}:
        return
    theirs = sorted(widths)[0]
    made_for = KNOWN_WIDTHS.get(theirs)
    made = (
        f"made for {made_for} (cross-attention width {theirs})" if made_for else f"for cross-attention width {theirs}"
    )
    raise InvalidRequestError(
        field, found.source, f"a LoRA for this {family} model (cross-attention width {ours}); {found.name} is {made}"
    )


@attrs.frozen
class EmbeddingFile:
    """A resolved textual-inversion file: its vectors per text encoder, and the token it stands for."""

    file: WeightsFile
    digest: str
    token: str
    #: text-encoder attribute (``text_encoder``, ``text_encoder_2``) → the file's key of its vectors
    keys: Mapping[str, str]


#: the keys of SDXL embeddings (A1111/ComfyUI layout): one set of vectors per text encoder
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def embedding_file(
    source: str, token: str | None, field: str, *, family: str, widths: Mapping[str, int]
) -> EmbeddingFile:
    """Resolve an `Embedding`; `widths` gives each text encoder's embedding width (attribute → width)."""
    found = resolve_file(source, None, field=field)
    shapes = _read(found, field)
    if set(widths) == set(SDXL_KEYS):
        keys = dict(SDXL_KEYS)
        if not set(SDXL_KEYS.values()) <= set(shapes):
            (width,) = {shape[-1] for shape in shapes.values()} or {0}
            made = KNOWN_EMBEDDING_WIDTHS.get(width)
            hint = f" (an {made} embedding)" if made else ""
            raise InvalidRequestError(
                field,
                source,
                f"an embedding for {family} with clip_l and clip_g vectors ({found.name} has "
                f"{', '.join(sorted(shapes)) or 'none'}{hint})",
            )
        default_token = found.path.stem
    else:
        if set(SDXL_KEYS.values()) <= set(shapes):
            raise InvalidRequestError(
                field,
                source,
                f"an embedding for {family} ({found.name} has clip_l and clip_g vectors: an SDXL embedding)",
            )
        if len(shapes) != 1:
            raise InvalidRequestError(
                field, source, f"a textual-inversion embedding with one tensor ({found.name} has {len(shapes)})"
            )
        (key,) = shapes
        keys = {"text_encoder": key}
        # diffusers' layout names the token; A1111's (emb_params) does not, and the file's name is its token.
        default_token = found.path.stem if key == "emb_params" else key
    for attribute, key in keys.items():
        shape = shapes[key]
        if not shape or shape[-1] != widths[attribute] or len(shape) > 2:
            made = KNOWN_EMBEDDING_WIDTHS.get(shape[-1]) if shape else None
            hint = f", made for {made}" if made else ""
            raise InvalidRequestError(
                field,
                source,
                f"an embedding for this {family} model (vectors of width {widths[attribute]} for its {attribute}); "
                f"{found.name}'s {key} has shape {list(shape)}{hint}",
            )
    digest = file_digest(found.path)
    check_finite(found, digest, field, "an embedding")
    return EmbeddingFile(file=found, digest=digest, token=token or default_token, keys=keys)


#: content hashes of the files whose tensors were found finite: each file is read once a process
_finite: set[str] = set()
_finite_lock = threading.Lock()


def check_finite(found: WeightsFile, digest: str, field: str, kind: str) -> None:
    """Refuse a file holding NaN or infinite weights: they would make every image black (or noise).

    Reads the tensors once per content (one file at a time); `kind` names what the file should be.
    """
    with _finite_lock:
        if digest in _finite:
            return
        import torch
        from safetensors import safe_open

        bad = []
        with safe_open(str(found.path), framework="pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(key)
        if bad:
            raise InvalidRequestError(
                field,
                found.source,
                f"{kind} with finite weights ({found.name}: {len(bad)} of {len(keys)} tensors hold NaN or "
                f"infinity, first {bad[0]})",
            )
        _finite.add(digest)
