"""Sampler choice by name: each name maps to a diffusers scheduler configured from the checkpoint's own."""

from __future__ import annotations

from typing import Any

from .errors import InvalidRequestError

DEFAULT = "default"

#: name → (diffusers scheduler class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def names() -> tuple[str, ...]:
    """Every scheduler name a request may use."""
    return (DEFAULT, *SCHEDULERS)


def check(name: str | None) -> None:
    if name is not None and name != DEFAULT and name not in SCHEDULERS:
        raise InvalidRequestError("scheduler", name, "one of " + ", ".join(names()))


def build(name: str, base_config: Any) -> Any:
    """A new scheduler `name`, configured from `base_config` (the checkpoint's scheduler config)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(base_config, **overrides)
