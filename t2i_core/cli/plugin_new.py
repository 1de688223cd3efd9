"""``t2i plugin new NAME --role ROLE``: write a working plugin package from the template (`.template`)."""

from __future__ import annotations

import argparse

from .args import Parser

HELP = "tools for plugin authors"
DESCRIPTION = "Tools for plugin authors."


def add_arguments(plugin: argparse.ArgumentParser) -> None:
    commands = plugin.add_subparsers(dest="plugin_command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    new = commands.add_parser(
        "new",
        help="write a new plugin package (pyproject, module, README, tests) from a template",
        description="Write t2i-NAME/: a working plugin package whose tests run the conformance kit.",
    )
    new.add_argument("name", metavar="NAME", help="the plugin's name: family, conditioner or accelerator name")
    new.add_argument(
        "--role",
        required=True,
        choices=("provider", "conditioner", "accelerator"),
        help="what the plugin registers: a model family, a conditioner or an accelerator",
    )
    new.add_argument("--dir", default=".", metavar="DIR", help="the folder to write t2i-NAME/ into (default: here)")


def run(args: argparse.Namespace) -> int:
    from .template import create

    folder = create(args.name, args.role, args.dir)
    print(f"wrote {folder}/ ({args.role} plugin); next:")
    print(f'  python -m pip install -e "{folder}[test]" && python -m pytest {folder}')
    return 0
