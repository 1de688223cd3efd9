"""``t2i serve`` under load: requests per second and latency through HTTP, against the SDK called directly.

    python benchmarks/bench_server.py [--clients 1 4 16] [--requests 32] [--steps 2] [--rounds 2]
                                      [--threads N] [--out benchmarks/results/cpu-server.json]

One run measures both sides on the tiny model, interleaved round by round so both see the same
machine state:

- ``http``: a real ``t2i serve`` process (started here, on a free loopback port) and N client
  threads, each with its own connection, sending ``POST /v1/generations`` (JSON, base64 PNG);
- ``sdk``: N threads calling ``Engine.generate`` on one engine in this process (calls take
  turns on its lock, as the server's worker runs jobs one at a time), then encoding the PNG, so
  both sides make the same bytes.

Each side makes ``--requests`` images per round and client count, each with its own seed; a
request's latency runs from its submission to its answer. Prints and writes JSON: requests per
second, p50 and p99 latency (over every round), the HTTP overhead (each request's latency less
the time its job spent in the server, which the server reports), and whether every HTTP image
equals the SDK's. On a machine that other work shares, ``--threads 1`` keeps torch's threads from
spin-waiting for busy cores, which would swamp the difference being measured.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _interleave import machine

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: torch's); 1 on a busy machine"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-server.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from PIL import Image

    from t2i_core import GenerationRequest, load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = load("tiny:sd15", device="cpu")
    server, base = start_server(max(args.clients) * args.requests, args.threads)
    try:
        latencies: dict[tuple[str, int], list[float]] = {}
        #: each HTTP request's latency less its job's time in the server: what HTTP itself costs
        overheads: dict[int, list[float]] = {}
        rates: dict[tuple[str, int], list[float]] = {}
        images: dict[tuple[str, int], Any] = {}

        def http_call(client: Any, seed: int) -> tuple[bytes, float]:
            """The PNG, and the seconds the server spent in the job (queued + generating)."""
            body = {"prompt": f"benchmark {seed}", "num_inference_steps": args.steps, "seed": seed}
            response = client.post("/v1/generations", json=body)
            response.raise_for_status()
            answer = response.json()
            return base64.b64decode(answer["images"][0]), sum(answer["timings"].values())

        def sdk_call(_client: Any, seed: int) -> tuple[bytes, float]:
            request = GenerationRequest(prompt=f"benchmark {seed}", num_inference_steps=args.steps, seed=seed)
            buffer = io.BytesIO()
            engine.generate(request).images[0].save(buffer, format="PNG")
            return buffer.getvalue(), 0.0

        sides = {"http": http_call, "sdk": sdk_call}
        run_level(sides["sdk"], None, 1, list(range(2)))  # warm-up: first calls pay one-time costs
        run_level(sides["http"], base, 1, list(range(2)))
        for round_index in range(args.rounds):
            for clients in args.clients:
                seeds = [1000 * clients + i for i in range(args.requests)]
                order = ("http", "sdk") if round_index % 2 == 0 else ("sdk", "http")
                for side in order:
                    wall, times, made, jobs = run_level(sides[side], base if side == "http" else None, clients, seeds)
                    latencies.setdefault((side, clients), []).extend(times)
                    if side == "http":
                        overheads.setdefault(clients, []).extend(t - j for t, j in zip(times, jobs, strict=True))
                    rates.setdefault((side, clients), []).append(len(seeds) / wall)
                    if round_index == 0:
                        for seed, data in made.items():
                            images[(side, seed)] = np.asarray(Image.open(io.BytesIO(data)))
        identical = all(
            np.array_equal(images[("http", seed)], images[("sdk", seed)]) for (side, seed) in images if side == "http"
        )
        results = []
        for clients in args.clients:
            row: dict[str, Any] = {"clients": clients}
            for side in ("http", "sdk"):
                times = sorted(latencies[(side, clients)])
                row[side] = {
                    "requests_per_s": round(statistics.median(rates[(side, clients)]), 2),
                    "p50_ms": round(1000 * percentile(times, 50), 1),
                    "p99_ms": round(1000 * percentile(times, 99), 1),
                    "samples": len(times),
                }
            row["http"]["overhead_p50_ms"] = round(1000 * percentile(sorted(overheads[clients]), 50), 2)
            row["http"]["overhead_p99_ms"] = round(1000 * percentile(sorted(overheads[clients]), 99), 2)
            row["http_over_sdk_p50"] = round(row["http"]["p50_ms"] / row["sdk"]["p50_ms"], 3)
            row["http_over_sdk_throughput"] = round(row["http"]["requests_per_s"] / row["sdk"]["requests_per_s"], 3)
            results.append(row)
        document = {
            "benchmark": "bench_server.py",
            "model": "tiny:sd15 (64x64)",
            "steps": args.steps,
            "requests_per_level_and_round": args.requests,
            "rounds": args.rounds,
            "identical_images": identical,
            **machine(),
            "torch_threads_server": args.threads or "torch's default",
            "note": "p50/p99 over rounds x requests samples; with 4 and 16 clients and one worker, latency is mostly "
            "queueing. overhead_*_ms: an HTTP request's latency less the time its job spent in the server (queued and "
            "generating), i.e. what HTTP, JSON, base64 and the job machinery add",
            "results": results,
        }
        text = json.dumps(document, indent=2)
        print(text)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    finally:
        server.terminate()
        server.wait(60)


def run_level(
    call: Any, base: str | None, clients: int, seeds: list[int]
) -> tuple[float, list[float], dict[int, bytes], list[float]]:
    """`clients` threads share `seeds`: the wall time, each request's latency, each seed's PNG, and
    each request's seconds in the server's job (in the order of the latencies)."""
    import httpx

    pending: queue.Queue[int] = queue.Queue()
    for seed in seeds:
        pending.put(seed)
    times: list[float] = []
    jobs: list[float] = []
    made: dict[int, bytes] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        client = httpx.Client(base_url=base, timeout=600) if base else None
        try:
            start.wait()
            while True:
                try:
                    seed = pending.get_nowait()
                except queue.Empty:
                    return
                began = time.perf_counter()
                data, in_job = call(client, seed)
                elapsed = time.perf_counter() - began
                with lock:
                    times.append(elapsed)
                    jobs.append(in_job)
                    made[seed] = data
        finally:
            if client is not None:
                client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, times, made, jobs


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q`-th percentile by linear interpolation between closest ranks."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def start_server(queue_size: int, threads: int | None) -> tuple[subprocess.Popen[str], str]:
    """``t2i serve`` on a free loopback port; the process and its base URL."""
    command = [sys.executable, "-m", "t2i_core.cli", "serve", "--model", "tiny:sd15", "--device", "cpu"]
    command += ["--port", "0", "--queue-size", str(queue_size)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {})}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert process.stderr is not None
    deadline = time.monotonic() + 300
    for line in process.stderr:
        if " on http://" in line:
            base = line.split(" on ", 1)[1].split("/ ", 1)[0]
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
            return process, base
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError("t2i serve did not start")


if __name__ == "__main__":
    main()
