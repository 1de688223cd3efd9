"""Deprecated: moved to `t2i_core.batch.manifest` (t2i 0.2); this module goes in 0.3."""

from __future__ import annotations

import sys
import warnings

from . import batch as _package
from .batch.manifest import *  # noqa: F403

warnings.warn("t2i_core._manifest is deprecated: it is t2i_core.batch.manifest", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _package.manifest
