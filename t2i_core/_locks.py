"""The process-wide lock around model construction and loading.

diffusers and accelerate construct models under ``init_empty_weights``, which patches
``torch.nn.Module.register_parameter`` for the whole process; diffusers' lazy module imports are
not thread-safe either. Two threads loading at once therefore corrupt each other (meta tensors,
or a patch that is never undone). t2i serialises every load, tiny-checkpoint build and lazy
diffusers lookup on this lock; plugins that call ``from_pretrained`` or build models hold it too.
"""

from __future__ import annotations

import threading

loading_lock = threading.RLock()
"""The process-wide lock around model loading and construction (a re-entrant lock).

Hold it (``with t2i_core.loading_lock:``) around any ``from_pretrained``, ``from_single_file``,
``from_pipe`` or model construction in plugin code; t2i already holds it around
`ModelProvider.load` and `ModelProvider.build_tiny`. Nested use is fine.
"""
