"""AUTOMATIC1111's API, translated: samplers to t2i schedulers, a txt2img body to requests, and its ``info``.

A txt2img call becomes one job of ``n_iter`` requests of ``batch_size`` images each; request
``i`` starts from seed ``seed + i * batch_size``, so image ``k`` of the call has seed ``seed + k``
exactly as AUTOMATIC1111 numbers them (``all_seeds``).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import GenerationRequest, InvalidRequestError

from ._errors import from_t2i, invalid

if TYPE_CHECKING:
    from ._jobs import Job, ServedModel, Service
    from ._schemas import Txt2ImgBody

VERSION = "t2i-server 0.1.0"
#: t2i's request fields, as AUTOMATIC1111 calls them (for errors)
FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "scheduler": "sampler_name",
    "height x width": "height",
}


@attrs.frozen
class Sampler:
    """An AUTOMATIC1111 sampler and the t2i scheduler that runs the same algorithm."""

    name: str
    aliases: tuple[str, ...]
    scheduler: str
    #: the t2i scheduler for AUTOMATIC1111's ``scheduler: "karras"`` (None: no Karras variant)
    karras: str | None = None


SAMPLERS = (
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler-ancestral"),
    Sampler("Euler", ("k_euler",), "euler"),
    Sampler("LMS", ("k_lms",), "lms"),
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpm++-2m", karras="dpm++-2m-karras"),
    Sampler("DPM++ 2M Karras", ("k_dpmpp_2m_ka",), "dpm++-2m-karras", karras="dpm++-2m-karras"),
    Sampler("DDIM", ("ddim",), "ddim"),
    Sampler("DDPM", ("ddpm",), "ddpm"),
    Sampler("PLMS", ("plms",), "pndm"),
    Sampler("UniPC", ("unipc",), "unipc"),
)
#: AUTOMATIC1111's ``scheduler`` values t2i honours ("automatic" = the sampler's own schedule)
SCHEDULES = ("automatic", "karras")


def sampler(name: str | None) -> Sampler | None:
    """The sampler AUTOMATIC1111 would pick for `name` (case-insensitive, aliases too); None = the model's own."""
    if name is None or not name.strip():
        return None
    wanted = name.strip().lower()
    for each in SAMPLERS:
        if wanted == each.name.lower() or wanted in each.aliases:
            return each
    allowed = ", ".join(repr(s.name) for s in SAMPLERS)
    raise invalid("sampler_name", f"sampler_name={name!r} is not a sampler t2i runs", f"one of {allowed}")


#: t2i's schedulers of a flow-matching family stand for AUTOMATIC1111's by this prefix: "Euler" is
#: ``flow-euler`` there (Flux, SD3, Z-Image), "Euler" with the Karras schedule ``flow-euler-karras``
FLOW_PREFIX = "flow-"


def family_scheduler(provider: Any, scheduler: str) -> str | None:
    """The scheduler of `provider`'s family that runs t2i scheduler `scheduler` (``euler``): itself when the
    family runs it, else its flow-matching counterpart (``flow-euler``); None when the family has neither."""
    own = provider.named_schedulers or {}
    if scheduler in own or provider.schedulers is None or scheduler in provider.schedulers:
        return scheduler
    flow = f"{FLOW_PREFIX}{scheduler}"
    return flow if flow in own else None


def runs(provider: Any, each: Sampler) -> bool:
    """Whether `provider`'s family runs AUTOMATIC1111 sampler `each` (as itself or its flow-matching form)."""
    return family_scheduler(provider, each.scheduler) is not None


def scheduler_for(body: Txt2ImgBody, provider: Any = None) -> tuple[Sampler | None, str | None]:
    """The sampler and t2i scheduler for `body`'s ``sampler_name`` (or ``sampler_index``) and ``scheduler``,
    for the family of `provider` (None: as named, unchecked): a flow-matching family (Flux, SD3, Z-Image)
    runs "Euler" as its flow-matching Euler and refuses the samplers it has no form of, naming the pair."""
    chosen, scheduler = _scheduler_for(body)
    if provider is None or chosen is None or scheduler is None:
        return chosen, scheduler
    mapped = family_scheduler(provider, scheduler)
    if mapped is None:
        served = [each.name for each in SAMPLERS if runs(provider, each)]
        schedule = " with scheduler='karras'" if scheduler != chosen.scheduler else ""
        raise invalid(
            "sampler_name",
            f"sampler_name={chosen.name!r}{schedule} is not available for family {provider.name!r}",
            "one of " + (", ".join(repr(name) for name in served) or "none (leave sampler_name empty)"),
        )
    return chosen, mapped


def _scheduler_for(body: Txt2ImgBody) -> tuple[Sampler | None, str | None]:
    chosen = sampler(body.sampler_name or body.sampler_index)
    schedule = (body.scheduler or "automatic").strip().lower()
    if schedule not in SCHEDULES:
        raise invalid("scheduler", f"scheduler={body.scheduler!r} is not a schedule t2i runs", "automatic or karras")
    if chosen is None:
        if schedule == "karras":
            raise invalid("scheduler", "scheduler='karras' needs a sampler_name", "automatic without sampler_name")
        return None, None
    if schedule == "karras":
        if chosen.karras is None:
            raise invalid(
                "scheduler",
                f"scheduler='karras' is not available with sampler_name={chosen.name!r}",
                "automatic, or karras with DPM++ 2M",
            )
        return chosen, chosen.karras
    return chosen, chosen.scheduler


def model_of(service: Service, body: Txt2ImgBody) -> ServedModel:
    """The served model: ``override_settings.sd_model_checkpoint`` (a title or name), else the default."""
    settings = body.override_settings or {}
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint is None:
        return service.model(None)
    name = str(checkpoint).rsplit(" [", 1)[0] if str(checkpoint) not in service.models else str(checkpoint)
    return service.model(name, field="override_settings.sd_model_checkpoint")


def requests_for(service: Service, body: Txt2ImgBody) -> tuple[ServedModel, list[GenerationRequest]]:
    """The checked, resolved requests of a txt2img call: ``n_iter`` batches of ``batch_size`` images."""
    for flag in ("enable_hr", "tiling", "restore_faces"):
        if getattr(body, flag):
            raise invalid(flag, f"{flag}=true is not supported by t2i serve", "false")
    if body.subseed_strength:
        raise invalid("subseed_strength", "variation seeds are not supported by t2i serve", "0")
    if body.script_name or body.alwayson_scripts:
        field = "script_name" if body.script_name else "alwayson_scripts"
        raise invalid(field, "scripts and extensions are not supported by t2i serve", "none")
    for field in ("batch_size", "n_iter"):
        if getattr(body, field) < 1:
            raise invalid(field, f"{field}={getattr(body, field)} is not allowed", "an integer >= 1")
    total = body.batch_size * body.n_iter
    if total > service.limits.max_images:
        raise invalid(
            "batch_size",
            f"batch_size x n_iter = {total} images is more than this server makes per request",
            f"batch_size x n_iter at most {service.limits.max_images}",
        )
    served = model_of(service, body)
    _sampler, scheduler = scheduler_for(body, served.engine.provider)
    seed = secrets.randbelow(2**32) if body.seed == -1 else body.seed
    requests = []
    try:
        for index in range(body.n_iter):
            request = GenerationRequest(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt or None,
                height=body.height,
                width=body.width,
                num_inference_steps=body.steps,
                guidance_scale=body.cfg_scale,
                seed=seed + index * body.batch_size,
                num_images=body.batch_size,
                scheduler=scheduler,
            )
            requests.append(service.check(served, request, FIELDS))
    except InvalidRequestError as exc:
        raise from_t2i(exc, FIELDS) from None
    return served, requests


def _sampler_label(body: Txt2ImgBody) -> str:
    chosen, scheduler = _scheduler_for(body)
    if chosen is None:
        return "Default"
    karras = scheduler == chosen.karras and scheduler != chosen.scheduler
    return f"{chosen.name} Karras" if karras and "Karras" not in chosen.name else chosen.name


def infotext(body: Txt2ImgBody, job: Job, seed: int) -> str:
    """The text AUTOMATIC1111 writes under an image (and into its PNG as ``parameters``)."""
    first = job.requests[0]
    lines = [body.prompt]
    if body.negative_prompt:
        lines.append(f"Negative prompt: {body.negative_prompt}")
    lines.append(
        f"Steps: {first.num_inference_steps}, Sampler: {_sampler_label(body)}, CFG scale: {first.guidance_scale:g}, "
        f"Seed: {seed}, Size: {first.width}x{first.height}, Model: {job.model.name}, Version: {VERSION}"
    )
    return "\n".join(lines)


def all_seeds(job: Job) -> list[int]:
    return [request.seed + k for request in job.requests if request.seed is not None for k in range(request.num_images)]


def info(body: Txt2ImgBody, job: Job) -> dict[str, Any]:
    """The ``info`` AUTOMATIC1111 returns (as a JSON string) with a txt2img call's images."""
    first = job.requests[0]
    seeds = all_seeds(job)
    count = len(seeds)
    return {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * count,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": _sampler_label(body),
        "cfg_scale": first.guidance_scale,
        "steps": first.num_inference_steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.model.name,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": {"t2i scheduler": first.scheduler},
        "index_of_first_image": 0,
        "infotexts": [infotext(body, job, seed) for seed in seeds[: len(job.images)]],
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "t2i": {"job": job.id, "status": job.status, "model": job.model.name, "family": job.model.engine.family},
    }


def response(body: Txt2ImgBody, job: Job, images: list[str]) -> dict[str, Any]:
    return {
        "images": images if body.send_images else [],
        "parameters": body.model_dump(),
        "info": json.dumps(info(body, job)),
    }


def sd_models(service: Service) -> list[dict[str, Any]]:
    return [
        {
            "title": name,
            "model_name": name,
            "hash": None,
            "sha256": None,
            "filename": name,  # never a path on the server
            "config": None,
        }
        for name in service.models
    ]


def samplers(service: Service) -> list[dict[str, Any]]:
    """The samplers the default model's family runs."""
    provider = service.models[service.default_model].engine.provider
    return [
        {
            "name": s.name,
            "aliases": list(s.aliases),
            "options": {"t2i_scheduler": family_scheduler(provider, s.scheduler)},
        }
        for s in SAMPLERS
        if runs(provider, s)
    ]


def options(service: Service) -> dict[str, Any]:
    return {
        "sd_model_checkpoint": service.default_model,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "enable_pnginfo": True,
        "live_previews_enable": False,
        "return_grid": False,
    }


def progress(service: Service) -> dict[str, Any]:
    """``/sdapi/v1/progress``: the running job (the first device's, with several), as AUTOMATIC1111 reports it."""
    running = service.running()
    queued = sum(len(worker) for worker in service.workers.values())
    if not running:
        state = {"job": "", "job_count": queued, "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": _state(state), "current_image": None, "textinfo": None}
    job = running[0]
    fraction = job.step / job.total if job.total else 0.0
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    per_request = job.total // max(len(job.requests), 1)
    state = {
        "job": job.id,
        "job_count": len(running) + queued,
        "job_no": min(job.step // per_request, len(job.requests) - 1) if per_request else 0,
        "sampling_step": job.step % per_request if per_request else 0,
        "sampling_steps": per_request,
    }
    preview = job.latest_preview["image"] if job.latest_preview else None
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(eta, 3),
        "state": _state(state, interrupted=job.cancelling, timestamp=job.created),
        "current_image": preview,
        "textinfo": None,
    }


def _state(fields: dict[str, Any], *, interrupted: bool = False, timestamp: float | None = None) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(timestamp)) if timestamp else 0
    return {
        "skipped": False,
        "interrupted": interrupted,
        "stopping_generation": False,
        "job_timestamp": stamp,
        **fields,
    }
