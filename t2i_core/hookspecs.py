"""The t2i hook specifications: one collector hook per plugin role.

A plugin is a module (or object) with functions marked ``@t2i_core.hookimpl`` whose names
match the specs below. Each hook hands the plugin a ``register`` callback; a plugin calls it
once per thing it offers. Registering must stay cheap: no torch, diffusers or transformers
import happens here, only when a model is loaded or an image generated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .accelerator import Accelerator, Preset
    from .conditioner import Conditioner
    from .provider import ModelProvider

PROJECT = "t2i"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    """Offer model providers (model families).

    Called once, the first time t2i needs its plugins (``load()``, ``t2i plugins``).

    :param register: call ``register(provider)`` with a `t2i_core.ModelProvider` instance
        for each family the plugin implements. The provider's ``name`` is the family name
        users pass as ``family=`` / ``--family``; it must be unique across plugins.
    """


@hookspec
def register_conditioners(register: Callable[[Conditioner], None]) -> None:
    """Offer conditioners: steps that turn parts of a request into pipeline arguments.

    Called once, the first time t2i needs its plugins.

    :param register: call ``register(conditioner)`` with a `t2i_core.Conditioner` instance.
        Conditioners run in ascending ``order`` for every request they ``wants()``.
    """


@hookspec
def register_accelerators(register: Callable[[Accelerator | Preset], None]) -> None:
    """Offer accelerators (dtype, attention, compile, memory savers, ...) and presets.

    Called once, the first time t2i needs its plugins.

    :param register: call ``register(accelerator)`` with a `t2i_core.Accelerator` instance,
        or ``register(preset)`` with a `t2i_core.Preset` naming a stack of accelerators.
        They are applied once per engine at load time, ordered by ``phase``.
    """
