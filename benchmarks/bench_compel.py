"""Compel overhead: `Engine.generate()` with ``prompt_weighting="compel"`` vs the raw diffusers call.

    python benchmarks/bench_compel.py [--repeats 15] [--steps 10]

Loads tiny SD1.5 once through t2i and once with `AutoPipelineForText2Image`. The raw side does
what a user of compel writes: one `Compel` for the pipeline, then for every image the prompt and
negative embeddings, padded to one length, passed as ``prompt_embeds``/``negative_prompt_embeds``.
SDK and raw calls alternate (the order flips each round) so that both see the same machine
state; each round has prompts of its own, so that the SDK's parse cache never helps it. Prints
JSON: median seconds of each and the median of the per-pair SDK/raw ratios (target <= 1.03).
Also checks that both made the same image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

PROMPT = "a red cat playing with a (ball)1.5, (jungle)0.8 background, detailed++, take {}"
NEGATIVE = "(blurry)1.3, ugly, deformed--, take {}"


def measure(repeats: int, steps: int) -> dict[str, Any]:
    import torch
    from compel import Compel
    from diffusers import AutoPipelineForText2Image

    from t2i_core import GenerationRequest, load

    engine = load("tiny:sd15", device="cpu", cache=False)
    raw = AutoPipelineForText2Image.from_pretrained(engine.source)
    raw.set_progress_bar_config(disable=True)
    request = GenerationRequest(
        prompt=PROMPT.format(0),
        negative_prompt=NEGATIVE.format(0),
        prompt_weighting="compel",
        seed=31,
        num_inference_steps=steps,
    )
    resolved, _ = engine.resolve(request)
    compel = Compel(tokenizer=raw.tokenizer, text_encoder=raw.text_encoder)
    prompt, negative = request.prompt, request.negative_prompt

    def sdk() -> Any:
        return engine.generate(request.evolve(prompt=prompt, negative_prompt=negative)).images[0]

    def by_hand() -> Any:
        embeds, negative_embeds = compel.pad_conditioning_tensors_to_same_length([compel(prompt), compel(negative)])
        return raw(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=steps,
            guidance_scale=resolved.guidance_scale,
            height=resolved.height,
            width=resolved.width,
            generator=torch.Generator("cpu").manual_seed(31),
        ).images[0]

    same = np.array_equal(np.asarray(sdk()), np.asarray(by_hand()))  # also the warm-up
    sdk_times, raw_times, ratios = [], [], []
    for index in range(1, repeats + 1):
        prompt, negative = PROMPT.format(index), NEGATIVE.format(index)
        order = (sdk, by_hand) if index % 2 == 0 else (by_hand, sdk)
        timings = {}
        for run in order:
            start = time.perf_counter()
            run()
            timings[run] = time.perf_counter() - start
        sdk_times.append(timings[sdk])
        raw_times.append(timings[by_hand])
        ratios.append(timings[sdk] / timings[by_hand])
    return {
        "family": "sd15",
        "prompt_weighting": "compel",
        "steps": steps,
        "repeats": repeats,
        "identical_images": bool(same),
        "sdk_median_s": round(statistics.median(sdk_times), 4),
        "raw_median_s": round(statistics.median(raw_times), 4),
        "median_ratio_sdk_over_raw": round(statistics.median(ratios), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    report = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "results": [measure(args.repeats, args.steps)],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
