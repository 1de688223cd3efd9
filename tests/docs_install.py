"""What an install command in the docs may name, checked without installing anything.

Nothing of t2i is published on a package index, so a ``pip install`` line may name: a
requirements file of the repository (``-r requirements.txt``), a local project (``-e .``,
``-e plugins/server``, a folder the page itself makes such as ``-e ./t2i-pixart-sigma``), a wheel
that ``nox -s build`` writes (``dist/t2i_core-0.1.0-py3-none-any.whl``), or a package that is
really on PyPI (`INDEX_PACKAGES`). Used by tests/test_docs_install.py (every line of every page)
and tests/test_doc_examples.py (which checks the install commands of a page instead of running them).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

#: Packages on PyPI that pages tell readers to install (each exists there under this name).
INDEX_PACKAGES = {"torch", "gguf", "torchsde", "build"}
#: pip options that take a value (the value is no package).
OPTIONS_WITH_VALUE = {"--index-url", "--extra-index-url", "-i", "-c", "--constraint", "--target", "-t"}


def local_projects() -> dict[str, Path]:
    """Distribution name (``t2i-core``, ``t2i-sd15``...) → its folder, for the repository's projects."""
    found = {}
    for pyproject in [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        found[project["name"]] = pyproject.parent
    return found


def _wheel_problem(argument: str) -> str | None:
    match = re.fullmatch(r"dist/([A-Za-z0-9_]+)-([^-]+)-py3-none-any\.whl", argument)
    if match is None:
        return f"{argument!r} is not a wheel that nox -s build writes (dist/NAME-VERSION-py3-none-any.whl)"
    projects = {name.replace("-", "_"): folder for name, folder in local_projects().items()}
    folder = projects.get(match[1])
    if folder is None:
        return f"{argument!r}: no project of this repository builds a wheel named {match[1]}"
    version = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    if match[2] != version:
        return f"{argument!r}: {folder.relative_to(ROOT)} is version {version}"
    return None


def _path_problem(argument: str, page: Path | None) -> str | None:
    path = re.sub(r"\[[\w,-]+\]$", "", argument.strip("\"'"))  # an extra: ".[testing]"
    for base in (ROOT, page.parent if page else ROOT):
        if (base / path).is_dir():
            if not (base / path / "pyproject.toml").is_file():
                return f"{argument!r} is a folder without a pyproject.toml"
            return None
    # A folder the reader makes on the page (t2i plugin new, the tutorial): not in the repository.
    if path.startswith(("plugins/", "docs/")) or path in (".", ""):
        return f"{argument!r} does not exist in the repository"
    return None


def pip_problems(command: str, page: Path | None = None) -> list[str]:
    """What is wrong with a ``pip install ...`` command (an empty list: nothing)."""
    words = shlex.split(command, comments=True)
    while words and words[0] in ("python", "python3", "-m"):
        words.pop(0)
    if words[:2] != ["pip", "install"]:
        return []
    problems: list[str] = []
    arguments = iter(words[2:])
    for word in arguments:
        if word in ("&&", ";", "|"):
            break
        if word in ("-r", "--requirement"):
            name = next(arguments, "")
            if not (ROOT / name).is_file():
                problems.append(f"-r {name}: no such file in the repository")
        elif word in ("-e", "--editable"):
            problem = _path_problem(next(arguments, ""), page)
            if problem:
                problems.append(problem)
        elif word in OPTIONS_WITH_VALUE:
            next(arguments, None)
        elif word.startswith("-"):
            continue
        elif word.startswith("dist/"):
            problem = _wheel_problem(word)
            if problem:
                problems.append(problem)
        elif "/" in word or word.startswith("."):
            problem = _path_problem(word, page)
            if problem:
                problems.append(problem)
        else:
            name = re.split(r"[\[<>=!~ ]", word, maxsplit=1)[0].lower()
            if name not in INDEX_PACKAGES:
                published = "" if name not in local_projects() else " (a project of this repository: -e its folder)"
                problems.append(f"{word!r} is not a package on the index{published}")
    return problems


def install_commands(text: str) -> list[str]:
    """Every ``pip install`` command of a page's text: in code blocks and in inline code, lines joined."""
    found = []
    fence = re.compile(r"^[ \t]*```[\w-]*[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
    for block in fence.findall(text):
        block = re.sub(r"\\\n\s*", " ", block)  # a command continued over lines with a backslash
        found += re.findall(r"(?:python -m )?pip install[^\n]*", block)
    for span in re.findall(r"`([^`]+)`", fence.sub("", text)):  # inline code, which may wrap over lines
        found += re.findall(r"(?:python -m )?pip install[^`]*", " ".join(span.split()))
    return [command.strip() for command in found if command.strip() != "pip install"]
