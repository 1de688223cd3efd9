"""ControlNet overhead: `Engine.generate()` with one control vs the raw diffusers ControlNet call.

    python benchmarks/bench_controlnet.py [--repeats 15] [--steps 10] [--image-size 96x80]

Loads tiny SD1.5 through t2i, and by hand as `StableDiffusionControlNetPipeline` with
`tiny:controlnet-sd15`'s weights. Both get the same PIL control image, of a size other than the
output's, so both resize it (t2i checks and sizes it itself; diffusers then finds it sized).
SDK and raw calls alternate (the order flips each round) so that both see the same machine
state. Prints JSON: median seconds of each and the median of the per-pair SDK/raw ratios
(target <= 1.03). Also checks that both made the same image.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from _interleave import compare, machine

PROMPT = "a chef in the kitchen, best quality"
NEGATIVE = "blurry, deformed"


def control_image(width: int, height: int) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(image)
    draw.line((width // 2, height // 5, width // 2, 3 * height // 5), fill=(255, 0, 0), width=3)
    draw.line((width // 4, height // 3, 3 * width // 4, height // 3), fill=(0, 255, 0), width=3)
    draw.ellipse((width // 2 - 6, height // 10, width // 2 + 6, height // 10 + 12), fill=(0, 0, 255))
    return image


def measure(repeats: int, steps: int, image_size: tuple[int, int]) -> dict[str, Any]:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from t2i_controlnet import tiny_controlnet_folder

    from t2i_core import Control, GenerationRequest, load

    engine = load("tiny:sd15", device="cpu", cache=False)
    raw = StableDiffusionControlNetPipeline.from_pretrained(
        engine.source, controlnet=ControlNetModel.from_pretrained(tiny_controlnet_folder("sd15"))
    )
    raw.set_progress_bar_config(disable=True)
    image = control_image(*image_size)
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=31,
        num_inference_steps=steps,
        controls=(Control(image=image, model="tiny:controlnet-sd15", scale=0.8),),
    )
    resolved, _ = engine.resolve(request)

    def sdk() -> Any:
        return engine.generate(request).images[0]

    def plain() -> Any:
        return raw(
            PROMPT,
            image=image,
            negative_prompt=NEGATIVE,
            controlnet_conditioning_scale=0.8,
            num_inference_steps=steps,
            guidance_scale=resolved.guidance_scale,
            height=resolved.height,
            width=resolved.width,
            generator=torch.Generator("cpu").manual_seed(31),
        ).images[0]

    return {
        "family": "sd15",
        "controlnet": "tiny:controlnet-sd15",
        "control_image": f"{image_size[0]}x{image_size[1]} -> {resolved.width}x{resolved.height}",
        "steps": steps,
        **compare(sdk, plain, repeats),
    }


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-size", type=_size, default=(96, 80), metavar="WxH")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    report = {
        **machine(),
        "results": [measure(args.repeats, args.steps, args.image_size)],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
