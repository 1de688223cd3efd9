"""Switching models on one `t2i serve`: a request for a loaded model against one for an evicted model.

    python benchmarks/bench_server_models.py [--steps 2] [--rounds 5]

Serves ``tiny:sd15`` (the default) and two more models (``tiny:sdxl`` and a copy of the tiny SD 1.5
folder) over real HTTP, and times ``POST /v1/generations`` alternating between the two:

- `same_model`: each request after one on its own model (the baseline: no switch at all);
- `switch_resident`: alternating, both kept loaded (no ``--max-memory``);
- `switch_evicted`: alternating under a ``--max-memory`` that holds the default and one more, so
  every request first evicts the other model and loads its own.

Every case makes the same requests (2 x rounds per model), in another order. Prints JSON: per
model, the median seconds of a request in each case and its ratio to `same_model`, and the loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _interleave import machine


@contextlib.contextmanager
def serving(service: Any) -> Iterator[str]:
    import uvicorn
    from t2i_server._app import create_app
    from t2i_server._serve import server_config

    server = uvicorn.Server(server_config(create_app(service), service.limits))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        service.begin_shutdown(0)
        server.should_exit = True
        thread.join(60)
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx
    from t2i_server import Limits
    from t2i_server._jobs import Service, load_model
    from t2i_server._models import Models, weights_bytes

    from t2i_core import load

    folder = Path(tempfile.mkdtemp(prefix="t2i-bench-models-"))
    shutil.copytree(load("tiny:sd15", device="cpu").source, folder / "sd15-copy")
    sources = [
        ("default", "tiny:sd15"),
        ("xl", load("tiny:sdxl", device="cpu").source),
        ("copy", str(folder / "sd15-copy")),
    ]

    def loader(name: str, source: str) -> Any:
        return load_model(name, source, device="cpu")

    sizes = {name: weights_bytes(load(source, device="cpu").pipeline) for name, source in sources}
    body = {"prompt": "a lighthouse", "num_inference_steps": args.steps, "seed": 1}
    cases = ("same_model", "switch_resident", "switch_evicted")
    results: dict[str, dict[str, list[float]]] = {case: {"xl": [], "copy": []} for case in cases}
    loads: dict[str, int] = {}
    for case in results:
        cap = sizes["default"] + max(sizes["xl"], sizes["copy"]) + (1 << 20) if case == "switch_evicted" else None
        models = Models(sources, loader, max_memory=cap)
        models.get("default")
        service = Service((), Limits(), catalog=models)
        # The same requests in every case; only their order differs (each one after its own model, or the other).
        names = (
            ["xl", "xl", "copy", "copy"] * args.rounds if case == "same_model" else ["xl", "copy"] * (2 * args.rounds)
        )
        with serving(service) as base, httpx.Client(base_url=base, timeout=300) as client:
            for name in ("xl", "copy"):  # both loaded once before timing (evicted again as needed)
                client.post("/v1/generations", json={**body, "model": name}).raise_for_status()
            for name in names:
                started = time.perf_counter()
                client.post("/v1/generations", json={**body, "model": name}).raise_for_status()
                results[case][name].append(time.perf_counter() - started)
        loads[case] = sum(entry.loads for entry in models.entries.values())
    shutil.rmtree(folder, ignore_errors=True)
    report = {
        **machine(),
        "steps": args.steps,
        "requests_per_model_and_case": 2 * args.rounds,
        "weights_bytes": sizes,
        "results": {
            case: {
                "loads": loads[case],
                **{
                    name: {
                        "median_s": round(statistics.median(times), 4),
                        "ratio_to_same_model": round(
                            statistics.median(times) / statistics.median(results["same_model"][name]), 3
                        ),
                    }
                    for name, times in per_model.items()
                },
            }
            for case, per_model in results.items()
        },
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
