"""Developer sessions: ``nox -s tests lint typecheck docs``, and ``nox -s build`` for wheels.

Sessions reuse the current environment (``python -m pip install -r requirements-dev.txt``)
instead of building a new one each time: torch alone is gigabytes.
"""

from __future__ import annotations

from pathlib import Path

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
    """Build the site strictly into site/, then the docs tests: generated pages current, examples run."""
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"})
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "tests/test_docs.py",
        "tests/test_docs_site.py",
        "tests/test_doc_examples.py",
        *session.posargs,
    )


@nox.session
def build(session: nox.Session) -> None:
    """A wheel of t2i-core and of every plugin in plugins/, into dist/ (``pip install dist/t2i_core-*.whl ...``).

    Built with the environment's setuptools (no download); the wheels hold no dependencies:
    pip installs those from the index when it installs the wheels.
    """
    plugins = sorted(str(p.parent) for p in Path("plugins").glob("*/pyproject.toml"))
    session.run(
        "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", "dist", ".", *plugins
    )
