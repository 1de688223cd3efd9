"""The batch dry run uses the engine's own checks: a job it accepts is never refused by the real run for a
reason knowable without the weights (t2i_core.engine.checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2i_core import T2IError, load, run_batch
from t2i_core.batch.jobs import build_request
from t2i_core.schedulers import SCHEDULERS

NAMES = [*SCHEDULERS, "default", "no-such-sampler"]

job_fields = st.fixed_dictionaries(
    {"prompt": st.sampled_from(["a cat", "a (red:1.2) fox", "x " * 90])},
    optional={
        "scheduler": st.sampled_from(NAMES),
        "guidance_scale": st.floats(min_value=0, max_value=150, allow_nan=False),
        "num_inference_steps": st.sampled_from([1, 2, 99, 101, 500, 998, 999, 1000, 1001, 5000]),
        "height": st.sampled_from([64, 72, 96, 4096]),
        "width": st.sampled_from([64, 80, 4096]),
        "prompt_weighting": st.sampled_from(["compel", "compel-long", "a1111", "no-such-syntax"]),
        "negative_prompt": st.sampled_from(["", "blurry"]),
        "options": st.sampled_from([{}, {"no_such_option": 1}, {"eta": 0.5}]),
    },
)


@pytest.fixture(scope="module")
def engine() -> Any:
    return load("tiny:sd15")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=job_fields)
def test_what_the_dry_run_accepts_the_engine_accepts(engine: Any, fields: dict[str, Any], tmp_path: Path) -> None:
    try:
        request = build_request(fields)
    except T2IError:
        return  # refused when read, by the dry run and the real run alike
    summary = run_batch([{**fields, "id": "job"}], out=tmp_path / "out", model="tiny:sd15", dry_run=True)
    if summary.invalid:
        return  # refused before any work: the real run refuses it too (the dry run is no looser than this)
    engine.resolve(request)  # every check of a real run short of running the pipeline


def test_the_dry_run_refuses_what_it_used_to_let_through(tmp_path: Path) -> None:
    """Steps past the scheduler's limit and loras without a file: the drifted copy of the checks accepted them."""
    jobs = [
        {"id": "steps", "prompt": "a cat", "num_inference_steps": 1000, "scheduler": "dpm++-2m"},
        {"id": "pixels", "prompt": "a cat", "height": 4096, "width": 4096},
        {"id": "fine", "prompt": "a cat", "num_inference_steps": 998, "scheduler": "dpm++-2m"},
    ]
    summary = run_batch(jobs, out=tmp_path / "out", model="tiny:sd15", dry_run=True)
    assert summary.invalid == 2
    assert any("num_inference_steps" in failure and "998" in failure for failure in summary.failures)
    assert any("height x width" in failure for failure in summary.failures)
