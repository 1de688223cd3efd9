"""Start-up costs: `t2i --help` and `t2i plugins` wall and CPU time, and first/second `load()` per tiny family.

    python benchmarks/bench_startup.py [--repeats 10] [--startup-only]

`t2i --help` and `t2i plugins` should take at most 0.15 s on the 2-core machine (issue #16; they
import no torch, and a plugin's helpers load when used). Each is timed twice: with bytecode cached
(a fresh ``PYTHONPYCACHEPREFIX``, filled by a first run: what an installed t2i runs) and as this
environment runs it (with ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__``, Python compiles
t2i's sources on every run). On a shared machine the best of N is the figure to compare; the load
average at the start is reported with it, and the CPU time (user + system) is less sensitive to
other processes than the wall time. The second `load()` of a model in one process reuses the engine
cache; detection without `family=` reads only model_index.json. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: issue #16: ``t2i --help`` and ``t2i plugins`` at most this long (best of N, idle 2-core machine)
TARGET_S = 0.15


def t2i_command() -> list[str]:
    """The ``t2i`` executable next to this Python (what users run), else ``python -m t2i_core.cli``."""
    script = Path(sys.executable).with_name("t2i")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "t2i_core.cli"]


def timed(command: list[str], repeats: int, env: dict[str, str]) -> dict[str, float]:
    """Best and median wall time and CPU time (user + system, from the child's rusage) of `command`."""
    walls, cpus = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        walls.append(time.perf_counter() - start)
        cpus.append(usage.ru_utime + usage.ru_stime)
        if status != 0:
            raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode() if child.stderr else ''}")
    return {
        "best_s": round(min(walls), 3),
        "median_s": round(statistics.median(walls), 3),
        "cpu_best_s": round(min(cpus), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
        "within_target": min(walls) <= TARGET_S,
    }


def cli_times(args: list[str], repeats: int, cached: dict[str, str]) -> dict[str, Any]:
    command = [*t2i_command(), *args]
    subprocess.run(command, check=True, capture_output=True, env=cached)  # fills the bytecode cache
    here = dict(os.environ)
    return {
        "bytecode cached": timed(command, repeats, cached),
        "as run here": {
            **timed(command, repeats, here),
            "PYTHONDONTWRITEBYTECODE": here.get("PYTHONDONTWRITEBYTECODE"),
        },
    }


def slowest_plugins(count: int = 5) -> dict[str, float]:
    """The plugins whose import took longest in one ``t2i plugins --json`` run (seconds)."""
    proc = subprocess.run([*t2i_command(), "plugins", "--json"], check=True, capture_output=True, text=True)
    seconds = {p["name"]: p["import_seconds"] or 0.0 for p in json.loads(proc.stdout)["plugins"]}
    return dict(sorted(seconds.items(), key=lambda item: -item[1])[:count])


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
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--startup-only", action="store_true", help="skip the model loads (which import torch)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "target_s": TARGET_S,
    }
    with tempfile.TemporaryDirectory(prefix="t2i-bench-pyc-") as prefix:
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = prefix
        subprocess.run([sys.executable, "-c", "pass"], check=True, env=cached)
        floor = timed([sys.executable, "-c", "pass"], args.repeats, cached)
        report["python -c pass (the floor)"] = {k: v for k, v in floor.items() if k != "within_target"}
        report["t2i --help"] = cli_times(["--help"], args.repeats, cached)
        report["t2i plugins"] = cli_times(["plugins"], args.repeats, cached)
    report["slowest plugin imports, s (t2i plugins --json)"] = slowest_plugins()
    if not args.startup_only:
        report["loads (first includes importing torch/diffusers; tiny checkpoints already built)"] = load_times()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
