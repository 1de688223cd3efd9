"""Batches: jobs files (`jobs`) run by an executor's workers (`worker`) into one folder with a
verified manifest (`manifest`), driven by `run_batch` (`driver`)."""

from __future__ import annotations

from .driver import BatchSummary, run_batch

__all__ = ["BatchSummary", "run_batch"]
