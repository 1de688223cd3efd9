"""Find the parts of a diffusers pipeline that accelerators act on: denoisers, autoencoders, modules.

Works across families by looking at what a component *is* (its methods and attributes), not at
the pipeline class, so a third-party family gets the built-in accelerators for free.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("t2i.accelerators")

#: component names of the models a pipeline calls once per denoising step
DENOISER_NAMES = ("unet", "transformer", "prior", "prior_prior")


def torch_modules(pipeline: Any) -> dict[str, Any]:
    """Every ``torch.nn.Module`` component of `pipeline`, by component name."""
    import torch

    return {name: c for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}


def denoisers(pipeline: Any) -> dict[str, Any]:
    """The denoising models of `pipeline` (a UNet, a transformer, Kandinsky's prior, ...)."""
    modules = torch_modules(pipeline)
    return {name: modules[name] for name in DENOISER_NAMES if name in modules}


def autoencoders(pipeline: Any) -> dict[str, Any]:
    """The image autoencoders of `pipeline` (``vae``, Kandinsky's ``movq``): models with a ``decoder``."""
    return {
        name: module
        for name, module in torch_modules(pipeline).items()
        if hasattr(module, "decode") and hasattr(module, "decoder")
    }


def has_conv2d(module: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def nothing_to_do(accelerator: str, pipeline: Any, what: str) -> None:
    """Log that `accelerator` left `pipeline` unchanged because no component supports `what`."""
    logger.warning(
        "accelerator %r changed nothing: no component of %s supports %s",
        accelerator,
        type(pipeline).__name__,
        what,
    )
