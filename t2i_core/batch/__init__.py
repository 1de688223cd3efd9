"""Batches: jobs files (`jobs`) run by an executor's workers (`worker`) into one folder with a
verified manifest (`manifest`), driven by `run_batch` (`driver`).

The names load on first use (PEP 562): an executor plugin that imports `t2i_core.Worker` at
registration does not pay for the driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["BatchSummary", "run_batch"]

#: public name -> the module that defines it
_EXPORTS = {"BatchSummary": "driver", "run_batch": "driver"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 't2i_core.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


if TYPE_CHECKING:
    from .driver import BatchSummary, run_batch
