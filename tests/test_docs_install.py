"""The install paths the docs give are true: from a checkout, per role, and from wheels.

Nothing of t2i is on a package index, so no page may say ``pip install t2i-sd15``. These tests
check every ``pip install`` line of README.md and docs/ (tests/docs_install.py says what a line
may name), let pip resolve the local projects they name (``--dry-run``, nothing installed), and
build the core's wheel to check that it holds, and imports, every package of t2i_core.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from docs_install import ROOT, install_commands, local_projects, pip_problems

DOCS = ROOT / "docs"
#: Plugins that requirements.txt leaves to their own install: heavy, and only some applications need them.
ROLE_ONLY = {"plugins/quantize", "plugins/ray"}
DEV_TOOLS = {"pytest", "hypothesis", "nox", "ruff", "mypy", "mkdocs", "mkdocs-material", "mkdocstrings"}


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_every_install_line_names_only_what_exists() -> None:
    commands = 0
    for page in _pages():
        for command in install_commands(page.read_text(encoding="utf-8")):
            commands += 1
            problems = pip_problems(command, page)
            assert not problems, f"{page.relative_to(ROOT)}: `{command}`: " + "; ".join(problems)
    assert commands >= 15


def test_the_check_refuses_what_is_not_published() -> None:
    assert pip_problems("pip install t2i-core t2i-sd15")  # not on the index
    assert pip_problems('python -m pip install "t2i-core[testing]"')
    assert pip_problems("python -m pip install -e plugins/no-such-plugin")
    assert pip_problems("python -m pip install -r requirements-nothing.txt")
    assert pip_problems("python -m pip install dist/t2i_core-9.9.9-py3-none-any.whl")  # not the version built
    assert pip_problems("python -m pip install dist/t2i_nothing-0.1.0-py3-none-any.whl")
    assert not pip_problems("python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert not pip_problems('python -m pip install -e ".[testing]" -e plugins/server -r requirements.txt')


def test_requirements_txt_is_an_application_without_the_dev_tools() -> None:
    app, dev = _requirements("requirements.txt"), _requirements("requirements-dev.txt")
    torch = [line for line in dev if line.startswith("torch==")]
    assert torch and torch[0] in app, "requirements.txt pins torch as requirements-dev.txt does"
    assert "-e ." in app
    editable = {line[3:] for line in app if line.startswith("-e ")}
    for path in editable:
        assert (ROOT / path / "pyproject.toml").is_file(), f"requirements.txt: -e {path} is no project"
    names = {re.split(r"[\[<>=! ]", line, maxsplit=1)[0].lower() for line in app if not line.startswith("-")}
    assert not names & DEV_TOOLS, f"requirements.txt installs development tools: {sorted(names & DEV_TOOLS)}"
    dev_plugins = {line[3:].split("[")[0] for line in dev if line.startswith("-e plugins/")}
    missing = dev_plugins - editable - ROLE_ONLY
    assert not missing, f"requirements.txt lacks shipped plugins: {sorted(missing)} (or list them in ROLE_ONLY)"
    assert not editable & ROLE_ONLY


def test_pip_resolves_every_local_project_the_docs_name() -> None:
    """``pip install --dry-run`` reads each project's metadata: a broken pyproject.toml fails here."""
    folders = sorted({str(folder.relative_to(ROOT)) or "." for folder in local_projects().values()})
    editables = [arg for folder in folders for arg in ("-e", folder)]
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [*pip, "-r", "requirements.txt", *editables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in local_projects():
        assert f"{name}-" in done.stdout, f"pip would not install {name}:\n{done.stdout[-2000:]}"


def test_the_core_wheel_holds_and_imports_every_package(tmp_path: Path) -> None:
    """What ``nox -s build`` makes of t2i-core: every package of t2i_core in the wheel, importable from it."""
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path)]
    done = subprocess.run([*build, "."], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("t2i_core-*.whl")
    packages = sorted(
        str(init.parent.relative_to(ROOT)).replace(os.sep, ".") for init in (ROOT / "t2i_core").rglob("__init__.py")
    )
    names = zipfile.ZipFile(wheel).namelist()
    for package in packages:
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"the wheel lacks {package}"
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    script = f"import importlib, t2i_core; [importlib.import_module(p) for p in {packages!r}]; print(t2i_core.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(target)), f"imported {done.stdout.strip()}, not the wheel's"


def test_nox_builds_a_wheel_of_every_plugin() -> None:
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    assert "def build(" in noxfile and 'Path("plugins").glob("*/pyproject.toml")' in noxfile
