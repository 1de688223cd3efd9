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

from t2i_core import GenerationRequest, InvalidRequestError

from . import _samplers
from ._a1111_hires import ENGINE_FIELDS, generation_params, hires_of, infotext_params
from ._errors import from_t2i, invalid
from ._samplers import scheduler_for

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
    **ENGINE_FIELDS,
}


#: override_settings (and /sdapi/v1/options) keys t2i honours; every other key is accepted and ignored,
#: named in the answer (``info["t2i"]["ignored_settings"]``)
HONOURED = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
#: the families whose prompts A1111 encodes with its emphasis, and where its clip skip applies
EMPHASIS_FAMILIES = ("sd15", "sdxl")
CLIP_SKIP_FAMILIES = ("sd15",)  # A1111 reads SDXL's penultimate layer whatever CLIP_stop_at_last_layers says


def settings(service: Service, body: Txt2ImgBody) -> dict[str, Any]:
    """The A1111 settings for `body`: the server's (POST /sdapi/v1/options), then its ``override_settings``."""
    return {**service_settings(service), **(body.override_settings or {})}


def service_settings(service: Service) -> dict[str, Any]:
    """The settings POST /sdapi/v1/options stored (the ones t2i honours)."""
    return service.a1111_settings


def ignored_settings(body: Txt2ImgBody) -> list[str]:
    return sorted(key for key in (body.override_settings or {}) if key not in HONOURED)


def clip_stop(service: Service, body: Txt2ImgBody) -> int:
    """``CLIP_stop_at_last_layers`` (1 = the last layer, 2 = the penultimate: "Clip skip 2")."""
    value = settings(service, body).get("CLIP_stop_at_last_layers", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(
            "override_settings.CLIP_stop_at_last_layers",
            f"CLIP_stop_at_last_layers={value!r} is not a layer count",
            "an integer >= 1 (1 = the last layer, 2 = the penultimate)",
        )
    return value


def family_options(service: Service, body: Txt2ImgBody, family: str) -> dict[str, Any]:
    """The t2i family options A1111's settings stand for: ``Clip skip N`` is ``clip_skip=N-1`` on SD 1.x."""
    stop = clip_stop(service, body)
    return {"clip_skip": stop - 1} if stop > 1 and family in CLIP_SKIP_FAMILIES else {}


def prompt_weighting(family: str) -> str | None:
    """A1111's emphasis (``"a1111"``) for SD 1.x and SDXL where an installed plugin offers it."""
    from t2i_core import get_registry

    if family not in EMPHASIS_FAMILIES:
        return None
    conditioners = get_registry().ordered_conditioners()
    offered = any(c.weighting == "a1111" and (c.families is None or family in c.families) for c in conditioners)
    return "a1111" if offered else None


def model_of(service: Service, body: Txt2ImgBody) -> ServedModel:
    """The served model: ``override_settings.sd_model_checkpoint`` (a title or name), else the default."""
    overrides = body.override_settings or {}
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is None:
        return service.model(None)
    name = str(checkpoint).rsplit(" [", 1)[0] if str(checkpoint) not in service.names() else str(checkpoint)
    return service.model(name, field="override_settings.sd_model_checkpoint")


def requests_for(service: Service, body: Txt2ImgBody) -> tuple[ServedModel, list[GenerationRequest]]:
    """The checked, resolved requests of a txt2img call: ``n_iter`` batches of ``batch_size`` images."""
    for flag in ("tiling", "restore_faces"):
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
    _sampler, scheduler = scheduler_for(body, served.checker)
    family = served.engine.family
    options = family_options(service, body, family)
    weighting = prompt_weighting(family)
    seed = secrets.randbelow(2**32) if body.seed == -1 else body.seed
    hires = hires_of(body)
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
                prompt_weighting=weighting,
                options=options,
                hires=hires,
            )
            requests.append(service.check(served, request, FIELDS))
    except InvalidRequestError as exc:
        raise from_t2i(exc, FIELDS) from None
    return served, requests


def model_hash(served: ServedModel) -> str:
    """A stable 10-hex-digit id for a served model, where A1111 sends its file's short SHA-256: here the
    SHA-256 of the model's name and source (a diffusers folder or hub id has no single file to hash)."""
    import hashlib

    return hashlib.sha256(f"{served.name}\n{served.engine.source}".encode()).hexdigest()[:10]


def infotext(body: Txt2ImgBody, job: Job, seed: int, clip: int = 1) -> str:
    """The text AUTOMATIC1111 writes under an image (and into its PNG as ``parameters``); `clip` is
    ``CLIP_stop_at_last_layers`` (`clip_stop`)."""
    first = job.requests[0]
    lines = [body.prompt]
    if body.negative_prompt:
        lines.append(f"Negative prompt: {body.negative_prompt}")
    sampler, schedule_type = _samplers.label(body)
    schedule = "" if schedule_type == _samplers.AUTOMATIC.label else f"Schedule type: {schedule_type}, "
    clip_text = f"Clip skip: {clip}, " if clip > 1 else ""
    lines.append(
        f"Steps: {first.num_inference_steps}, Sampler: {sampler}, {schedule}CFG scale: {first.guidance_scale:g}, "
        f"Seed: {seed}, Size: {first.width}x{first.height}, Model hash: {model_hash(job.model)}, "
        f"Model: {job.model.name}, {infotext_params({**generation_params(body, first.hires), **lora_params(job)})}"
        f"{clip_text}"
        f"Version: {VERSION}"
    )
    return "\n".join(lines)


def lora_params(job: Job) -> dict[str, Any]:
    """A1111's ``Lora hashes`` for the LoRAs the prompt's tags named: ``name: <the first 12 hex digits of the
    file's SHA-256>``, comma-separated (what sites that read infotexts match LoRAs by)."""
    from pathlib import Path

    from t2i_core.kit import file_digest

    loras = job.results[0].prompt_loras if job.results else ()
    if not loras:
        return {}
    return {"Lora hashes": ", ".join(f"{Path(lora.source).stem}: {file_digest(lora.source)[:12]}" for lora in loras)}


def all_seeds(job: Job) -> list[int]:
    return [request.seed + k for request in job.requests if request.seed is not None for k in range(request.num_images)]


def info(body: Txt2ImgBody, job: Job, clip: int = 1) -> dict[str, Any]:
    """The ``info`` AUTOMATIC1111 returns (as a JSON string) with a txt2img call's images, with its types
    (A1111's ``Processed.js()``); t2i's own notes under ``"t2i"``."""
    first = job.requests[0]
    seeds = all_seeds(job)
    count = len(seeds)
    sampler, schedule_type = _samplers.label(body)
    extra: dict[str, Any] = {}
    if schedule_type != _samplers.AUTOMATIC.label:
        extra["Schedule type"] = schedule_type
    extra.update(generation_params(body, first.hires))
    extra.update(lora_params(job))
    if clip > 1:
        extra["Clip skip"] = clip
    notes: dict[str, Any] = {"job": job.id, "status": job.status, "model": job.model.name}
    notes["family"] = job.model.engine.family
    notes.update(scheduler=first.scheduler, prompt_weighting=first.prompt_weighting, options=dict(first.options))
    ignored = ignored_settings(body)
    if ignored:
        notes["ignored_settings"] = ignored
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
        "sampler_name": sampler,
        "cfg_scale": first.guidance_scale,
        "steps": first.num_inference_steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.model.name,
        "sd_model_hash": model_hash(job.model),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.hires.strength if first.hires is not None else None,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": [infotext(body, job, seed, clip) for seed in seeds[: len(job.images)]],
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": clip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "t2i": notes,
    }


def response(body: Txt2ImgBody, job: Job, images: list[str], clip: int = 1) -> dict[str, Any]:
    return {
        "images": images if body.send_images else [],
        "parameters": body.model_dump(),
        "info": json.dumps(info(body, job, clip)),
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
        for name in service.names()  # loaded or not: selecting one loads it
    ]


def loras(service: Service) -> list[dict[str, Any]]:
    """``/sdapi/v1/loras``: the ``.safetensors`` files of the LoRA folders, each under a `name` that a
    ``<lora:NAME:WEIGHT>`` tag finds it by (its file name; for a name found before, its path in its
    folder); `path` is that path, never the server's folder, and `metadata` the file's own
    (safetensors ``__metadata__``, a trainer's settings)."""
    from t2i_core.kit import folder_files

    listed, names = [], set()
    for each in folder_files(_default_engine(service).lora_dirs):
        name = each.name if each.name not in names else each.relative.removesuffix(".safetensors")
        names.add(name)
        listed.append({"name": name, "alias": name, "path": each.relative, "metadata": _file_metadata(each.path)})
    return listed


def embeddings(service: Service) -> dict[str, Any]:
    """``/sdapi/v1/embeddings``: the embedding folders' files by the word that uses them, as A1111 lists
    them: ``loaded`` those whose width fits a text encoder of the default model, ``skipped`` the others."""
    from t2i_core.kit import folder_files

    engine = _default_engine(service)
    widths = {
        int(getattr(getattr(encoder, "config", None), "hidden_size", 0))
        for encoder in (getattr(engine.pipeline, name, None) for name in ("text_encoder", "text_encoder_2"))
        if encoder is not None
    }
    answer: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
    for each in folder_files(engine.embedding_dirs, field="embedding_dirs"):
        if each.name in answer["loaded"] or each.name in answer["skipped"]:
            continue  # a prompt word uses the first file of that name
        vectors, width = _embedding_shape(each.path)
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": vectors}
        answer["loaded" if width in widths else "skipped"][each.name] = entry
    return answer


def _default_engine(service: Service) -> Any:
    return service.model(None).engine


def _file_metadata(path: Any) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - a file that is not safetensors: nothing to list (a request names it)
        return {}


def _embedding_shape(path: Any) -> tuple[int, int]:
    """(vectors, width) of an embedding file: its widest tensor (SDXL files hold one per text encoder)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = [tuple(handle.get_slice(key).get_shape()) for key in handle.keys()]
    except Exception:  # noqa: BLE001 - not safetensors: listed as skipped, with no vectors
        return 0, 0
    shapes = [shape for shape in shapes if shape]
    if not shapes:
        return 0, 0
    widest = max(shapes, key=lambda shape: shape[-1])
    return (widest[0] if len(widest) > 1 else 1), widest[-1]


def samplers(service: Service) -> list[dict[str, Any]]:
    """The samplers the default model's family runs."""
    return _samplers.samplers(service.model(None).checker)


def schedulers(service: Service) -> list[dict[str, Any]]:
    """The schedule types the default model runs with at least one sampler."""
    return _samplers.schedulers(service.model(None).checker)


def options(service: Service) -> dict[str, Any]:
    stored = service_settings(service)
    return {
        "sd_model_checkpoint": service.default_model,
        "sd_checkpoint_hash": model_hash(service.model(None)),
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": stored.get("CLIP_stop_at_last_layers", 1),
        "eta_noise_seed_delta": 0,
        "enable_pnginfo": True,
        "live_previews_enable": False,
        "return_grid": False,
    }


def set_options(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """POST /sdapi/v1/options: ``sd_model_checkpoint`` switches the default model among the served ones,
    ``CLIP_stop_at_last_layers`` applies to later calls; every other key is accepted, ignored and named."""
    updates: dict[str, Any] = {}
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None:
        name = str(checkpoint) if str(checkpoint) in service.names() else str(checkpoint).rsplit(" [", 1)[0]
        updates["default_model"] = service.model(name, field="sd_model_checkpoint").name
    if "CLIP_stop_at_last_layers" in body:
        stop = body["CLIP_stop_at_last_layers"]
        if isinstance(stop, bool) or not isinstance(stop, int) or stop < 1:
            raise invalid(
                "CLIP_stop_at_last_layers",
                f"CLIP_stop_at_last_layers={stop!r} is not a layer count",
                "an integer >= 1 (1 = the last layer, 2 = the penultimate)",
            )
        updates["CLIP_stop_at_last_layers"] = stop
    if "default_model" in updates:
        service.default_model = updates["default_model"]
    if "CLIP_stop_at_last_layers" in updates:
        service.a1111_settings["CLIP_stop_at_last_layers"] = updates["CLIP_stop_at_last_layers"]
    ignored = sorted(key for key in body if key not in HONOURED)
    return {"t2i": {"applied": sorted(key for key in body if key in HONOURED), "ignored_settings": ignored}}


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
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(timestamp)) if timestamp else "0"
    return {
        "skipped": False,
        "interrupted": interrupted,
        "stopping_generation": False,
        "job_timestamp": stamp,
        **fields,
    }
