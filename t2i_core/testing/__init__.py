"""The plugin author's test kit: conformance test classes for each role, image comparisons, and helpers.

A plugin's test file subclasses one class per thing it registers and sets class attributes
(the pandas extension-test style); the pytest plugin of t2i-core (``t2i_core.testing.fixtures``,
loaded through the ``pytest11`` entry point) provides the fixtures they use. The helpers are what
those classes use, for a plugin's own tests: tiny folders, raw diffusers pipelines, CLI runs,
``refuse_to_run``, ``write_gguf``; `t2i_core.testing.ldm` writes single-file checkpoints. See docs/testing.md.
Importing this module does not import torch; running the tests does.
"""

from __future__ import annotations

try:
    import pytest
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("t2i_core.testing needs pytest: python -m pip install pytest") from exc

# Before the modules load: pytest then explains a failed assert in them with the values compared.
pytest.register_assert_rewrite(
    "t2i_core.testing._accelerator",
    "t2i_core.testing._conditioner",
    "t2i_core.testing._images",
    "t2i_core.testing._provider",
)

from ._accelerator import AcceleratorConformance  # noqa: E402
from ._conditioner import ConditionerConformance  # noqa: E402
from ._gguf import write_gguf  # noqa: E402
from ._images import (  # noqa: E402
    as_array,
    assert_images_close,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    levels_apart,
    reference_call,
)
from ._provider import ProviderConformance  # noqa: E402
from ._support import (  # noqa: E402
    ReferenceLoadError,
    install_hint,
    raw_pipeline,
    refuse_to_run,
    require_family,
    run_cli,
    tiny_folder,
)

__all__ = [
    "AcceleratorConformance",
    "ConditionerConformance",
    "ProviderConformance",
    "ReferenceLoadError",
    "as_array",
    "assert_images_close",
    "assert_images_differ",
    "assert_images_equal",
    "cpu_generators",
    "install_hint",
    "levels_apart",
    "raw_pipeline",
    "reference_call",
    "refuse_to_run",
    "require_family",
    "run_cli",
    "tiny_folder",
    "write_gguf",
]
