"""Batch throughput: images per second of ``t2i batch`` with the local executor and with ray (1 and 2 actors).

    python benchmarks/bench_batch.py [--family sd15] [--jobs 24] [--steps 10] [--threads 1] [--output FILE.json]

One run, on the tiny checkpoint, every variant on the same jobs into a fresh folder:

- `local`: the default executor, in this process;
- `ray-1`, `ray-2`: the ray executor with 1 and 2 CPU actors on a local Ray cluster started by
  this script, whose start-up (``ray.init``) is timed on its own (`ray_startup_s`).

Every worker runs torch with `--threads` threads (the local process, and each actor through the
ray executor's ``threads`` option), so the variants differ only in how many workers there are.

For each: `total_s` (the whole `run_batch`, model loads and actor start-up included),
`first_image_s` (until the first image is written), `images_per_s` over the whole run and
`steady_images_per_s` from the first image to the last (loads and start-up left out), and the
torch threads of each worker. Writes JSON (stdout, and `--output`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _interleave import machine


def timed_batch(jobs: list[dict[str, Any]], model: str, **kwargs: Any) -> dict[str, Any]:
    from t2i_core import run_batch

    stamps: list[float] = []
    images: list[int] = []
    with tempfile.TemporaryDirectory(prefix="t2i-bench-batch-") as out:
        started = time.perf_counter()
        summary = run_batch(
            jobs,
            out=out,
            model=model,
            on_record=lambda record: (stamps.append(time.perf_counter()), images.append(len(record.get("files", [])))),
            **kwargs,
        )
        total = time.perf_counter() - started
    assert summary.ok, summary.failures
    steady = (sum(images) - images[0]) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "images": summary.images,
        "total_s": round(total, 3),
        "first_image_s": round(stamps[0] - started, 3),
        "images_per_s": round(summary.images / total, 3),
        "steady_images_per_s": round(steady, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every worker")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from t2i_core import load

    torch.set_num_threads(args.threads)

    model = f"tiny:{args.family}"
    load(model, device="cpu")  # build the tiny checkpoint once, outside every measurement
    jobs = [
        {"id": f"job-{index}", "prompt": f"a lighthouse, view {index}", "num_inference_steps": args.steps}
        for index in range(args.jobs)
    ]
    results: dict[str, Any] = {}
    from t2i_core import clear_cache

    clear_cache()  # local loads its model inside the measurement, as the actors do
    results["local"] = {**timed_batch(jobs, model, device="cpu"), "workers": 1, "torch_threads": args.threads}

    import ray

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_startup = time.perf_counter() - started
    cpus = int(ray.cluster_resources().get("CPU", 0))
    try:
        for workers in (1, 2):
            options = {"stall_timeout": 600, "threads": args.threads}
            measured = timed_batch(jobs, model, executor="ray", workers=workers, executor_options=options)
            results[f"ray-{workers}"] = {**measured, "workers": workers, "torch_threads": args.threads}
    finally:
        ray.shutdown()
    document = {
        **machine(),
        "ray": ray.__version__,
        "family": args.family,
        "jobs": args.jobs,
        "steps": args.steps,
        "ray_startup_s": round(ray_startup, 3),
        "ray_cluster_cpus": cpus,
        "results": results,
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
