"""Threads: throughput of one shared engine, of one cached engine per thread, and of raw diffusers.

    python benchmarks/bench_threads.py [--family sd15] [--threads 4] [--requests 16] [--steps 10] [--rounds 3]

`Engine.generate` serialises calls on one engine (its lock). This measures what that costs
against the alternatives, in one process, rounds interleaved so every variant sees the same
machine state:

- `raw_sequential`: raw diffusers, one call after another (the baseline);
- `sdk_sequential`: one engine, one call after another;
- `sdk_shared_engine`: `--threads` threads calling `generate` on one engine;
- `sdk_engine_per_thread`: `--threads` threads, each with its own engine from the cache
  (shared weights, own scheduler and tokenizers), so their calls run at the same time.

Prints JSON: images per second of each (median over rounds) and their ratio to the baseline,
and whether every threaded image equals its sequential one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _interleave import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from diffusers import AutoPipelineForText2Image

    from t2i_core import GenerationRequest, load

    shared = load(f"tiny:{args.family}", device="cpu")
    engines = [load(f"tiny:{args.family}", device="cpu") for _ in range(args.threads)]
    raw = AutoPipelineForText2Image.from_pretrained(shared.source)
    raw.set_progress_bar_config(disable=True)
    requests = [
        GenerationRequest(prompt=f"a lighthouse, variation {i}", seed=i, num_inference_steps=args.steps)
        for i in range(args.requests)
    ]
    resolved = [shared.resolve(request)[0] for request in requests]

    def raw_sequential() -> list[bytes]:
        return [
            raw(
                r.prompt,
                num_inference_steps=r.num_inference_steps,
                guidance_scale=r.guidance_scale,
                height=r.height,
                width=r.width,
                generator=torch.Generator("cpu").manual_seed(r.seed or 0),
            )
            .images[0]
            .tobytes()
            for r in resolved
        ]

    def sdk_sequential() -> list[bytes]:
        return [shared.generate(r).images[0].tobytes() for r in requests]

    def threaded(pick: Any) -> list[bytes]:
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            return list(pool.map(lambda i: pick(i).generate(requests[i]).images[0].tobytes(), range(len(requests))))

    variants = {
        "raw_sequential": raw_sequential,
        "sdk_sequential": sdk_sequential,
        "sdk_shared_engine": lambda: threaded(lambda i: shared),
        "sdk_engine_per_thread": lambda: threaded(lambda i: engines[i % args.threads]),
    }
    expected = sdk_sequential()
    times: dict[str, list[float]] = {name: [] for name in variants}
    identical = {name: True for name in variants}
    for round_ in range(args.rounds):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in names:
            start = time.perf_counter()
            images = variants[name]()
            times[name].append(time.perf_counter() - start)
            identical[name] &= images == expected
    baseline = statistics.median(times["raw_sequential"])
    report = {
        **machine(),
        "family": args.family,
        "threads": args.threads,
        "requests": args.requests,
        "steps": args.steps,
        "rounds": args.rounds,
        "results": {
            name: {
                "images_per_s": round(args.requests / statistics.median(seconds), 3),
                "throughput_ratio_to_raw_sequential": round(baseline / statistics.median(seconds), 3),
                "identical_to_sequential": identical[name],
            }
            for name, seconds in times.items()
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
