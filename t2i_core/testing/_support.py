"""What the conformance classes share, and the helpers t2i_core.testing exports for plugin tests:
light-import checks, tiny folders, raw diffusers pipelines, cached references, CLI runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .. import ModelProvider, get_registry

if TYPE_CHECKING:
    from .. import Engine
    from ..registry import Registry

#: modules that registering a plugin, or a conditioner's ``wants()``, must never import
HEAVY_MODULES = ("torch", "diffusers", "transformers", "compel")


def light_import_report(code: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter, then report which heavy modules it imported.

    `code` may set ``report[key] = value`` to return more facts (JSON-serialisable).
    """
    script = (
        "import json, sys\nreport = {}\n"
        f"{code}\n"
        f"report['heavy'] = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)\n"
        "print('T2I-REPORT ' + json.dumps(report))\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    for line in process.stdout.splitlines():
        if line.startswith("T2I-REPORT "):
            report: dict[str, Any] = json.loads(line.removeprefix("T2I-REPORT "))
            return report
    raise AssertionError(f"the check failed to run (exit {process.returncode}):\n{process.stderr[-3000:]}")


def offers_tiny(provider: ModelProvider) -> bool:
    """Whether `provider` builds a ``tiny:<family>`` checkpoint."""
    return type(provider).build_tiny is not ModelProvider.build_tiny


def tiny_folder(family: str, registry: Registry | None = None) -> Path:
    """The folder of ``tiny:<family>`` in the current cache (``T2I_CACHE``), built first when needed.

    `registry` is where to find the family's provider (default: the process-wide one).
    """
    from ..tiny import ensure_built

    provider = (registry or get_registry()).provider(family)
    return ensure_built(provider.name, provider.tiny_version, provider.build_tiny)


def install_hint(family: str) -> str:
    """What to install for `family`, in words (t2i's own family ``x`` ships as ``t2i-x``)."""
    folder = "plugins/" + family.replace("-", "")
    return (
        f"install the plugin that offers family {family!r} (for a family t2i ships, from a checkout "
        f"of t2i: python -m pip install -e {folder})"
    )


def require_family(family: str) -> ModelProvider:
    """The provider of `family`; skips the calling test, saying what to install, when none is registered.

    Like ``pytest.importorskip`` for a family: for tests that need another family's checkpoint
    (``require_family("sd15")`` before ``tiny_folder("sd15")``).
    """
    providers = get_registry().providers
    if family not in providers:
        pytest.skip(f"needs family {family!r}: {install_hint(family)}")
    provider: ModelProvider = providers[family]
    return provider


def shipped_families(exclude: str) -> list[str]:
    """The families that t2i itself ships (first-party plugins) with a tiny checkpoint, but `exclude`."""
    providers = get_registry().first_party("provider")
    return sorted(name for name, provider in providers.items() if name != exclude and offers_tiny(provider))


def other_shipped_family_hint(family: str) -> str:
    """The skip message of a cross-family check that found no other family of t2i's own installed."""
    example = "sdxl" if family == "sd15" else "sd15"
    return (
        f"no family of t2i's own but {family!r} is installed: install one (from a checkout of t2i: python -m pip install -e plugins/{example}) "
        "to run this cross-family check"
    )


def read_index(folder: Path) -> dict[str, Any]:
    index: dict[str, Any] = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return index


def raw_pipeline(folder: str | Path, pipeline_class: Any = None, **from_pretrained_kwargs: Any) -> Any:
    """The checkpoint in `folder` as raw diffusers loads it, with its progress bar off: the reference
    of a parity test.

    `pipeline_class` is a diffusers pipeline class (or its name); the default is
    ``AutoPipelineForText2Image``, what a diffusers user writes. `from_pretrained_kwargs` go to
    its ``from_pretrained`` (``controlnet=...``, ``torch_dtype=...``).
    """
    import diffusers

    if pipeline_class is None:
        pipeline_class = diffusers.AutoPipelineForText2Image
    elif isinstance(pipeline_class, str):
        pipeline_class = getattr(diffusers, pipeline_class)
    pipeline = pipeline_class.from_pretrained(str(folder), **from_pretrained_kwargs)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    return pipeline


def refuse_to_run(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> None:
    """Make the pipeline of `engine` fail the test if it runs, for the rest of the test.

    For tests of requests that must be refused before any work: the refusal has to come from
    the checks, not from diffusers halfway through.
    """

    def run(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail("the pipeline ran although the request should have been refused before any work")

    monkeypatch.setattr(engine.provider, "run", run)


#: (class, folder) → raw diffusers pipeline: each conformance class loads its reference once
_references: dict[tuple[type, str], Any] = {}
#: (class, folder) → (the test that reported it, the message) for a reference that failed to load
_failed_references: dict[tuple[type, str], tuple[str, str]] = {}


def cached_reference(owner: type, folder: str, load: Any) -> Any:
    """`load(folder)` for the conformance class `owner`, once: later calls reuse the pipeline.

    If loading fails, the test that asked first fails naming the cause and `reference_pipeline`;
    every later test of the class that needs the reference is skipped, pointing at that test.
    """
    __tracebackhide__ = True  # the failure shows the cause's traceback, not the kit's
    key = (owner, folder)
    if key in _failed_references:
        test, message = _failed_references[key]
        pytest.skip(f"the reference pipeline failed to load (see {test}): {message}")
    if key not in _references:
        try:
            pipeline = load(folder)
        except Exception as exc:
            name = getattr(load, "__name__", "reference_pipeline")
            message = f"{owner.__name__}.{name}({folder!r}) failed: {type(exc).__name__}: {exc}"
            _failed_references[key] = (_current_test(), message)
            raise ReferenceLoadError(
                f"{message}\nThe tests that compare with raw diffusers need it: override {name} so that it loads "
                "this checkpoint the way a diffusers user would (e.g. the pipeline class and components it needs)."
            ) from exc
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        _references[key] = pipeline
    return _references[key]


class ReferenceLoadError(AssertionError):
    """The conformance class's raw diffusers reference pipeline failed to load."""


def _current_test() -> str:
    current = os.environ.get("PYTEST_CURRENT_TEST", "the first test that compares with raw diffusers")
    return current.rsplit(" (", 1)[0]


def forget_references(owner: type) -> None:
    for table in (_references, _failed_references):
        for key in [key for key in table if key[0] is owner]:
            del table[key]


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``t2i ARGV`` in this process, as a user would from a shell; return (exit status, stdout, stderr).

    A refused request gives status 2 and one line on stderr, as in a shell. The command quiets library logging for a terminal; the loggers and warning filters are
    restored afterwards.
    """
    import logging
    import warnings

    from ..cli import main

    loggers = [logging.getLogger(name) for name in ("t2i", "diffusers", "transformers")]
    saved = [(logger, list(logger.handlers), logger.propagate, logger.level) for logger in loggers]
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, with None, remove) environment variables for a block, then restore them."""
    previous = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
