"""``t2i plugin new``: each role's package installs, registers, and passes its own conformance tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2i_core.cli import main
from t2i_core.cli.template import ROLES

HEAVY = ("torch", "diffusers", "transformers")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=900
    )


def test_each_role_installs_and_passes_its_generated_tests(tmp_path: Path) -> None:
    """The generated packages are pip-installed (into a folder of their own) and their tests run as written."""
    folders = []
    for role in ROLES:
        assert main(["plugin", "new", f"demo-{role}", "--role", role, "--dir", str(tmp_path)]) == 0
        folder = tmp_path / f"t2i-demo-{role}"
        assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {
            "pyproject.toml",
            "README.md",
            f"t2i_demo_{role}/__init__.py",
            f"tests/test_t2i_demo_{role}.py",
        }
        folders.append(str(folder))
    site = tmp_path / "site"
    install = run("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), *folders)
    assert install.returncode == 0, install.stderr
    env = {"PYTHONPATH": str(site), "T2I_TEST_CACHE": os.environ["T2I_CACHE"], "HF_HUB_OFFLINE": "1"}

    listed = run("-m", "t2i_core.cli", "plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    for role in ROLES:
        assert plugins[f"demo-{role}"]["registers"] == [f"{role}:demo-{role}"]
        assert plugins[f"demo-{role}"]["error"] is None and plugins[f"demo-{role}"]["source"] == "third-party"

    tests = [f"{folder}/tests" for folder in folders]
    result = run(
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::DeprecationWarning",
        *tests,
        env=env,
        cwd=tmp_path,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:]
    assert "failed" not in summary and "error" not in summary, summary
    # Every conformance class ran (a role whose tests were not collected would still exit 0).
    assert int(summary.split(" passed")[0].split()[-1]) >= 30, summary


@pytest.mark.parametrize("role", ROLES)
def test_the_test_extra_installs_what_the_kits_cross_family_tests_need(role: str, tmp_path: Path) -> None:
    """The ``test`` extra brings t2i's test kit and the shipped plugins its cross-family tests run against."""
    import tomllib

    from t2i_core import get_registry

    assert main(["plugin", "new", f"extra-{role}", "--role", role, "--dir", str(tmp_path)]) == 0
    project = tomllib.loads((tmp_path / f"t2i-extra-{role}" / "pyproject.toml").read_text(encoding="utf-8"))
    extra = project["project"]["optional-dependencies"]["test"]
    assert "t2i-core[testing]" in extra
    registry = get_registry()
    offered = [item for info in registry.plugins.values() if info.distribution in extra for item in info.registered]
    families = [item.partition(":")[2] for item in offered if item.startswith("provider:")]
    restricted = [
        name
        for kind, _, name in (item.partition(":") for item in offered)
        if kind == "conditioner" and registry.conditioners[name].families is not None
    ]
    assert "sd15" in families, extra  # tiny:sd15: what conditioner and accelerator kits run on
    if role == "provider":  # a shipped family it must not claim, a conditioner restricted to other families
        assert restricted, extra
    if role == "conditioner":  # a family outside a restricted conditioner's families
        assert len(families) >= 2, extra


def test_an_existing_folder_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "t2i-mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["plugin", "new", "mine", "--role", "conditioner", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; nothing was written" in err
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["Mine"], "NAME='Mine' is not allowed: expected a lowercase name"),
        (["my family"], "NAME='my family' is not allowed"),
        (
            ["a" * 300],
            "is not allowed: expected a lowercase name of letters and digits, words joined by - or _, at most 64",
        ),
        (["sd15"], "NAME='sd15' is not allowed: expected a provider name no installed plugin registers yet"),
        (["fp16", "--role", "accelerator"], "'fp16' is taken"),
        (["x", "--role", "painter"], "argument --role: invalid choice: 'painter'"),
        (["x", "--dir", "/no/such/folder"], "--dir='/no/such/folder' is not allowed: expected an existing folder"),
    ],
)
def test_bad_names_and_roles_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    if "--role" not in argv:
        argv = [*argv, "--role", "provider"]
    assert main(["plugin", "new", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_plugin_new_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom t2i_core.cli import main\n"
        f"assert main(['plugin', 'new', 'light', '--role', 'provider', '--dir', {str(tmp_path)!r}]) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
