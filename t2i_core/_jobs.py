"""Deprecated: moved to `t2i_core.batch.jobs` (t2i 0.2); this module goes in 0.3."""

from __future__ import annotations

import sys
import warnings

from . import batch as _package
from .batch.jobs import *  # noqa: F403

warnings.warn("t2i_core._jobs is deprecated: it is t2i_core.batch.jobs", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _package.jobs
