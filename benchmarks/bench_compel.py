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
from typing import Any

from _interleave import compare, machine

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
    texts = {"prompt": PROMPT.format(0), "negative": NEGATIVE.format(0)}

    def next_prompts(index: int) -> None:  # fresh prompts each round: no parse cache helps the SDK
        texts.update(prompt=PROMPT.format(index), negative=NEGATIVE.format(index))

    def sdk() -> Any:
        return engine.generate(request.evolve(prompt=texts["prompt"], negative_prompt=texts["negative"])).images[0]

    def by_hand() -> Any:
        embeds, negative_embeds = compel.pad_conditioning_tensors_to_same_length(
            [compel(texts["prompt"]), compel(texts["negative"])]
        )
        return raw(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=steps,
            guidance_scale=resolved.guidance_scale,
            height=resolved.height,
            width=resolved.width,
            generator=torch.Generator("cpu").manual_seed(31),
        ).images[0]

    return {
        "family": "sd15",
        "prompt_weighting": "compel",
        "steps": steps,
        **compare(sdk, by_hand, repeats, before_round=next_prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    report = {
        **machine(),
        "results": [measure(args.repeats, args.steps)],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
