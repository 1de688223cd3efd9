"""AUTOMATIC1111's hires fix fields (``enable_hr``, ``hr_scale``, ``hr_upscaler``...) as a `HiresFix`, and back
into its ``info``.

A1111 runs the second pass as img2img at the enlarged size; t2i does the same (`t2i_core.HiresFix`).
Its latent upscalers ``Latent`` and ``Latent (nearest-exact)`` and the ``Lanczos`` image upscaler
are t2i's ``latent``, ``latent-nearest`` and ``lanczos``; the others (ESRGAN and the like, which
need their own weights, ``None``, and the antialiased and bicubic latent modes) are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from t2i_core import HiresFix, InvalidRequestError

from ._errors import invalid

if TYPE_CHECKING:
    from ._schemas import Txt2ImgBody

#: A1111 upscaler names → t2i's `HiresFix.upscaler`
UPSCALERS = {"Latent": "latent", "Latent (nearest-exact)": "latent-nearest", "Lanczos": "lanczos"}
#: A1111's upscaler when the body names none (its ``upscaler_for_img2img`` / latent default mode)
DEFAULT_UPSCALER = "Latent"
#: A1111's ``denoising_strength`` default for txt2img (``StableDiffusionProcessingTxt2Img``)
DEFAULT_STRENGTH = 0.75
#: `HiresFix` fields as A1111 names them (for errors)
FIELDS = {
    "scale": "hr_scale",
    "upscaler": "hr_upscaler",
    "strength": "denoising_strength",
    "steps": "hr_second_pass_steps",
    "width": "hr_resize_x",
    "height": "hr_resize_y",
    "prompt": "hr_prompt",
    "negative_prompt": "hr_negative_prompt",
}

#: the engine's names of hires fields in its errors, as A1111 names them
ENGINE_FIELDS = {f"hires.{name}": a1111 for name, a1111 in FIELDS.items()}


def hires_of(body: Txt2ImgBody) -> HiresFix | None:
    """The `HiresFix` of a txt2img body; None unless ``enable_hr``.

    ``hr_resize_x``/``hr_resize_y`` of 0 (A1111's "use hr_scale") are unset, other sizes are
    rounded down to multiples of 8 (A1111's image has the size of its latents, 8 pixels each);
    ``hr_second_pass_steps`` 0 and empty ``hr_prompt``/``hr_negative_prompt`` mean "the same".
    """
    if not body.enable_hr:
        return None
    name = body.hr_upscaler or DEFAULT_UPSCALER
    if name not in UPSCALERS:
        allowed = ", ".join(repr(each) for each in UPSCALERS)
        raise invalid("hr_upscaler", f"hr_upscaler={name!r} is not an upscaler t2i serve runs", f"one of {allowed}")
    strength = DEFAULT_STRENGTH if body.denoising_strength is None else body.denoising_strength
    try:
        return HiresFix(
            scale=body.hr_scale,
            upscaler=UPSCALERS[name],
            strength=strength,
            steps=body.hr_second_pass_steps or None,
            width=body.hr_resize_x // 8 * 8 if body.hr_resize_x else None,
            height=body.hr_resize_y // 8 * 8 if body.hr_resize_y else None,
            prompt=body.hr_prompt or None,
            negative_prompt=body.hr_negative_prompt or None,
        )
    except InvalidRequestError as exc:
        field = FIELDS.get(exc.field, exc.field)
        raise invalid(field, f"{field}={exc.value!r} is not allowed: expected {exc.allowed}", exc.allowed) from None


def generation_params(body: Txt2ImgBody, hires: HiresFix | None) -> dict[str, Any]:
    """A1111's ``extra_generation_params`` for the hires fix (in its order), or nothing without it."""
    if hires is None:
        return {}
    params: dict[str, Any] = {"Denoising strength": hires.strength}
    if hires.width is None and hires.height is None:
        params["Hires upscale"] = hires.scale
    else:
        params["Hires resize"] = f"{body.hr_resize_x}x{body.hr_resize_y}"
    if hires.steps:
        params["Hires steps"] = hires.steps
    params["Hires upscaler"] = body.hr_upscaler or DEFAULT_UPSCALER
    if hires.prompt is not None:
        params["Hires prompt"] = hires.prompt
    if hires.negative_prompt is not None:
        params["Hires negative prompt"] = hires.negative_prompt
    return params


def infotext_params(params: dict[str, Any]) -> str:
    """`generation_params` as A1111 writes them into the infotext: ``Denoising strength: 0.7, Hires upscale: 2, ``."""
    return "".join(f"{key}: {_text(value)}, " for key, value in params.items())


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return f'"{text}"' if any(mark in text for mark in ',:"\n') else text
