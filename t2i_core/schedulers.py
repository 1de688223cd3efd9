"""Sampler choice by name: each name maps to a diffusers scheduler configured from the checkpoint's own.

A name may end with one schedule modifier, ``NAME:MODIFIER`` (``euler:karras``, ``ddim:trailing``): the
same scheduler with the diffusers setting that gives that noise schedule (`MODIFIERS`). A modifier is
allowed where the scheduler class takes that setting (diffusers' ``EulerAncestralDiscreteScheduler``
has no ``use_karras_sigmas``, so ``euler-ancestral:karras`` is refused, naming the pair).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._locks import loading_lock
from .errors import InvalidRequestError

DEFAULT = "default"
"""The scheduler name that means the checkpoint's own scheduler (``scheduler=None`` in a request)."""

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
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++-2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    # Needs torchsde. Its Brownian-tree noise is seeded from the config, not the request's generator:
    # a fixed seed keeps the image a function of the request (the request's seed sets the start noise).
    "dpm++-sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
}

#: the sigma schedules a scheduler class may take: modifier → its diffusers flag (one at most is on)
SIGMAS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
#: the timestep spacings (diffusers' ``timestep_spacing``)
SPACINGS = ("linspace", "leading", "trailing")
#: every schedule modifier a name may end with (``:karras``)
MODIFIERS = (*SIGMAS, *SPACINGS)
SEPARATOR = ":"


#: a family's own named schedulers (`ModelProvider.named_schedulers`): name → (class name, overrides)
OwnSchedulers = Mapping[str, tuple[str, Mapping[str, Any]]]


def names(own: OwnSchedulers | None = None) -> tuple[str, ...]:
    """Every scheduler name a request may use (with a family's `own` named schedulers)."""
    return tuple(dict.fromkeys((DEFAULT, *SCHEDULERS, *(own or {}))))


def family_names(supported: tuple[str, ...] | None, own: OwnSchedulers | None = None) -> tuple[str, ...]:
    """The names a family runs: ``default``, the shared ones it `supported` (None = all) and its `own`."""
    shared = tuple(SCHEDULERS) if supported is None else tuple(supported)
    return tuple(dict.fromkeys((DEFAULT, *shared, *(own or {}))))


def split(name: str) -> tuple[str, str | None]:
    """`name`'s scheduler and its schedule modifier: ``euler:karras`` → (``euler``, ``karras``)."""
    base, separator, modifier = name.partition(SEPARATOR)
    return (base, modifier) if separator else (name, None)


def modifier_overrides(class_name: str, modifier: str) -> dict[str, Any]:
    """The config overrides that give diffusers scheduler `class_name` the schedule `modifier`;
    {} when the class does not take that setting."""
    import inspect

    with loading_lock:
        import diffusers

        scheduler_class = getattr(diffusers, class_name)
    takes = inspect.signature(scheduler_class.__init__).parameters
    if modifier in SPACINGS:
        return {"timestep_spacing": modifier} if "timestep_spacing" in takes else {}
    if SIGMAS.get(modifier) not in takes:
        return {}
    return {flag: each == modifier for each, flag in SIGMAS.items() if flag in takes}


def modifiers_of(class_name: str) -> tuple[str, ...]:
    """The schedule modifiers diffusers scheduler `class_name` takes."""
    return tuple(modifier for modifier in MODIFIERS if modifier_overrides(class_name, modifier))


def check(
    name: str | None, supported: tuple[str, ...] | None = None, family: str = "", own: OwnSchedulers | None = None
) -> None:
    """Refuse an unknown name, or one the family's pipeline cannot run.

    `supported` lists the shared names the family runs (None = all); its `own` named
    schedulers are always allowed. A ``:MODIFIER`` must be one the scheduler class takes.
    """
    if name is None or name == DEFAULT:
        return
    base, modifier = split(name)
    if modifier is None:
        _check_name(name, supported, family, own)
        _check_installed(name, own)
        return
    if base == DEFAULT:
        raise InvalidRequestError("scheduler", name, f"a scheduler name before {SEPARATOR}{modifier} (not default)")
    _check_name(base, supported, family, own, value=name)
    class_name = ((own or {}).get(base) or SCHEDULERS[base])[0]
    if modifier not in MODIFIERS or not modifier_overrides(class_name, modifier):
        takes = modifiers_of(class_name)
        allowed = ", ".join(f"{base}{SEPARATOR}{each}" for each in takes) or f"{base} without a modifier"
        raise InvalidRequestError(
            "scheduler", name, f"one of {allowed} (diffusers' {class_name} has no {modifier!r} schedule)"
        )
    _check_installed(base, own)


#: scheduler classes that need a package diffusers does not depend on: class name → (module, pip name)
NEEDS = {"DPMSolverSDEScheduler": ("torchsde", "torchsde")}


def installed(name: str, own: OwnSchedulers | None = None) -> bool:
    """Whether what scheduler `name` (without a modifier) needs beyond diffusers is installed."""
    import importlib.util

    class_name = ((own or {}).get(name) or SCHEDULERS[name])[0]
    module, _package = NEEDS.get(class_name, (None, None))
    return module is None or importlib.util.find_spec(module) is not None


def _check_installed(name: str, own: OwnSchedulers | None) -> None:
    class_name = ((own or {}).get(name) or SCHEDULERS[name])[0]
    _module, package = NEEDS.get(class_name, (None, None))
    if not installed(name, own):
        raise InvalidRequestError(
            "scheduler", name, f"another scheduler ({name} needs {package}: pip install {package})"
        )


def _check_name(
    name: str, supported: tuple[str, ...] | None, family: str, own: OwnSchedulers | None, value: str = ""
) -> None:
    """Refuse scheduler `name` (the part of `value` before its modifier) where unknown or not the family's."""
    if name in (own or {}):
        return
    if name not in SCHEDULERS:
        allowed = family_names(supported, own) if own else names()
        raise InvalidRequestError("scheduler", value or name, "one of " + ", ".join(allowed))
    if supported is not None and name not in supported:
        allowed_names = ", ".join(family_names(supported, own))
        raise InvalidRequestError(
            "scheduler", value or name, f"one of the schedulers family {family!r} can run: {allowed_names}"
        )


def build(name: str, base_config: Any, own: OwnSchedulers | None = None) -> Any:
    """A new scheduler `name` (a shared one, or one of a family's `own`), configured from
    `base_config` (the checkpoint's scheduler config)."""
    base, modifier = split(name)
    class_name, overrides = (own or {}).get(base) or SCHEDULERS[base]
    settings = {**overrides, **(modifier_overrides(class_name, modifier) if modifier else {})}
    with loading_lock:  # diffusers' lazy attribute lookup is not thread-safe
        import diffusers

        scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(base_config, **settings)


_limits: dict[str, int] = {}


def max_steps(scheduler: Any) -> int:
    """The most inference steps `scheduler` can run.

    Found by trying, on a copy: a schedule is usable when the whole loop of ``step`` calls runs
    (with stand-in model outputs). With ``steps_offset=1`` (Stable Diffusion's DDIM and PNDM)
    1000 steps would reach timestep 1000 of a 0..999 schedule; DPM-Solver++ at 1000 steps runs
    off the end of its sigmas. The answer is cached per scheduler class and configuration.
    """
    import json

    key = type(scheduler).__name__ + json.dumps(dict(scheduler.config), sort_keys=True, default=str)
    if key not in _limits:
        _limits[key] = _search_max_steps(scheduler)
    return _limits[key]


def _search_max_steps(scheduler: Any) -> int:
    import copy
    import inspect

    import torch

    trained = int(getattr(scheduler.config, "num_train_timesteps", 0) or 0)
    if trained <= 0:
        return 1000
    trial = copy.deepcopy(scheduler)
    takes_generator = "generator" in inspect.signature(trial.step).parameters
    scales = hasattr(trial, "scale_model_input")
    # Discrete schedules index a table of `trained` timesteps; flow matching's run on (0, trained].
    highest = trained - 1 if scales else trained

    def usable(steps: int) -> bool:
        sample = torch.zeros(1, 1, 1, 1)
        extra = {"generator": torch.Generator("cpu").manual_seed(0)} if takes_generator else {}
        try:
            trial.set_timesteps(steps, device="cpu")
            timesteps = trial.timesteps
            if len(timesteps) == 0 or float(timesteps.max()) > highest or float(timesteps.min()) < 0:
                return False
            for timestep in timesteps:
                # Flow-matching schedulers take the sample as it is: they have no scale_model_input.
                model_input = trial.scale_model_input(sample, timestep) if scales else sample
                sample = trial.step(torch.zeros_like(model_input), timestep, sample, **extra).prev_sample
        except Exception:  # noqa: BLE001 - IndexError, AssertionError, ...: whatever breaks, the count is not usable
            return False
        return True

    for steps in (trained, trained - 1, trained - 2):
        if usable(steps):
            return steps
    low, high = 1, trained - 2  # usable(low) is assumed, usable(high) is not
    while high - low > 1:
        middle = (low + high) // 2
        if usable(middle):
            low = middle
        else:
            high = middle
    return low
