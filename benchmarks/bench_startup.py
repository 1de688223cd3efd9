"""Start-up costs: `t2i --help` and `t2i plugins` wall time, and first/second `load()` per tiny family.

    python benchmarks/bench_startup.py [--repeats 7]

`t2i --help` must stay under 0.5 s (it imports no torch). The second `load()` of a model in one
process reuses the engine cache; detection without `family=` reads only model_index.json.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def cli_times(args: list[str], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "t2i_core.cli", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


def load_times() -> list[dict[str, Any]]:
    code = r"""
import json, time, sys
start = time.perf_counter()
import t2i_core
from t2i_core import load, get_registry
from t2i_core.kit import read_model_index
from t2i_core.tiny import ensure_built
out = []
for family in sorted(get_registry().providers):
    provider = get_registry().provider(family)
    try:
        folder = ensure_built(provider.name, provider.tiny_version, provider.build_tiny)
    except NotImplementedError:
        continue
    t0 = time.perf_counter(); load(str(folder), device="cpu"); first = time.perf_counter() - t0
    t0 = time.perf_counter(); load(str(folder), device="cpu"); second = time.perf_counter() - t0
    t0 = time.perf_counter(); read_model_index(str(folder), str(folder), True); detect = time.perf_counter() - t0
    out.append({"family": family, "first_load_s": round(first, 4), "second_load_s": round(second, 4),
                "detect_model_index_s": round(detect, 5)})
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {
        "t2i --help": cli_times(["--help"], args.repeats),
        "t2i plugins": cli_times(["plugins"], args.repeats),
        "loads (first includes importing torch/diffusers; tiny checkpoints already built)": load_times(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
