"""Torch modules as plugins and the engine see them: offloaded or not, and which components an engine owns."""

from __future__ import annotations

from typing import Any


def is_offloaded(module: Any) -> bool:
    """Whether offloading moves `module`'s weights (a torch module, or any of its submodules).

    True for accelerate's model and sequential offload hooks and diffusers' group offloading:
    models that move in and out of the device around each call, so a model placed beside them
    with ``.to(device)`` would meet its inputs on the wrong device.
    """
    for submodule in module.modules():
        if hasattr(submodule, "_hf_hook"):
            return True
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("group_offloading") is not None:
            return True
    return False


def private_components(pipeline: Any) -> dict[str, Any]:
    """`pipeline.components`, with every component that is not a torch module deep-copied."""
    import torch

    return {
        name: component if component is None or isinstance(component, torch.nn.Module) else _deep_copy(component)
        for name, component in pipeline.components.items()
    }


def _deep_copy(component: Any) -> Any:
    import copy

    copied = copy.deepcopy(component)
    # transformers' CLIPTokenizer wraps its Rust tokenizer's decode at construction (to turn "</w>"
    # into spaces); a deep copy has a new Rust tokenizer without the wrapper, so it decodes
    # "a</w>cat</w>" — which Compel's textual-inversion manager re-encodes into other tokens.
    rewrap = getattr(copied, "_wrap_decode_method_backend_tokenizer", None)
    if callable(rewrap):
        rewrap()
    return copied


def pipeline_over(pipeline_class: Any, pipeline: Any) -> Any:
    """A `pipeline_class` pipeline over `pipeline`'s components and configuration: nothing loads or moves.

    What diffusers' ``from_pipe`` builds, without its closing ``.to(dtype)``, which would cast the
    shared weights in place (and refuse quantized ones). Each ``__init__`` argument is the
    component of that name, else the configuration value of that name, else its default.
    """
    import inspect

    components = pipeline.components
    config = pipeline.config
    arguments: dict[str, Any] = {}
    for name in list(inspect.signature(pipeline_class.__init__).parameters)[1:]:
        if name in components:
            arguments[name] = components[name]
        elif name in config:
            arguments[name] = config[name]
    return pipeline_class(**arguments)
