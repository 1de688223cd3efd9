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
    # PLMS (skip_prk_steps) as Stable Diffusion uses it: the Runge-Kutta warm-up needs >= 4 steps.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def names() -> tuple[str, ...]:
    """Every scheduler name a request may use."""
    return (DEFAULT, *SCHEDULERS)


def check(name: str | None, supported: tuple[str, ...] | None = None, family: str = "") -> None:
    """Refuse an unknown name, or one the family's pipeline cannot run (`supported`; None = all)."""
    if name is None or name == DEFAULT:
        return
    if name not in SCHEDULERS:
        raise InvalidRequestError("scheduler", name, "one of " + ", ".join(names()))
    if supported is not None and name not in supported:
        allowed = ", ".join((DEFAULT, *supported))
        raise InvalidRequestError("scheduler", name, f"one of the schedulers family {family!r} can run: {allowed}")


def build(name: str, base_config: Any) -> Any:
    """A new scheduler `name`, configured from `base_config` (the checkpoint's scheduler config)."""
    import diffusers

    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(base_config, **overrides)
