"""Every code example in README.md and docs/ runs: top to bottom per page, each page in a folder of its own.

The rules an author needs (docs/contributing.md says the same at more length):

- ``python`` blocks run in-process, in one namespace per page, so a page's later blocks see the
  names its earlier blocks made.
- ``bash`` blocks run command by command (``\\`` continues a line, ``#`` starts a comment):
  ``t2i ...`` through the CLI's own ``main()`` in-process (in a subprocess when it starts with
  ``NAME=value`` settings), and must exit 0; a few file commands (`SHELL_COMMANDS`) through
  bash, with ``HOME``, ``T2I_CACHE`` and ``HF_HOME`` pointing into the page's folder. Any other
  command is an error unless the block is marked. Install commands are checked, not run:
  ``pip install`` may name only a requirements file, a local project, a wheel of ``nox -s build``
  or a real index package (`docs_install`), and ``nox -s NAME`` a session of noxfile.py.
- ``console`` blocks: each ``$ `` line is such a command and the lines after it are its output
  (stdout and stderr, in order); ``...`` matches anything, alone on a line any number of lines.
  It must exit 0 unless the output shows an ``error:``.
- Other languages (``text``, ``toml``, ...) are shown, not run; an unlabelled or ``text`` block
  that holds a ``t2i`` command is refused, so no example hides from this test.
- Markers, an HTML comment on the line right before the fence (invisible on the site):
  ``<!-- docs-test: skip: REASON -->`` does not run the block;
  ``<!-- docs-test: t2i-only: REASON -->`` runs only the ``t2i`` commands of a bash block;
  ``<!-- docs-test: excerpt: PATH -->`` checks that the block's lines are lines of the file PATH
  (relative to the repository), in order, ``...`` standing for lines left out.
  ``<!-- docs-test: inputs FILE ... -->`` anywhere on a page makes stand-in images of those names
  in the page's folder first (the pose or photo a reader brings).
- `substitute` replaces what cannot run offline on a CPU in seconds: hub ids and aliases become
  ``tiny:`` checkpoints (`MODELS`, `ALIASES`, `VALUE_ALIASES`), the example folders (`FOLDERS`)
  the tiny checkpoints' folders, CUDA the CPU (``device="cuda"``, ``--device cuda``,
  ``.to("cuda")``), ``fp16`` and ``bf16`` ``fp32`` (also diffusers' ``torch_dtype=torch.float16``:
  a CPU emulates half precision, seconds per step), and step counts above `MAX_STEPS` become `MAX_STEPS`.
  While the pages run, every family's default step count is `DEFAULT_STEPS`, ``device="auto"``
  means the CPU, and torch uses one thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from docs_install import pip_problems

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|t2i-only|excerpt)\s*:\s*(.*?)\s*-->")
INPUTS = re.compile(r"<!--\s*docs-test:\s*inputs\s+(.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<lang>[\w+-]*)[^\n]*$")

#: Hub ids in the examples, and the tiny checkpoint each stands for while the docs run.
MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "tiny:sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "tiny:sdxl",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "tiny:sdxl-refiner",
    "kandinsky-community/kandinsky-2-2-decoder": "tiny:kandinsky22",
    "kandinsky-community/kandinsky-2-2-prior": "tiny:kandinsky22",
    "lllyasviel/sd-controlnet-openpose": "tiny:controlnet-sd15",
    "lllyasviel/sd-controlnet-canny": "tiny:controlnet-sd15",
    "thibaud/controlnet-openpose-sdxl-1.0": "tiny:controlnet-sdxl",
    "diffusers/controlnet-canny-sdxl-1.0": "tiny:controlnet-sdxl",
    "h94/IP-Adapter": "tiny:ip-adapter-sd15",  # the examples run it on SD 1.5
    "black-forest-labs/FLUX.1-dev": "tiny:flux",
    "black-forest-labs/FLUX.1-schnell": "tiny:flux",
    "stabilityai/stable-diffusion-3.5-large": "tiny:sd3",
    "stabilityai/stable-diffusion-3.5-medium": "tiny:sd3",
    "stabilityai/stable-diffusion-3.5-large-turbo": "tiny:sd3",
    "stabilityai/stable-diffusion-3-medium-diffusers": "tiny:sd3",
    "Tongyi-MAI/Z-Image-Turbo": "tiny:z-image",
}
#: Family aliases, as a model name (``load("sd15")``, ``--model sd15``) → their tiny stand-in.
ALIASES = {
    "sd15": "tiny:sd15",
    "sdxl": "tiny:sdxl",
    "kandinsky22": "tiny:kandinsky22",
    "flux": "tiny:flux",
    "sd3": "tiny:sd3",
    "z-image": "tiny:z-image",
    "flux-dev": "tiny:flux",
    "flux-schnell": "tiny:flux",
    "sd3.5-large": "tiny:sd3",
    "sd3.5-medium": "tiny:sd3",
    "sd3.5-large-turbo": "tiny:sd3",
    "z-image-turbo": "tiny:z-image",
}
#: Short names for hub ids that are only ever option values (``refiner=sdxl-refiner``) → their stand-in.
VALUE_ALIASES = {"sdxl-refiner": "tiny:sdxl-refiner", "kandinsky22-prior": "tiny:kandinsky22"}
#: Local folders the examples load (a reader's own checkpoint) → what stands in: ``tiny:<family>``'s
#: folder, or a folder of that name in the page's folder, made by an earlier example of the page.
FOLDERS = {
    "/models/my-sd15-finetune": "tiny:sd15",
    "/models/dreamshaper-8": "tiny:sd15",
    "/models/juggernaut-xl": "tiny:sdxl",
    "/models/my-kandinsky-combined": "tiny:kandinsky22",
    "/models/kandinsky-2-2-decoder": "tiny-decoder",
    "/models/kandinsky-2-2-prior": "tiny-prior",
}
MAX_STEPS = 4
DEFAULT_STEPS = 2
#: Commands other than ``t2i`` that bash blocks may run (through bash, sandboxed in the page's folder).
SHELL_COMMANDS = {"mkdir", "rm", "ls", "cp", "mv", "cat", "echo", "touch"}


@attrs.frozen
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: tuple[str, str] | None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page under docs/ (the example plugins' READMEs too), hidden folders aside."""
    found = (p for p in DOCS.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(DOCS).parts))
    return [ROOT / "README.md", *sorted(found)]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of `page`, with the marker comment right before each, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence = match["indent"], match["fence"]
        start, body = index, []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        index += 1
        previous = lines[start - 1] if start else ""
        marker = MARKER.search(previous)
        found.append(
            Block(page, start + 1, match["lang"].lower(), "\n".join(body) + "\n", marker.groups() if marker else None)
        )
    return found


def _fewer_steps(match: re.Match[str]) -> str:
    return match[1] + str(min(int(match[2]), MAX_STEPS))


def substitute(code: str, tiny_folder: Callable[[str], str]) -> str:
    """The example as the test runs it: offline, tiny and on the CPU (see the module docstring)."""
    for hub_id, tiny in MODELS.items():
        # Raw diffusers reads folders, not tiny: names.
        if tiny[5:] in ALIASES:
            pattern = rf"(from_pretrained\(\s*)([\"']){re.escape(hub_id)}\2"
            code = re.sub(pattern, lambda m, family=tiny[5:]: f'{m[1]}"{tiny_folder(family)}"', code)
    for hub_id, tiny in MODELS.items():
        code = code.replace(hub_id, tiny)
    for folder, stand_in in FOLDERS.items():
        if folder in code:
            code = code.replace(folder, tiny_folder(stand_in[5:]) if stand_in.startswith("tiny:") else stand_in)
    for alias, tiny in ALIASES.items():
        code = re.sub(rf"(?<=load\()([\"']){re.escape(alias)}\1", f'"{tiny}"', code)
        code = re.sub(rf"((?:--model|-m)\s+){re.escape(alias)}(?![\w:-])", rf"\g<1>{tiny}", code)
    for alias, tiny in VALUE_ALIASES.items():
        code = re.sub(rf"(?<![\w:/.-]){re.escape(alias)}(?![\w-])", tiny, code)
    code = re.sub(r"device=([\"'])cuda(:\d+)?\1", 'device="cpu"', code)
    # Half precision on a CPU is emulated: seconds per step even for a tiny model.
    code = re.sub(r"accelerators=[(\[][^)\]]*", lambda m: re.sub(r"([\"'])(?:fp|bf)16\1", '"fp32"', m[0]), code)
    code = re.sub(r"--accelerator\s+(?:fp|bf)16\b", "--accelerator fp32", code)
    code = re.sub(r"--device\s+cuda(:\d+)?", "--device cpu", code)
    # The raw diffusers side of a comparison, as a GPU user writes it.
    code = re.sub(r"torch_dtype=torch\.(?:b?float16|half)\b", "torch_dtype=torch.float32", code)
    code = re.sub(r"\.to\(([\"'])cuda(:\d+)?\1\)", '.to("cpu")', code)
    code = re.sub(r"(num_inference_steps[\"']?\s*[=:]\s*|--steps\s+)(\d+)", _fewer_steps, code)
    return code


# -- running -----------------------------------------------------------------------------------


class Page:
    """One page's run: its folder, its Python namespace, and what its commands printed."""

    def __init__(self, page: Path, folder: Path, tiny_folder: Callable[[str], str]) -> None:
        self.page = page
        self.folder = folder
        self.tiny_folder = tiny_folder
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}

    def run(self, block: Block) -> None:
        if block.marker and block.marker[0] == "excerpt":
            check_excerpt(block)
            return
        code = substitute(block.code, self.tiny_folder)
        if block.lang in ("python", "py"):
            self.python(block, code)
        elif block.lang in ("bash", "sh", "shell"):
            for line, command in commands(code):
                status, output = self.command(block, command)
                assert status == 0, f"{block.where()} (+{line}): `{command}` exited {status}:\n{output}"
        elif block.lang == "console":
            self.console(block, code)

    def python(self, block: Block, code: str) -> None:
        compiled = compile("\n" * (block.line) + code, str(block.page), "exec")
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            exec(compiled, self.namespace)

    def command(self, block: Block, command: str) -> tuple[int, str]:
        words = shlex.split(command, comments=True)
        settings = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            settings[key] = value
        if not words:
            return 0, ""
        if words[0] in ("pip", "nox") or words[:3] == ["python", "-m", "pip"]:
            return self.install(block, command, words)
        if words[0] == "t2i" and not settings and not re.search(r"[|&;<>`$]", command.split("#")[0]):
            return self.t2i(words[1:])
        if words[0] == "t2i":
            return self.shell(f"{sys.executable} -m t2i_core.cli {shlex.join(words[1:])}", settings)
        if block.marker and block.marker[0] == "t2i-only":
            return 0, ""
        assert words[0] in SHELL_COMMANDS, (
            f"{block.where()}: `{command}` is not a command the docs test runs "
            f"(t2i or {', '.join(sorted(SHELL_COMMANDS))}); mark the block (see docs/contributing.md)"
        )
        return self.shell(command, settings)

    def install(self, block: Block, command: str, words: list[str]) -> tuple[int, str]:
        """Checked, not run: what a ``pip install`` names exists (docs_install), a ``nox -s`` session too."""
        if words[0] == "nox":
            sessions = words[words.index("-s") + 1 :] if "-s" in words else []
            noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
            for session in sessions:
                assert f"def {session}(" in noxfile, (
                    f"{block.where()}: `{command}`: noxfile.py has no session {session}"
                )
            return 0, ""
        problems = pip_problems(command, self.page)
        assert not problems, f"{block.where()}: `{command}`: " + "; ".join(problems)
        return 0, ""

    def t2i(self, argv: list[str]) -> tuple[int, str]:
        from t2i_core.cli import main

        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            status = main(argv)
        return status, output.getvalue()

    def shell(self, command: str, settings: dict[str, str]) -> tuple[int, str]:
        env = {
            **os.environ,
            "HOME": str(self.folder),
            "T2I_CACHE": os.environ["T2I_CACHE"] if "t2i_core.cli" in command else str(self.folder / "cache"),
            "HF_HOME": str(self.folder / "huggingface"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **settings,
        }
        env.pop("XDG_CACHE_HOME", None)
        done = subprocess.run(
            ["bash", "-c", command], cwd=self.folder, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        return done.returncode, done.stdout + done.stderr

    def console(self, block: Block, code: str) -> None:
        for line, command, expected in sessions(code):
            status, output = self.command(block, command)
            shows_error = any("error:" in text for text in expected)
            where = f"{block.where()} (+{line}): `{command}`"
            assert (status != 0) == shows_error, f"{where} exited {status}:\n{output}"
            assert matches(expected, output), f"{where} printed\n{output}\nwhich the page shows as\n" + "\n".join(
                expected
            )


def check_excerpt(block: Block) -> None:
    """An excerpt's lines are in its file, in order; ``...`` (alone on a line) skips any lines of the file."""
    assert block.marker is not None
    source = ROOT / block.marker[1]
    assert source.is_file(), f"{block.where()}: the excerpt's file {block.marker[1]} does not exist"
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    position = 0
    segments: list[list[str]] = [[]]
    for line in block.code.splitlines():
        if line.strip() in ("...", "# ..."):
            segments.append([])
        elif line.strip():
            segments[-1].append(line.strip())
    for segment in filter(None, segments):
        found = next(
            (i for i in range(position, len(lines) - len(segment) + 1) if lines[i : i + len(segment)] == segment), None
        )
        assert found is not None, (
            f"{block.where()}: this excerpt is not in {block.marker[1]} (from its line {segment[0]!r}); "
            "copy it again from the file"
        )
        position = found + len(segment)


def commands(code: str) -> Iterator[tuple[int, str]]:
    """(line, command) for each command of a shell block: continuations joined, blank lines skipped."""
    pending, first = "", 0
    for number, line in enumerate(code.splitlines()):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            yield first, command


def sessions(code: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, command, expected output lines) for each ``$ `` command of a console block."""
    current: list[Any] | None = None
    for number, line in enumerate(code.splitlines()):
        if line.startswith("$ "):
            if current:
                yield tuple(current)  # type: ignore[misc]
            current = [number, line[2:], []]
        elif current is not None and current[2] == [] and current[1].rstrip().endswith("\\"):
            current[1] = current[1].rstrip()[:-1] + " " + line.strip()
        elif current is not None:
            current[2].append(line.rstrip())
    if current:
        yield tuple(current)  # type: ignore[misc]


def matches(expected: list[str], output: str) -> bool:
    """Whether `output` is what `expected` shows, ``...`` matching anything."""
    pattern = ""
    for line in expected:
        if line.strip() == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += ".*?".join(re.escape(part) for part in line.split("...")) + r"[ \t]*\n"
    actual = "".join(line.rstrip() + "\n" for line in output.splitlines())
    return re.fullmatch(pattern, actual) is not None


def stand_in_image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = np.zeros((96, 96, 3), np.uint8)
    pixels[20:76, 30:66] = rng.integers(120, 255, size=3, dtype=np.uint8)  # a figure on a dark ground
    Image.fromarray(pixels).save(path)


@contextlib.contextmanager
def docs_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Few steps, the CPU, one torch thread, and the process's warning and logging state restored afterwards."""
    from t2i_core import get_registry
    from t2i_core.engine import loading, sources

    registry = get_registry()
    for provider in registry.providers.values():
        monkeypatch.setattr(provider, "defaults", attrs.evolve(provider.defaults, num_inference_steps=DEFAULT_STEPS))
        fewer = [
            attrs.evolve(o, default=DEFAULT_STEPS) if o.name.endswith("num_inference_steps") else o
            for o in provider.options
        ]
        monkeypatch.setattr(provider, "options", tuple(fewer))
    real_resolve = sources.resolve_device
    monkeypatch.setattr(loading, "resolve_device", lambda device: real_resolve("cpu" if device == "auto" else device))
    t2i_logger = logging.getLogger("t2i")
    handlers, propagate = list(t2i_logger.handlers), t2i_logger.propagate
    plugins = set(registry.plugins)
    # One thread: tiny models gain nothing from two, and lose much when other processes share the cores.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            yield
    finally:
        torch.set_num_threads(threads)
        t2i_logger.handlers[:], t2i_logger.propagate = handlers, propagate
    assert set(get_registry().plugins) == plugins, "a page left plugins registered: unregister them in the example"


@pytest.fixture(scope="module")
def tiny_folder() -> Callable[[str], str]:
    from support import tiny_folder as build

    return build


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_examples_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_folder: Callable[[str], str]
) -> None:
    text = page.read_text(encoding="utf-8")
    for names in INPUTS.findall(text):
        for name in names.split():
            stand_in_image(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    run = Page(page, tmp_path, tiny_folder)
    started = time.perf_counter()
    with docs_run(monkeypatch):
        for block in blocks(page):
            if block.marker and block.marker[0] == "skip":
                continue
            block_started = time.perf_counter()
            run.run(block)
            print(f"  {block.where()}: {time.perf_counter() - block_started:.1f} s")
    print(f"{page.relative_to(ROOT)}: {time.perf_counter() - started:.1f} s")


def test_no_example_hides_in_an_unlabelled_block() -> None:
    for page in pages():
        for block in blocks(page):
            if block.lang in ("", "text"):
                # A usage synopsis (``t2i generate PROMPT [--seed S]``) is not a command.
                lines = block.code.splitlines()
                synopsis = re.compile(r"\[|\b[A-Z]{3,}\b")  # [--flag], PROMPT, COMMAND
                commands_shown = [
                    line for line in lines if re.match(r"(\$ )?t2i\s", line) and not synopsis.search(line)
                ]
                assert not commands_shown, (
                    f"{block.where()}: a command in a block the docs test does not run ({commands_shown[0]!r}); "
                    "label it bash (commands) or console (commands with their output)"
                )


def test_skips_are_few_and_say_why() -> None:
    skipped = [(block.where(), block.marker[1]) for page in pages() for block in blocks(page) if block.marker]
    for where, reason in skipped:
        assert len(reason) >= 10, f"{where}: say why the block does not run"
    skips = [1 for page in pages() for block in blocks(page) if block.marker and block.marker[0] == "skip"]
    assert len(skips) <= 15, "too many examples do not run: an excerpt of a file is marked excerpt, not skip"


def test_substitutions() -> None:
    def folder(family: str) -> str:
        return f"/cache/{family}"

    assert substitute('load("sd15", device="cuda")', folder) == 'load("tiny:sd15", device="cpu")'
    assert substitute('load("sdxl", accelerators=["fp16", "sdpa"])', folder) == (
        'load("tiny:sdxl", accelerators=["fp32", "sdpa"])'
    )
    assert substitute("--accelerator bf16 --accelerator sdpa", folder) == "--accelerator fp32 --accelerator sdpa"
    assert substitute('X.from_pretrained("m", torch_dtype=torch.float16).to("cuda")', folder) == (
        'X.from_pretrained("m", torch_dtype=torch.float32).to("cpu")'
    )
    assert substitute("--model sdxl --option refiner=sdxl-refiner --steps 40", folder) == (
        "--model tiny:sdxl --option refiner=tiny:sdxl-refiner --steps 4"
    )
    assert substitute('load("stabilityai/stable-diffusion-xl-base-1.0")', folder) == 'load("tiny:sdxl")'
    assert substitute('family="sd15"', folder) == 'family="sd15"'
    assert substitute('{"prior": "kandinsky22-prior"}', folder) == '{"prior": "tiny:kandinsky22"}'
    assert substitute('load("/models/juggernaut-xl")', folder) == 'load("/cache/sdxl")'
    assert substitute('X.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")', folder) == (
        'X.from_pretrained("/cache/sd15")'
    )
    assert substitute('num_inference_steps=2, options={"prior_num_inference_steps": 25}', folder) == (
        'num_inference_steps=2, options={"prior_num_inference_steps": 4}'
    )
    assert substitute("--option prior_num_inference_steps=30 --steps 3", folder) == (
        "--option prior_num_inference_steps=4 --steps 3"
    )
    assert matches(["a.png  (seed ...)", "..."], "a.png  (seed 3)\nb\nc\n")
    assert not matches(["a.png  (seed 3)"], "a.png  (seed 4)\n")


def test_an_excerpt_must_match_its_file() -> None:
    def excerpt(code: str) -> Block:
        return Block(ROOT / "README.md", 1, "toml", code, ("excerpt", "pyproject.toml"))

    check_excerpt(excerpt('[project]\nname = "t2i-core"\n...\n[project.scripts]\n'))
    with pytest.raises(AssertionError, match="is not in pyproject.toml"):
        check_excerpt(excerpt('[project]\nname = "t2i-kore"\n'))
    with pytest.raises(AssertionError, match="is not in pyproject.toml"):
        check_excerpt(excerpt("[project.scripts]\n...\n[project]\n"))  # out of order
