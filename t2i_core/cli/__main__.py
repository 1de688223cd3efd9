"""``python -m t2i_core.cli ...``: the same as ``t2i ...``."""

from __future__ import annotations

from .main import console_main

console_main()
