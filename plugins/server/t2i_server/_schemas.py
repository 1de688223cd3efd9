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
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
