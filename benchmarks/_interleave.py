"""Shared by the SDK-vs-raw benchmarks: interleaved timing and the machine description."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def compare(
    sdk: Callable[[], Any],
    raw: Callable[[], Any],
    repeats: int,
    before_round: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Time `sdk` and `raw` in alternating order, `repeats` rounds after one warm-up each.

    Both return a PIL image; the warm-up pair also tells whether they made the same image.
    `before_round(index)` runs before each timed round (e.g. to change the prompt).
    Returns the median seconds of each side and the median of the per-round ratios.
    """
    same = np.array_equal(np.asarray(sdk()), np.asarray(raw()))
    sdk_times, raw_times, ratios = [], [], []
    for index in range(1, repeats + 1):
        if before_round is not None:
            before_round(index)
        order = (sdk, raw) if index % 2 == 0 else (raw, sdk)
        timings = {}
        for run in order:
            start = time.perf_counter()
            run()
            timings[run] = time.perf_counter() - start
        sdk_times.append(timings[sdk])
        raw_times.append(timings[raw])
        ratios.append(timings[sdk] / timings[raw])
    return {
        "repeats": repeats,
        "identical_images": bool(same),
        "sdk_median_s": round(statistics.median(sdk_times), 4),
        "raw_median_s": round(statistics.median(raw_times), 4),
        "median_ratio_sdk_over_raw": round(statistics.median(ratios), 4),
    }


def machine() -> dict[str, str]:
    import diffusers
    import torch

    return {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
