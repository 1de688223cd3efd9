"""Helpers that core's and the plugins' test files import (``from support import ...``).

One copy each, beside the kit: what a plugin author would also need lives in ``t2i_core.testing``
(image comparisons, seeded generators, tiny folders); this module adds only what the t2i suite's
own files share. pytest puts this folder on ``sys.path`` (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from t2i_core import testing


def tiny_folder(family: str) -> str:
    """The folder of ``tiny:<family>`` in the suite's cache (built on first use), as a string."""
    return str(testing.tiny_folder(family))


def raw_pipeline(folder: str) -> Any:
    """The checkpoint at `folder` as raw diffusers loads it, the reference of every parity test."""
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run_cli(*args: str) -> int:
    """Run ``t2i ARGS`` in this process and return its exit status; its output reaches ``capsys``."""
    from t2i_core.testing._support import run_cli as run_captured

    code, out, err = run_captured(*args)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return code


def refuse_to_run(monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    """Make `engine`'s pipeline fail the test if it runs: the request should be refused before."""

    def run(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the pipeline ran although the request should have been refused")

    monkeypatch.setattr(engine.provider, "run", run)
