"""Deprecated: ``t2i_core._weights`` (WeightsFile, resolve_file, file_digest) is `t2i_core.kit` since t2i 0.2;
this module goes in 0.3."""

from __future__ import annotations

import sys
import warnings

from . import _weight_files

warnings.warn(
    "t2i_core._weights is deprecated: import WeightsFile, resolve_file and file_digest from t2i_core.kit",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _weight_files
