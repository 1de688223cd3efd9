"""Developer sessions: ``nox -s tests lint typecheck docs``.

Sessions reuse the current environment (``python -m pip install -r requirements-dev.txt``)
instead of building a new one each time: torch alone is gigabytes.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, offline on CPU (slow and GPU tests are opt-in: nox -s tests -- -m slow)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "--diff", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Check the docs: every hook documented, generated family tables up to date, links resolve."""
    session.run("python", "-m", "pytest", "-q", "tests/test_docs.py")
