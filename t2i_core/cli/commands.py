"""t2i-core's own subcommands, registered through `register_commands` like any plugin's.

This module is the built-in plugin of the ``t2i`` entry point ``commands``: since built-ins load
first, a plugin's command of the same name is refused by precedence.
"""

from __future__ import annotations

from ..command import Commands
from ..hookspecs import hookimpl
from . import batch, generate, plugin_new, plugins, warmup

#: ``t2i NAME``: the module that declares its arguments (`add_arguments`) and runs it (`run`).
COMMANDS = {
    "generate": generate,
    "plugins": plugins,
    "warmup": warmup,
    "plugin": plugin_new,
    "batch": batch,
}


@hookimpl
def register_commands(cli: Commands) -> None:
    for name, command in COMMANDS.items():
        parser = cli.command(name, run=command.run, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(parser)
