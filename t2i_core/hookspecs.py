"""The t2i hook specifications: one collector hook per plugin role.

A plugin is a module (or object) with functions marked ``@t2i_core.hookimpl`` whose names
match the specs below. Each hook hands the plugin a ``register`` callback (``register_commands``
a ``cli`` object); a plugin calls it once per thing it offers. Registering must stay cheap: no torch, diffusers or transformers
import happens here, only when a model is loaded or an image generated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .accelerator import Accelerator, Preset
    from .command import Commands
    from .conditioner import Conditioner
    from .executor import Executor
    from .provider import ModelProvider

PROJECT = "t2i"

hookspec = pluggy.HookspecMarker(PROJECT)
"""Marks a hook specification of the ``t2i`` project (used in this module; plugins need `hookimpl`)."""
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a plugin's hook implementation: ``@t2i_core.hookimpl`` on a function named after a hook."""


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


@hookspec
def register_executors(register: Callable[[Executor], None]) -> None:
    """Offer batch executors: where the jobs of ``t2i batch`` / `t2i_core.run_batch` run.

    Called once, the first time t2i needs its plugins.

    :param register: call ``register(executor)`` with a `t2i_core.Executor` instance. Its
        ``name`` is what users pass as ``--executor`` / ``executor=``; it must be unique across
        plugins (t2i-core registers ``local``, t2i-ray ``ray``). Import the executor's own
        libraries (a cluster client) in its ``run``, not at module level.
    """


@hookspec
def register_commands(cli: Commands) -> None:
    """Offer ``t2i`` subcommands (``t2i serve`` comes from the t2i-server plugin this way).

    Called once, the first time t2i needs its plugins; the ``t2i`` command line needs them to
    build its parser, so this runs for every ``t2i`` command, ``t2i --help`` included: keep it
    to declaring arguments.

    :param cli: a `t2i_core.Commands`; call ``cli.command(name, run=..., help=...)`` once per
        subcommand. It returns the command's `argparse.ArgumentParser`, to add arguments to;
        ``run(args)`` gets the parsed arguments when the user runs ``t2i NAME`` and returns the
        exit status. A name must be unique across plugins and not one of t2i's own commands.
    """


#: Every hook of t2i, in the order a plugin's hooks are called when it registers: the one list the
#: registry, the docs generator and the tests read.
HOOK_NAMES: tuple[str, ...] = (
    register_providers.__name__,
    register_conditioners.__name__,
    register_accelerators.__name__,
    register_executors.__name__,
    register_commands.__name__,
)
