"""The first hour: what a new user meets before anything works, said at the moment it matters.

Half precision on a CPU warns with its cost; a first tiny build says it is building; the progress
bar's total is the steps the pipeline runs from the first frame; a batch rerun with nothing left
to make answers at once, without importing torch. (The hub's offline hint: tests/test_hub_messages.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from support import run_cli

from t2i_core import load
from t2i_core.cli.logs import scoped_output


class _Terminal:
    """A stand-in for an interactive stderr."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_half_precision_on_a_cpu_warns_once_with_its_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    from t2i_core.builtins import accelerators

    monkeypatch.setattr(accelerators, "_warned_on_cpu", set())  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load("tiny:sd15", device="cpu", accelerators=["fp16"], cache=False)
        load("tiny:sd15", device="cpu", accelerators=["fp16"], cache=False)
    slow = [str(w.message) for w in caught if "on a CPU is slow" in str(w.message)]
    assert len(slow) == 1, slow
    assert slow[0].startswith("fp16 on a CPU is slow") and "20 times" in slow[0] and "fp32" in slow[0]


def test_fp32_and_the_auto_preset_on_a_cpu_say_nothing() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load("tiny:sd15", device="cpu", cache=False)
        load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)
    assert not [w for w in caught if "on a CPU is slow" in str(w.message)]


def test_a_first_tiny_build_says_so_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from t2i_core.tiny.cache import ensure_built

    monkeypatch.setenv("T2I_CACHE", str(tmp_path))

    def build(folder: Path) -> None:
        (folder / "model_index.json").write_text("{}")

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with scoped_output():
        ensure_built("demo", 1, build)
        ensure_built("demo", 1, build)  # cached: nothing to say
    notes = [chunk for chunk in terminal.chunks if "building" in chunk]
    assert len(notes) == 1 and notes[0].startswith("t2i: building tiny:demo (first use"), terminal.chunks
    monkeypatch.undo()
    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    with scoped_output():  # a script's stderr: as quiet as before
        ensure_built("other", 1, build)
    assert capsys.readouterr().err == ""


def test_the_progress_bar_shows_the_steps_the_pipeline_runs_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiny:sd15's PNDM runs one step more than asked: the bar says 4 from its first frame, never 0/3."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = tmp_path / "p.png"
    code = run_cli("generate", "a cat", "--model", "tiny:sd15", "--steps", "3", "--device", "cpu", "-o", str(out))
    assert code == 0
    drawn = "".join(terminal.chunks)
    totals = {int(total) for total in re.findall(r"\b\d+/(\d+)\b", drawn)}
    assert totals == {4}, drawn
    assert "4/4" in drawn


def test_a_batch_rerun_with_nothing_to_do_loads_nothing(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "cat", "prompt": "a cat", "num_inference_steps": 1}) + "\n")
    out = tmp_path / "out"
    assert run_cli("batch", str(jobs), "--model", "tiny:sd15", "--device", "cpu", "--out", str(out)) == 0
    script = (
        "import sys, time; from t2i_core.cli import main; started = time.perf_counter(); "
        f"code = main(['batch', {str(jobs)!r}, '--model', 'tiny:sd15', '--out', {str(out)!r}]); "
        "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules, time.perf_counter() - started)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=120, check=False
    )
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "skipped 1" in done.stdout
    code, torch_imported, diffusers_imported, seconds = done.stdout.split()[-4:]
    assert (code, torch_imported, diffusers_imported) == ("0", "False", "False"), done.stdout
    assert float(seconds) < 3.0, f"the rerun took {seconds} s (the whole process {wall:.1f} s)"


def test_a_missing_control_image_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import t2i_core

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the missing image was found")

    monkeypatch.setattr(t2i_core, "load", no_load)
    missing = tmp_path / "no-pose.png"
    code = run_cli(
        "generate", "a dancer", "--model", "tiny:sd15", "--control", f"{missing}=tiny:controlnet-sd15",
        "-o", str(tmp_path / "d.png"),
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("t2i: error: controls[0].image=") and "no such file" in err, err
    reference = tmp_path / "ref.png"
    code = run_cli(
        "generate", "a dancer", "--model", "tiny:sd15", "--image-prompt", str(reference), "-o", str(tmp_path / "e.png")
    )
    assert code == 2
    assert "image_prompts[0].image=" in capsys.readouterr().err
