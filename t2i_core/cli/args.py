"""What every ``t2i`` command shares: the one-line usage error, argument types and ``KEY=VALUE`` lists."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..errors import InvalidRequestError, T2IError

#: The exit status of a bad argument or request: one line on stderr, nothing done.
EXIT_USAGE = 2


class UsageError(T2IError):
    """A command line that cannot run as given (e.g. a required argument missing); exit status 2."""


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"t2i: error: {message} (see t2i --help)\n")


def integer(text: str) -> int:
    """An argparse type; argparse names the flag (``argument --steps: 'x' is not allowed: ...``)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected an integer") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected a number") from None


def key_values(items: list[str], flag: str, what: str) -> dict[str, str]:
    """``KEY=VALUE`` items of a repeatable flag (``--option``) as a dict; later keys win."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequestError(flag, item, what)
        values[key.strip()] = value
    return values
