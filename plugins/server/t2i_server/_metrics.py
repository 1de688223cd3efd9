"""The numbers behind ``GET /metrics``, in Prometheus' text exposition format (version 0.0.4)."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterable

#: upper bounds (seconds) of the latency histogram's buckets, from a tiny model on a CPU to a large one
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("done", "failed", "cancelled", "expired")
#: seconds over which ``t2i_steps_per_second`` is averaged
STEP_RATE_WINDOW = 30.0


class Metrics:
    """Counters, gauges and a histogram, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs = dict.fromkeys(OUTCOMES, 0)
        self.rejected = {"queue_full": 0, "shutting_down": 0}
        self.steps = 0
        self.images = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._recent_steps: deque[float] = deque()

    def step(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self._recent_steps.append(now)
            self._forget_old_steps(now)

    def finished(self, outcome: str, seconds: float, images: int) -> None:
        """A job ended: its outcome, and for a done job its latency (queued + running)."""
        with self._lock:
            self.jobs[outcome] += 1
            self.images += images
            if outcome == "done":
                self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self._latency_sum += seconds
                self._latency_count += 1

    def rejected_job(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def mean_latency(self) -> float | None:
        with self._lock:
            return self._latency_sum / self._latency_count if self._latency_count else None

    def _forget_old_steps(self, now: float) -> None:
        while self._recent_steps and self._recent_steps[0] < now - STEP_RATE_WINDOW:
            self._recent_steps.popleft()

    def render(self, queues: dict[str, int], running: dict[str, int], models: Iterable[tuple[str, str, str]]) -> str:
        """The exposition text. `queues` and `running` are by device; `models` (name, family, device)."""
        with self._lock:
            self._forget_old_steps(time.monotonic())
            rate = len(self._recent_steps) / STEP_RATE_WINDOW
            lines = [
                "# HELP t2i_queue_length Jobs waiting for a device's worker.",
                "# TYPE t2i_queue_length gauge",
                *(f't2i_queue_length{{device="{_label(d)}"}} {n}' for d, n in sorted(queues.items())),
                "# HELP t2i_jobs_running Jobs a device's worker is running (0 or 1).",
                "# TYPE t2i_jobs_running gauge",
                *(f't2i_jobs_running{{device="{_label(d)}"}} {n}' for d, n in sorted(running.items())),
                "# HELP t2i_jobs_total Jobs that ended, by outcome.",
                "# TYPE t2i_jobs_total counter",
                *(f't2i_jobs_total{{outcome="{o}"}} {self.jobs[o]}' for o in OUTCOMES),
                "# HELP t2i_jobs_rejected_total Jobs refused with 503, by reason.",
                "# TYPE t2i_jobs_rejected_total counter",
                *(f't2i_jobs_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())),
                "# HELP t2i_images_total Images made.",
                "# TYPE t2i_images_total counter",
                f"t2i_images_total {self.images}",
                "# HELP t2i_steps_total Denoising steps run.",
                "# TYPE t2i_steps_total counter",
                f"t2i_steps_total {self.steps}",
                f"# HELP t2i_steps_per_second Denoising steps per second over the last {STEP_RATE_WINDOW:g} s.",
                "# TYPE t2i_steps_per_second gauge",
                f"t2i_steps_per_second {rate:.6g}",
                "# HELP t2i_job_latency_seconds Seconds from submission to the end of a done job.",
                "# TYPE t2i_job_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self._buckets, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f't2i_job_latency_seconds_bucket{{le="{le}"}} {cumulative}')
            lines += [
                f"t2i_job_latency_seconds_sum {self._latency_sum:.6g}",
                f"t2i_job_latency_seconds_count {self._latency_count}",
                "# HELP t2i_model_info A model this server serves.",
                "# TYPE t2i_model_info gauge",
                *(
                    f't2i_model_info{{model="{_label(m)}",family="{_label(f)}",device="{_label(d)}"}} 1'
                    for m, f, d in models
                ),
            ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
