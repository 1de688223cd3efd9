"""SDK overhead: `Engine.generate()` vs the same raw diffusers call, interleaved in one process.

    python benchmarks/bench_overhead.py [--families sd15 sdxl kandinsky22] [--repeats 15] [--steps 10]

For each family with a tiny checkpoint, loads it once through t2i and once with
`AutoPipelineForText2Image`, then alternates SDK and raw calls (same prompt, seed, steps) so that
both see the same machine state. Prints JSON: median seconds of each and the median of the
per-pair SDK/raw ratios (target <= 1.03). Also checks that both made the same image.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from _interleave import compare, machine


def measure(family: str, repeats: int, steps: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoPipelineForText2Image

    from t2i_core import GenerationRequest, T2IError, load

    engine = load(f"tiny:{family}", device="cpu", cache=False)
    raw = AutoPipelineForText2Image.from_pretrained(engine.source)
    raw.set_progress_bar_config(disable=True)
    request = GenerationRequest(
        prompt="Astronaut in a jungle", negative_prompt="ugly", seed=31, num_inference_steps=steps
    )
    try:
        resolved, _ = engine.resolve(request)
    except T2IError:  # FLUX.1 and Z-Image-Turbo take a negative prompt only with their CFG options
        request = GenerationRequest(prompt="Astronaut in a jungle", seed=31, num_inference_steps=steps)
        resolved, _ = engine.resolve(request)
    negative = {} if request.negative_prompt is None else {"negative_prompt": request.negative_prompt}

    def sdk() -> Any:
        return engine.generate(request).images[0]

    def plain() -> Any:
        return raw(
            "Astronaut in a jungle",
            **negative,
            num_inference_steps=steps,
            guidance_scale=resolved.guidance_scale,
            height=resolved.height,
            width=resolved.width,
            generator=torch.Generator("cpu").manual_seed(31),
        ).images[0]

    return {
        "family": family,
        "steps": steps,
        **compare(sdk, plain, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from t2i_core import get_registry

    families = args.families or sorted(get_registry().providers)
    report = {
        **machine(),
        "results": [measure(family, args.repeats, args.steps) for family in families],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
