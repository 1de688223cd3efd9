"""Request bodies, as pydantic models: FastAPI checks their types and publishes them in /openapi.json.

The values themselves (multiples of 8, ranges, schedulers) are checked by `GenerationRequest`
and the engine, whose errors name the field; these models only keep out what is not JSON of the
right type, and (native API) any field that is not one of the request's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ControlBody(BaseModel):
    """One ControlNet control: an image, sent inline, and a ControlNet the server serves."""

    model_config = ConfigDict(strict=True, extra="forbid")

    image: str = Field(description="the control image, base64 PNG or JPEG (a data: URL is fine)")
    model: str = Field(description="a ControlNet named at start-up (t2i serve --controlnet)")
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = Field(None, description='a weight-free preprocessing, e.g. "canny"')
    guess_mode: bool = False


class ImagePromptBody(BaseModel):
    """One image prompt (IP-Adapter): a reference image, sent inline, and an IP-Adapter the server serves."""

    model_config = ConfigDict(strict=True, extra="forbid")

    image: str = Field(description="the reference image, base64 PNG, JPEG or WebP (a data: URL is fine); never a path")
    model: str = Field(description="an IP-Adapter named at start-up (t2i serve --ip-adapter)")
    scale: float = Field(1.0, description="how strongly the image steers, in [0, 10]; 0 = the plain image")


class HiresBody(BaseModel):
    """`t2i_core.HiresFix`: a second, larger pass over the image (docs/hires-fix.md)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    scale: float = Field(2.0, description="how much larger, in [1, 8]; ignored when width and height are given")
    upscaler: str = Field("latent", description="latent, latent-nearest or lanczos")
    strength: float = Field(0.55, description="the fraction of the schedule the second pass runs again, in (0, 1]")
    steps: int | None = Field(None, description="steps of the second pass's schedule; default: the first pass's")
    width: int | None = Field(None, description="the final width, a multiple of 8; default: width x scale")
    height: int | None = Field(None, description="the final height, a multiple of 8; default: height x scale")
    prompt: str | None = Field(None, description="the second pass's prompt; default: the prompt")
    negative_prompt: str | None = Field(None, description="the second pass's negative prompt; default: the same")


class GenerationBody(BaseModel):
    """`t2i_core.GenerationRequest`'s fields, plus the served model to run them on."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="a served model's name (GET /v1/models); default: the first one")
    prompt: str
    negative_prompt: str | None = None
    height: int | None = Field(None, description="a multiple of 8; default: the model's native size")
    width: int | None = Field(None, description="a multiple of 8; default: the model's native size")
    num_inference_steps: int | None = Field(None, description="default: the family's")
    guidance_scale: float | None = Field(None, description="default: the family's")
    seed: int | None = Field(None, description="image i uses seed + i; default: a random seed, reported back")
    num_images: int = 1
    prompt_weighting: str | None = Field(None, description='"compel" where t2i-compel is installed')
    scheduler: str | None = Field(None, description="default, ddim, euler, euler-ancestral, dpm++-2m, ...")
    options: dict[str, Any] = Field(default_factory=dict, description="family options (docs/families/options.md)")
    controls: list[ControlBody] = Field(default_factory=list)
    image_prompts: list[ImagePromptBody] = Field(default_factory=list)
    hires: HiresBody | None = Field(None, description="a hires fix (a second, larger pass); default: none")
    priority: int | None = Field(None, description="0 (low), 1 (normal, the default) or 2 (high): higher runs first")
    webhook: str | None = Field(
        None, description="an http(s) URL POSTed the job's JSON when it ends, signed (t2i serve --webhook-secret)"
    )
    max_queue_seconds: float | None = Field(
        None, description="seconds the job may wait in the queue; past them it ends as expired without running"
    )


#: `GenerationBody` fields that say how the job is queued and reported, not what it makes
JOB_FIELDS = frozenset({"priority", "webhook", "max_queue_seconds"})


class Txt2ImgBody(BaseModel):
    """AUTOMATIC1111's ``StableDiffusionProcessingTxt2Img`` request: the fields t2i reads.

    Other fields are ignored, as AUTOMATIC1111 ignores fields it does not know; omitted size,
    steps and CFG scale take the model's defaults.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = Field(None, description='"Latent" (default), "Latent (nearest-exact)" or "Lanczos"')
    hr_second_pass_steps: int = Field(0, description="0: the first pass's steps")
    hr_resize_x: int = Field(0, description="0: width x hr_scale")
    hr_resize_y: int = Field(0, description="0: height x hr_scale")
    hr_prompt: str = Field("", description='"": the prompt')
    hr_negative_prompt: str = Field("", description='"": the negative prompt')
    denoising_strength: float | None = Field(None, description="the hires pass's strength; default 0.75")
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
