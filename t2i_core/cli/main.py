"""The ``t2i`` command line: the top parser, dispatch to the registered commands, exit statuses.

Every subcommand, t2i-core's own (`t2i_core.cli.commands`) and the plugins' (``t2i serve``),
is registered through `register_commands`. Exit status: 0 success, 2 a bad argument or request
(one line on stderr, never a traceback), 1 an unforeseen failure (one line; ``T2I_DEBUG=1`` for
the traceback), 130 interrupted; a command may return others (``t2i batch``: 3).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import T2IError
from .args import EXIT_USAGE, Parser, UsageError
from .logs import scoped_output

if TYPE_CHECKING:
    from ..command import Command

_HELP_FLAGS = frozenset({"-h", "--help", "--version"})


def build_parser(commands: Mapping[str, Command], epilog: str | None = None) -> Parser:
    """The ``t2i`` parser with a subcommand per registered command, in registration order."""
    from .. import __version__

    parser = Parser(prog="t2i", description="Text-to-image generation with pluggable model families.", epilog=epilog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for name, command in commands.items():
        parents: list[Any] = [command.parser]  # a plain ArgumentParser; its arguments join a Parser
        subparsers.add_parser(name, help=command.help, description=command.description or command.help, parents=parents)
    return parser


def registered_commands() -> tuple[dict[str, Command], list[str], str | None]:
    """The registered commands, the plugins that failed to load, and the strict-mode error.

    Loading the plugins here never fails the command line: a plugin that broke is listed (and
    ``t2i plugins`` says why); with ``T2I_STRICT_PLUGINS`` set, the error is returned for `main`.
    """
    import warnings

    from ..registry import PluginWarning, get_registry

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # t2i plugins lists them
            registry = get_registry()
    except T2IError as exc:
        return {}, [], str(exc)
    return dict(registry.commands), [info.name for info in registry.failures()], None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 a bad argument or request).

    Warnings and log records print as one line each only while it runs: afterwards the
    process's warning and logging settings are as they were.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    with scoped_output():
        return _run(argv)


def _run(argv: list[str]) -> int:
    commands, broken, strict_error = registered_commands()
    epilog: str | None = None
    if strict_error is not None:
        if not _HELP_FLAGS & set(argv):
            print(f"t2i: error: {strict_error}", file=sys.stderr)
            return EXIT_USAGE
        epilog = f"no command is available: {strict_error}"
    elif broken:
        epilog = f"plugins that failed to load: {', '.join(broken)} (t2i plugins says why)"
    try:
        args = build_parser(commands, epilog).parse_args(argv)
    except SystemExit as exit_:  # argparse: --help, --version, or a usage error already printed
        return int(exit_.code or 0)
    try:
        status = commands[args.command].run(args)
        return 0 if status is None else int(status)
    except UsageError as exc:
        print(f"t2i: error: {exc} (see t2i --help)", file=sys.stderr)
        return EXIT_USAGE
    except T2IError as exc:
        print(f"t2i: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("t2i: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:
        # A failure t2i did not foresee: still one line, unless the user asks for the traceback.
        if os.environ.get("T2I_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"t2i: internal error: {type(exc).__name__}: {first} (set T2I_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1


def console_main() -> None:
    """The ``t2i`` executable (``[project.scripts]``): `main` on ``sys.argv``, then exit with its status."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `t2i plugins | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    raise SystemExit(code)
