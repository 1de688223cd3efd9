"""One component of a pipeline (its denoiser) loaded from a single file: dtype, GGUF and quantization.

A GGUF file holds a denoiser quantized already; diffusers reads it through the ``gguf`` package,
which t2i does not depend on: what needs it imports it when it runs and says how to install it.
diffusers' ``from_single_file`` quantizes nothing as it loads (every quantization config is taken
for a description of weights quantized already), so a quantizing accelerator's config goes to
``from_pretrained`` of the component converted to diffusers' layout instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ._hub import read_model_index
from .errors import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError

GGUF_SUFFIX = ".gguf"
#: the pipeline attributes that hold a family's denoiser (as `t2i_core.kit.denoiser` looks for them)
DENOISERS = ("unet", "transformer", "prior")
GGUF_INSTALL = "reading a GGUF file needs the gguf package: python -m pip install gguf"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a GGUF file (by its suffix; it may not exist)."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


def gguf_tensor_names(model: str, path: Path) -> list[str]:
    """The tensor names of the GGUF file `path`, read from its header (no weights are read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelNotFoundError(model, GGUF_INSTALL) from None
    try:
        return [str(tensor.name) for tensor in GGUFReader(str(path)).tensors]
    except Exception as exc:  # noqa: BLE001 - gguf's errors for damaged files are plain ValueErrors and the like
        raise ModelNotFoundError(model, f"it is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def quantized_components(config: Any) -> frozenset[str] | None:
    """The components a diffusers ``PipelineQuantizationConfig`` quantizes; None when it quantizes all."""
    mapping = getattr(config, "quant_mapping", None)
    if mapping:
        return frozenset(mapping)
    components = getattr(config, "components_to_quantize", None)
    return frozenset(components) if components else None


def quantizes(config: Any, components: Collection[str]) -> bool:
    """Whether the pipeline quantization `config` quantizes any of `components`."""
    named = quantized_components(config)
    return named is None or not named.isdisjoint(components)


def load_single_file_component(
    model_class: type,
    file: str | os.PathLike[str],
    config: str,
    load_kwargs: Mapping[str, Any],
    component: str = "transformer",
) -> Any:
    """`component` of a pipeline (its ``transformer``, ``unet``, ...) loaded from the single file `file`.

    The configs come from the local diffusers folder `config` (its `component` subfolder); nothing
    is downloaded. `load_kwargs` are the engine's accelerators' loading arguments, honoured as
    diffusers' ``from_pretrained`` would honour them for a diffusers folder:

    - ``torch_dtype``: the component's dtype;
    - a ``.gguf`` `file`: loaded with ``GGUFQuantizationConfig(compute_dtype=<the dtype>)``, its
      weights stay quantized (``GGUFParameter``) and are dequantized layer by layer as they run;
    - ``quantization_config`` (diffusers' ``PipelineQuantizationConfig``) that covers `component`:
      its config for `component` quantizes it. diffusers' ``from_single_file`` cannot quantize as
      it loads, so the component is converted to diffusers' layout in a temporary folder and
      loaded from there with ``from_pretrained(..., quantization_config=...)``: the same weights
      as a diffusers folder of that file would give.

    Call it with `loading_lock` held (the engine holds it around ``load_single_file``).

    :param model_class: the diffusers model class (``FluxTransformer2DModel``).
    :raises InvalidRequestError: a ``quantization_config`` covers `component` of a GGUF file
        (quantized already).
    """
    import torch

    dtype = load_kwargs.get("torch_dtype")
    single: dict[str, Any] = {"subfolder": component, "local_files_only": True}
    if dtype not in (None, torch.float32):  # float32 is what from_single_file loads anyway
        single["torch_dtype"] = dtype
    quantization = load_kwargs.get("quantization_config")
    quantized = quantization is not None and quantizes(quantization, [component])
    if is_gguf(file):
        if quantized:
            raise InvalidRequestError(
                "quantization_config",
                type(quantization).__name__,
                f"none that covers the {component} of a GGUF file (its weights are quantized already)",
            )
        from diffusers import GGUFQuantizationConfig

        single["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype or torch.float32)
        return model_class.from_single_file(str(file), config=config, **single)  # type: ignore[attr-defined]
    loaded = model_class.from_single_file(str(file), config=config, **single)  # type: ignore[attr-defined]
    if quantization is None or not quantized:
        return loaded
    # diffusers resolves a pipeline config per component with this method as from_pretrained loads each one.
    own = quantization._resolve_quant_config(is_diffusers=True, module_name=component)
    pretrained: dict[str, Any] = {"quantization_config": own}
    if dtype is not None:
        pretrained["torch_dtype"] = dtype
    with tempfile.TemporaryDirectory(prefix="t2i-single-file-") as folder:
        loaded.save_pretrained(folder)
        del loaded
        # read into memory, not mapped: the folder goes when this returns
        return model_class.from_pretrained(folder, local_files_only=True, disable_mmap=True, **pretrained)  # type: ignore[attr-defined]


def quantized_denoiser(family: str, file: str, config: str, load_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``{"unet": <the quantized UNet>}`` (or its transformer) for a pipeline ``from_single_file`` call.

    diffusers' pipeline ``from_single_file`` quantizes no component: the denoiser is loaded here with
    the ``quantization_config`` of `load_kwargs` and handed over; nothing when it does not cover the
    denoiser. Quantizing another component of a single file is refused.
    """
    quantization = load_kwargs.get("quantization_config")
    if quantization is None:
        return {}
    index = read_model_index(config, config, True)
    components = {name for name, spec in index.items() if _is_component(spec)}
    component = next((name for name in DENOISERS if name in components), None)
    named = quantized_components(quantization)
    others = [] if named is None else sorted(named & (components - {component}))
    if component is None or named is None or others:
        raise UnsupportedFeatureError(
            family,
            f"quantizing {', '.join(others) or 'every component'} of a single file as it loads "
            "(only its denoiser: quantize that alone, or load a diffusers folder)",
        )
    if not quantizes(quantization, [component]):
        return {}
    import diffusers

    model_class = getattr(diffusers, index[component][1])
    return {component: load_single_file_component(model_class, file, config, load_kwargs, component)}


def _is_component(spec: Any) -> bool:
    return isinstance(spec, list) and len(spec) == 2 and None not in spec
