"""``t2i`` subcommands from plugins: the ``cli`` object that the `register_commands` hook receives.

A plugin declares a subcommand with ``cli.command(name, run=..., help=...)`` and adds its
arguments to the `argparse.ArgumentParser` it gets back; the ``t2i`` command line runs
``run(args)`` when the user types ``t2i NAME``. Nothing here imports more than `argparse`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import attrs

from .errors import PluginError

#: a subcommand's name: lower-case words joined by hyphens (``serve``, ``export-onnx``)
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

#: ``run(args)``: the exit status (None = 0); a `T2IError` it raises is one line on stderr, exit 2
RunCommand = Callable[[argparse.Namespace], "int | None"]


@attrs.frozen(kw_only=True)
class Command:
    """A ``t2i`` subcommand a plugin registered: its name, its arguments and what runs it."""

    name: str
    help: str
    description: str | None
    #: the command's arguments, as the plugin declared them (the CLI adds ``--help``)
    parser: argparse.ArgumentParser
    run: RunCommand


class Commands:
    """The ``cli`` argument of `register_commands`: declare ``t2i`` subcommands with `command`."""

    def __init__(self, register: Callable[[Command], None], plugin: str) -> None:
        self._register = register
        self._plugin = plugin

    def command(
        self, name: str, *, run: RunCommand, help: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        """Declare ``t2i NAME`` and return its `argparse.ArgumentParser`, to add arguments to.

        `run` is called with the parsed arguments (an `argparse.Namespace`) when the user runs
        the command; it returns the exit status (``None`` means 0) and may raise a `T2IError`,
        which the CLI prints as one line (exit 2). `help` is its line in ``t2i --help``;
        `description` heads ``t2i NAME --help`` (default: `help`). Import heavy libraries
        inside `run`: ``t2i --help`` builds every command's parser.
        """
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(self._plugin, f"command name {name!r} is not lower-case words joined by hyphens")
        if not callable(run):
            raise PluginError(self._plugin, f"command {name!r}: run={run!r} is not callable")
        parser = argparse.ArgumentParser(prog=f"t2i {name}", description=description or help, add_help=False)
        self._register(Command(name=name, help=help, description=description, parser=parser, run=run))
        return parser
