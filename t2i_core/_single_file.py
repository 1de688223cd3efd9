"""Deprecated: moved to `t2i_core.engine.single_file` (t2i 0.2); this module goes in 0.3."""

from __future__ import annotations

import sys
import warnings

from .engine import single_file as _moved

warnings.warn(
    "t2i_core._single_file is deprecated: it is t2i_core.engine.single_file", DeprecationWarning, stacklevel=2
)
sys.modules[__name__] = _moved
