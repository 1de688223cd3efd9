"""LoRA switching and fusing on tiny SD 1.5, t2i and raw diffusers side by side.

    python benchmarks/bench_lora.py [--repeats 9] [--steps 10] [--output results/cpu-lora.json]

Three LoRAs (rank 8, UNet and text encoder, `t2i_lora.tiny`) for the tiny SD 1.5 checkpoint.

- **switch**: requests alternating between LoRA A and LoRA B (same rank and layers, so the
  same compute), against LoRA A on every request: the difference is the cost of a switch. t2i
  (one engine, each file loaded once) beside raw diffusers (one pipeline, both adapters loaded,
  ``set_adapters`` before each call), beside reloading the LoRA for each request (raw
  ``unload_lora_weights`` + ``load_lora_weights``), and beside reloading the whole pipeline and
  the LoRA for each request (a script without adapter management).
- **fuse**: the same three LoRAs active on every request, unfused (t2i's plain engine; raw
  diffusers with ``set_adapters``) against fused (t2i's ``fuse_lora`` accelerator; raw
  diffusers' ``fuse_lora``), and the base model without LoRAs for reference. The largest pixel
  difference between fused and unfused images is reported (different rounding).

Rounds interleave the variants, the order turning each round, so that all see the same
machine state. Prints JSON (and writes it to --output): median seconds per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _interleave import machine


def interleave(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each variant over `repeats` rounds (after one warm-up round), order turning."""
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values), 4) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: the point

    import torch
    from diffusers import AutoPipelineForText2Image
    from t2i_lora import tiny

    from t2i_core import GenerationRequest, Lora, load

    base = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    folder = base.source
    work = Path(tempfile.mkdtemp(prefix="t2i-bench-lora-"))
    files = [
        tiny.lora_file(folder, work / f"{name}.safetensors", seed=seed, rank=8, text_encoders=True)
        for seed, name in enumerate("abc")
    ]
    a, b, c = (str(path) for path in files)
    steps = args.steps

    def request(pairs: tuple[tuple[str, float], ...]) -> GenerationRequest:
        loras = tuple(Lora(path, scale) for path, scale in pairs)
        return GenerationRequest(prompt="a lighthouse", seed=7, num_inference_steps=steps, loras=loras)

    def raw_pipeline() -> Any:
        pipeline = AutoPipelineForText2Image.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def raw_call(pipeline: Any) -> Any:
        generator = torch.Generator("cpu").manual_seed(7)
        return pipeline("a lighthouse", num_inference_steps=steps, generator=generator).images[0]

    names = {a: "a", b: "b", c: "c"}

    def raw_activate(pipeline: Any, pairs: tuple[tuple[str, float], ...]) -> None:
        if pairs:
            pipeline.enable_lora()
            pipeline.set_adapters([names[p] for p, _ in pairs], adapter_weights=[s for _, s in pairs])
        else:
            pipeline.disable_lora()

    # -- switch ---------------------------------------------------------------------------
    engine = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    same_engine = load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    raw = raw_pipeline()
    for path in (a, b):
        raw.load_lora_weights(path, adapter_name=names[path])
    reloading = raw_pipeline()
    alternating = [((a, 0.8),), ((b, 0.8),)]
    turn = {"t2i": 0, "raw": 0, "lora": 0, "pipeline": 0}

    def next_set(who: str) -> tuple[tuple[str, float], ...]:
        turn[who] += 1
        return alternating[turn[who] % 2]

    def t2i_switching() -> Any:
        return engine.generate(request(next_set("t2i"))).images[0]

    def raw_switching() -> Any:
        raw_activate(raw, next_set("raw"))
        return raw_call(raw)

    def t2i_same_lora() -> Any:
        return same_engine.generate(request(alternating[0])).images[0]

    def reload_lora() -> Any:
        ((path, scale),) = next_set("lora")
        reloading.unload_lora_weights()
        reloading.load_lora_weights(path, adapter_name=names[path])
        raw_activate(reloading, ((path, scale),))
        return raw_call(reloading)

    def reload_pipeline() -> Any:
        ((path, scale),) = next_set("pipeline")
        pipeline = raw_pipeline()
        pipeline.load_lora_weights(path, adapter_name=names[path])
        raw_activate(pipeline, ((path, scale),))
        return raw_call(pipeline)

    switch = interleave(
        {
            "t2i_switching": t2i_switching,
            "t2i_same_lora": t2i_same_lora,
            "raw_set_adapters_switching": raw_switching,
            "raw_reload_lora_each_request": reload_lora,
            "raw_reload_pipeline_each_request": reload_pipeline,
        },
        args.repeats,
    )

    def raw_image(pairs: tuple[tuple[str, float], ...]) -> Any:
        raw_activate(raw, pairs)
        return raw_call(raw)

    identical = all(
        np.array_equal(np.asarray(engine.generate(request(pairs)).images[0]), np.asarray(raw_image(pairs)))
        for pairs in alternating
    )

    # -- fuse -----------------------------------------------------------------------------
    three = ((a, 0.8), (b, 0.5), (c, 0.7))
    fused_engine = load("tiny:sd15", device="cpu", accelerators=["fp32", "fuse_lora"], cache=False)
    raw_fused = raw_pipeline()
    for path, _ in three:
        raw_fused.load_lora_weights(path, adapter_name=names[path])
    raw_activate(raw_fused, three)
    raw_fused.fuse_lora(components=["unet", "text_encoder"], adapter_names=[names[p] for p, _ in three])
    raw_unfused = raw_pipeline()
    for path, _ in three:
        raw_unfused.load_lora_weights(path, adapter_name=names[path])
    raw_activate(raw_unfused, three)
    fuse = interleave(
        {
            "t2i_unfused": lambda: same_engine.generate(request(three)).images[0],
            "t2i_fused": lambda: fused_engine.generate(request(three)).images[0],
            "raw_unfused": lambda: raw_call(raw_unfused),
            "raw_fused": lambda: raw_call(raw_fused),
            "base_without_lora": lambda: base.generate(request(())).images[0],
        },
        args.repeats,
    )
    unfused_image = np.asarray(same_engine.generate(request(three)).images[0], dtype=np.int16)
    fused_image = np.asarray(fused_engine.generate(request(three)).images[0], dtype=np.int16)
    report = {
        **machine(),
        "model": "tiny:sd15",
        "steps": steps,
        "repeats": args.repeats,
        "loras": "3 files, rank 8, UNet attention and text encoder",
        "switch": {
            "median_s": switch,
            "identical_images_t2i_vs_raw": bool(identical),
            "t2i_switch_cost_s": round(switch["t2i_switching"] - switch["t2i_same_lora"], 4),
            "reload_lora_cost_s": round(switch["raw_reload_lora_each_request"] - switch["t2i_same_lora"], 4),
            "reload_pipeline_cost_s": round(switch["raw_reload_pipeline_each_request"] - switch["t2i_same_lora"], 4),
        },
        "fuse": {
            "median_s": fuse,
            "t2i_speedup_fused_over_unfused": round(fuse["t2i_unfused"] / fuse["t2i_fused"], 3),
            "raw_speedup_fused_over_unfused": round(fuse["raw_unfused"] / fuse["raw_fused"], 3),
            "max_pixel_levels_fused_vs_unfused": int(np.abs(fused_image - unfused_image).max()),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
