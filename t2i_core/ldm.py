"""Deprecated: the LDM single-file writer moved to `t2i_core.testing.ldm` (t2i 0.2); this module goes in 0.3."""

from __future__ import annotations

import warnings

from .testing.ldm import PREFIXES, original_layout, write_single_file

__all__ = ["PREFIXES", "original_layout", "write_single_file"]

warnings.warn(
    "t2i_core.ldm is deprecated: import write_single_file from t2i_core.testing.ldm",
    DeprecationWarning,
    stacklevel=2,
)
