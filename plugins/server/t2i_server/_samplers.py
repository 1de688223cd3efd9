"""AUTOMATIC1111's samplers and schedule types, as the t2i scheduler names that run them.

A sampler is a diffusers scheduler class (``Euler a`` = ``euler-ancestral``); a schedule type
(A1111 1.9+'s ``scheduler`` field) is the diffusers setting that gives its noise schedule, written
as t2i's scheduler modifier (``euler:karras``). A pair is served where the scheduler class takes
that setting, and refused (422, naming the pair) where diffusers lacks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import GenerationRequest, InvalidRequestError

from ._errors import invalid

if TYPE_CHECKING:
    from ._schemas import Txt2ImgBody


@attrs.frozen
class Sampler:
    """An AUTOMATIC1111 sampler and the t2i scheduler that runs the same algorithm."""

    name: str
    aliases: tuple[str, ...]
    scheduler: str


SAMPLERS = (
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpm++-2m"),
    Sampler("DPM++ SDE", ("k_dpmpp_sde",), "dpm++-sde"),
    Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpm++-2m-sde"),
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler-ancestral"),
    Sampler("Euler", ("k_euler",), "euler"),
    Sampler("LMS", ("k_lms",), "lms"),
    Sampler("Heun", ("k_heun",), "heun"),
    Sampler("DPM2", ("k_dpm_2",), "dpm2"),
    Sampler("DPM2 a", ("k_dpm_2_a",), "dpm2-ancestral"),
    Sampler("DDIM", ("ddim",), "ddim"),
    Sampler("DDPM", ("ddpm",), "ddpm"),
    Sampler("PLMS", ("plms",), "pndm"),
    Sampler("UniPC", ("unipc",), "unipc"),
)


@attrs.frozen
class Schedule:
    """An AUTOMATIC1111 schedule type: the t2i scheduler modifier that gives it, or why none does."""

    name: str
    label: str
    #: t2i's scheduler modifier (None: the sampler's own schedule, or refused where `lacking` says why)
    modifier: str | None
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False
    #: why diffusers cannot run it (None: it can)
    lacking: str | None = None


SCHEDULES = (
    Schedule("automatic", "Automatic", None),
    # get_sigmas(n): timesteps evenly spaced over the whole training schedule
    Schedule("uniform", "Uniform", "linspace"),
    Schedule("karras", "Karras", "karras", default_rho=7.0),
    Schedule("exponential", "Exponential", "exponential"),
    # k-diffusion's polyexponential at A1111's default rho (1.0) is the exponential schedule
    Schedule("polyexponential", "Polyexponential", "exponential", default_rho=1.0),
    # timesteps evenly spaced from the last, the first one dropped: diffusers' "trailing"
    Schedule("sgm_uniform", "SGM Uniform", "trailing", aliases=("SGMUniform",), need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", None, lacking="diffusers has no KL-optimal schedule"),
    Schedule(
        "align_your_steps",
        "Align Your Steps",
        None,
        lacking="diffusers' schedulers take Align Your Steps only as a pipeline's timesteps list",
    ),
    Schedule("simple", "Simple", "trailing", need_inner_model=True),
    Schedule("normal", "Normal", "linspace", need_inner_model=True),
    Schedule("ddim", "DDIM", "leading", need_inner_model=True),
    Schedule("beta", "Beta", "beta", need_inner_model=True),
)
AUTOMATIC = SCHEDULES[0]

#: t2i's schedulers of a flow-matching family stand for AUTOMATIC1111's by this prefix: "Euler" is
#: ``flow-euler`` there (Flux, SD3, Z-Image), "Euler" with the Karras schedule ``flow-euler:karras``
FLOW_PREFIX = "flow-"


def _names(each: Schedule) -> tuple[str, ...]:
    return tuple(name.lower() for name in (each.name, each.label, *each.aliases))


def schedule(name: str | None) -> Schedule:
    """AUTOMATIC1111's schedule type `name` (its name, label or an alias, any case); None = Automatic."""
    if name is None or not name.strip():
        return AUTOMATIC
    wanted = name.strip().lower()
    for each in SCHEDULES:
        if wanted in _names(each):
            return each
    allowed = ", ".join(each.name for each in SCHEDULES)
    raise invalid("scheduler", f"scheduler={name!r} is not one of AUTOMATIC1111's schedule types", f"one of {allowed}")


def sampler_and_schedule(sampler_name: str | None, scheduler: str | None) -> tuple[Sampler | None, Schedule]:
    """The sampler and schedule AUTOMATIC1111 would pick: a schedule label at the end of the sampler's name
    (``DPM++ 2M Karras``) wins over the ``scheduler`` field, as there; None = the model's own sampler."""
    chosen = schedule(scheduler)
    if sampler_name is None or not sampler_name.strip():
        return None, chosen
    wanted = sampler_name.strip().lower()
    found = _sampler(wanted)
    if found is None:
        for each in SCHEDULES:
            suffix = next((name for name in _names(each) if wanted.endswith(" " + name)), None)
            if suffix is not None:
                found = _sampler(wanted[: -len(suffix) - 1])
                if found is not None:
                    chosen = each
                    break
    if found is None:
        allowed = ", ".join(repr(s.name) for s in SAMPLERS)
        raise invalid(
            "sampler_name",
            f"sampler_name={sampler_name!r} is not a sampler t2i runs",
            f"one of {allowed}, optionally followed by a schedule type (DPM++ 2M Karras)",
        )
    return found, chosen


def _sampler(wanted: str) -> Sampler | None:
    return next((s for s in SAMPLERS if wanted == s.name.lower() or wanted in s.aliases), None)


def label(body: Txt2ImgBody) -> tuple[str, str]:
    """The sampler name and schedule type AUTOMATIC1111 reports for `body` (``Euler a``, ``Karras``)."""
    chosen, each = sampler_and_schedule(body.sampler_name or body.sampler_index, body.scheduler)
    return (chosen.name if chosen else "Default"), each.label


def family_scheduler(provider: Any, scheduler: str) -> str | None:
    """The scheduler of `provider`'s family that runs t2i scheduler `scheduler` (``euler``): itself when the
    family runs it, else its flow-matching counterpart (``flow-euler``); None when the family has neither."""
    own = provider.named_schedulers or {}
    if scheduler in own or provider.schedulers is None or scheduler in provider.schedulers:
        return scheduler
    flow = f"{FLOW_PREFIX}{scheduler}"
    return flow if flow in own else None


def t2i_name(provider: Any, chosen: Sampler, each: Schedule) -> str | None:
    """The t2i scheduler name for `chosen` with schedule `each` on `provider`'s family (unchecked modifier);
    None where the family has no form of the sampler or diffusers lacks the schedule."""
    base = family_scheduler(provider, chosen.scheduler)
    if base is None or each.lacking is not None:
        return None
    return f"{base}:{each.modifier}" if each.modifier else base


def serves(engine: Any, name: str) -> bool:
    """Whether `engine` runs t2i scheduler `name` (the family and diffusers' scheduler class take it)."""
    try:
        engine.resolve(GenerationRequest(prompt="x", scheduler=name, num_inference_steps=1))
    except InvalidRequestError as exc:
        return exc.field != "scheduler"
    return True


def scheduler_for(body: Txt2ImgBody, engine: Any) -> tuple[Sampler | None, str | None]:
    """The sampler and t2i scheduler for `body`'s ``sampler_name`` (or ``sampler_index``) and ``scheduler`` on
    `engine`'s family; a pair its diffusers scheduler cannot run is refused, naming the pair and what is served."""
    chosen, each = sampler_and_schedule(body.sampler_name or body.sampler_index, body.scheduler)
    if chosen is None:
        if each is not AUTOMATIC:
            raise invalid(
                "scheduler",
                f"scheduler={body.scheduler!r} needs a sampler_name (t2i runs the model's own sampler without one)",
                "Automatic without sampler_name, or a sampler_name",
            )
        return None, None
    provider = engine.provider
    name = t2i_name(provider, chosen, each)
    if name is not None and (each.modifier is None or serves(engine, name)):
        return chosen, name
    if family_scheduler(provider, chosen.scheduler) is None:
        served = [s.name for s in SAMPLERS if family_scheduler(provider, s.scheduler) is not None]
        raise invalid(
            "sampler_name",
            f"sampler_name={chosen.name!r} is not available for family {provider.name!r}",
            "one of " + (", ".join(repr(name) for name in served) or "none (leave sampler_name empty)"),
        )
    why = each.lacking or f"diffusers' scheduler for {chosen.name!r} has no {each.modifier!r} setting"
    raise invalid(
        "scheduler",
        f"scheduler={each.name!r} is not available with sampler_name={chosen.name!r} ({why})",
        "one of " + ", ".join(schedules_for(engine, chosen)),
    )


def schedules_for(engine: Any, chosen: Sampler) -> list[str]:
    """The schedule types `engine` runs with sampler `chosen`."""
    served = []
    for each in SCHEDULES:
        name = t2i_name(engine.provider, chosen, each)
        if name is not None and (each.modifier is None or serves(engine, name)):
            served.append(each.name)
    return served


def schedulers(engine: Any) -> list[dict[str, Any]]:
    """``/sdapi/v1/schedulers``: the schedule types `engine` runs with at least one sampler, as A1111 lists them."""
    runs = [s for s in SAMPLERS if family_scheduler(engine.provider, s.scheduler) is not None]
    served = {name for s in runs for name in schedules_for(engine, s)}
    return [
        {
            "name": each.name,
            "label": each.label,
            "aliases": list(each.aliases) or None,
            "default_rho": each.default_rho,
            "need_inner_model": each.need_inner_model,
        }
        for each in SCHEDULES
        if each.name in served
    ]


def samplers(engine: Any) -> list[dict[str, Any]]:
    """``/sdapi/v1/samplers``: the samplers `engine`'s family runs, with their t2i scheduler."""
    listed = []
    for s in SAMPLERS:
        base = family_scheduler(engine.provider, s.scheduler)
        if base is not None:
            listed.append({"name": s.name, "aliases": list(s.aliases), "options": {"t2i_scheduler": base}})
    return listed
