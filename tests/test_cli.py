"""The t2i command line: generate, plugins, one-line errors with exit status 2, lazy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support import run_cli

from t2i_core import GenerationRequest
from t2i_core.testing import assert_images_equal


def test_generate_writes_png_with_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sd15_engine: Any
) -> None:
    out = tmp_path / "astronaut.png"
    code = run_cli(
        "generate", "Astronaut in a jungle", "--model", "tiny:sd15", "--negative-prompt", "ugly",
        "--seed", "31", "--steps", "3", "--guidance-scale", "6.5", "--device", "cpu", "-o", str(out),
    )  # fmt: skip
    assert code == 0
    assert f"{out}  (seed 31)" in capsys.readouterr().out
    with Image.open(out) as image:
        image.load()
        text = dict(image.text)  # type: ignore[attr-defined]
        saved = image.convert("RGB")
    assert text["prompt"] == "Astronaut in a jungle"
    assert text["negative_prompt"] == "ugly"
    assert text["seed"] == "31"
    assert text["model"] == "tiny:sd15"
    assert text["family"] == "sd15"
    assert text["steps"] == "3"
    assert text["guidance_scale"] == "6.5"
    expected = sd15_engine.generate(
        GenerationRequest(
            prompt="Astronaut in a jungle", negative_prompt="ugly", seed=31, num_inference_steps=3, guidance_scale=6.5
        )
    )
    assert_images_equal([saved], expected.images)


def test_existing_output_is_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.png"
    out.write_bytes(b"precious")
    code = run_cli("generate", "a cat", "--model", "tiny:sd15", "--steps", "1", "--device", "cpu", "-o", str(out))
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == b"precious"
    assert (
        run_cli(
            "generate",
            "a cat",
            "--model",
            "tiny:sd15",
            "--steps",
            "1",
            "--device",
            "cpu",
            "-o",
            str(out),
            "--overwrite",
        )
        == 0
    )
    assert out.read_bytes().startswith(b"\x89PNG")


def test_num_images_are_numbered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "batch.png"
    code = run_cli(
        "generate", "a cat", "--model", "tiny:sd15", "--steps", "2", "--seed", "9", "--num-images", "2",
        "--device", "cpu", "-o", str(out),
    )  # fmt: skip
    assert code == 0
    assert not out.exists()
    seeds = []
    for index in range(2):
        with Image.open(tmp_path / f"batch-{index}.png") as image:
            seeds.append(image.text["seed"])  # type: ignore[attr-defined]
    assert seeds == ["9", "10"]


def test_one_numbered_file_existing_stops_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b-1.png").write_bytes(b"keep")
    code = run_cli(
        "generate",
        "a cat",
        "--model",
        "tiny:sd15",
        "--num-images",
        "2",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "b.png"),
    )
    assert code == 2
    assert not (tmp_path / "b-0.png").exists()
    assert (tmp_path / "b-1.png").read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--height", "100"], "height=100 is not allowed: expected a positive multiple of 8"),
        (["--width", "0"], "width=0"),
        (["--steps", "0"], "num_inference_steps=0"),
        (["--steps", "abc"], "argument --steps: 'abc' is not allowed: expected an integer"),
        (["--guidance-scale", "-1"], "guidance_scale=-1.0"),
        (["--num-images", "0"], "num_images=0"),
        (["--seed", "-5"], "seed=-5"),
        (["--family", "sd99"], "family='sd99'"),
        (["--accelerator", "warp"], "accelerator='warp'"),
        (["--device", "gpu"], "device='gpu'"),
        (["--option", "nonsense"], "--option='nonsense'"),
        (["--option", "colour=red"], "options['colour']"),
        (["--scheduler", "turbo"], "scheduler='turbo'"),
        (["--weighting", "fancy"], "prompt_weighting='fancy'"),
        (["--control", "edges.png"], "IMAGE=MODEL"),
        (["-o", "out.jpg"], "--output='out.jpg'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "generate",
        "a cat",
        "--model",
        "tiny:sd15",
        "--steps",
        "1",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "x.png"),
    ]
    assert run_cli(*base, *args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_empty_prompt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli("generate", "  ", "--model", "tiny:sd15", "-o", str(tmp_path / "x.png")) == 2
    assert "prompt='  ' is not allowed: expected a non-empty text" in capsys.readouterr().err


def _subprocess(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_missing_model_folder_in_a_real_process(tmp_path: Path) -> None:
    proc = _subprocess(
        "-m", "t2i_core.cli", "generate", "a cat", "--model", "./no/such/folder", "-o", str(tmp_path / "a.png")
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "model='./no/such/folder' cannot be loaded" in proc.stderr


def test_offline_hub_id_in_a_real_process(tmp_path: Path) -> None:
    proc = _subprocess(
        "-m", "t2i_core.cli", "generate", "a cat", "--model", "someone/not-cached", "-o", str(tmp_path / "a.png"),
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stderr


_HEAVY = "import sys; heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'compel', 'ray') if m in sys.modules); print(heavy)"


@pytest.mark.parametrize(
    "code",
    [
        "import t2i_core",
        "import t2i_core; t2i_core.get_registry()",
        "from t2i_core.cli import main; main(['--help'])",
        "from t2i_core.cli import main; main(['plugins'])",
        "from t2i_core.cli import main; main(['plugins', '--json'])",
    ],
)
def test_light_paths_never_import_torch(code: str) -> None:
    proc = _subprocess("-c", f"{code}\n{_HEAVY}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_plugins_lists_every_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("plugins") == 0
    out = capsys.readouterr().out
    assert "sd15  (t2i-sd15 0.1.0)" in out
    assert "provider:sd15" in out and "conditioner:negative-prompt" in out and "accelerator:fp16" in out
    assert "sd15 -> stable-diffusion-v1-5/stable-diffusion-v1-5" in out


def test_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert run_cli("plugins", "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["families"]["sd15"]["aliases"] == {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert {p["name"] for p in document["plugins"]} >= {"sd15", "negative_prompt", "accelerators"}


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


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = run_cli(
        "generate", "a cat", "--model", "tiny:sd15", "--steps", "2", "--scheduler", "ddim", "--device", "cpu",
        "-o", str(tmp_path / "p.png"),
    )  # fmt: skip
    assert code == 0
    drawn = "".join(terminal.chunks)
    assert "2/2" in drawn and "step" in drawn


def test_quiet_when_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(
        "generate", "a cat", "--model", "tiny:sd15", "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "q.png")
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip().startswith(str(tmp_path / "q.png"))


def test_control_flag_settings() -> None:
    from t2i_core.cli.flags import controls

    (control,) = controls(
        ["edges.png=tiny:controlnet-sd15@0.7,start=0.1,end=0.8,preprocess=canny:50:150,guess_mode=true"]
    )
    assert (control.image, control.model, control.scale) == ("edges.png", "tiny:controlnet-sd15", 0.7)
    assert (control.start, control.end, control.preprocess, control.guess_mode) == (0.1, 0.8, "canny:50:150", True)
    (plain,) = controls(["pose.png=lllyasviel/sd-controlnet-openpose"])
    assert (plain.model, plain.scale, plain.start, plain.end) == ("lllyasviel/sd-controlnet-openpose", 1.0, 0.0, 1.0)


@pytest.mark.parametrize("value", ["a.png=m@x", "a.png=m,colour=red", "a.png=m,start=zero", "a.png=m,guess_mode=maybe"])
def test_bad_control_flag(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("generate", "a cat", "--model", "tiny:sd15", "--control", value, "-o", str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IMAGE=MODEL[@SCALE]" in err and repr(value) in err


def test_warnings_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    from t2i_core.cli.logs import quiet_libraries, scoped_output

    with scoped_output():
        quiet_libraries()
        warnings.warn("prompt was truncated to 77 tokens", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "t2i: warning: prompt was truncated to 77 tokens\n"


def test_main_leaves_warnings_and_logging_as_they_were(tmp_path: Path) -> None:
    """The CLI formats warnings and log records only while `main` runs (a generation included)."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    loggers = [logging.getLogger(name) for name in ("t2i", "diffusers", "transformers")]

    def state() -> Any:
        return (
            warnings.showwarning,
            list(warnings.filters),
            [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers],
            diffusers_logging.is_progress_bar_enabled(),
        )

    before = state()
    assert run_cli("generate", "a cat", "--model", "tiny:sd15", "--steps", "1", "-o", str(tmp_path / "w.png")) == 0
    assert run_cli("--help") == 0
    assert state() == before


def test_importing_the_cli_changes_no_process_state() -> None:
    code = (
        "import logging, warnings\n"
        "before = (warnings.showwarning, list(warnings.filters), dict(logging.root.manager.loggerDict))\n"
        "import t2i_core.cli, t2i_core.cli.commands, t2i_core.cli.generate\n"
        "after = (warnings.showwarning, list(warnings.filters), dict(logging.root.manager.loggerDict))\n"
        "print(before == after)"
    )
    proc = _subprocess("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_output_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dir.png").mkdir()
    args = ("generate", "a cat", "--model", "tiny:sd15", "--steps", "1", "-o", str(tmp_path / "dir.png"), "--overwrite")
    assert run_cli(*args) == 2
    assert "this is a folder" in capsys.readouterr().err


def test_output_name_too_long(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("generate", "a cat", "--model", "tiny:sd15", "-o", str(tmp_path / ("a" * 300 + ".png"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usable file path" in err


def test_truncated_prompt_is_one_warning_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "a very detailed cat " * 40
    assert run_cli("generate", prompt, "--model", "tiny:sd15", "--steps", "1", "-o", str(tmp_path / "t.png")) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "t2i: warning: prompt is 642 tokens, the text encoder reads 77: the last 565 tokens are ignored"
    )
    assert err.count("\n") == 1


def test_unexpected_failure_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from t2i_sd15 import StableDiffusion15

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("something deep inside\nwith more lines")

    monkeypatch.setattr(StableDiffusion15, "run", broken)
    monkeypatch.delenv("T2I_DEBUG", raising=False)
    assert run_cli("generate", "a cat", "--model", "tiny:sd15", "--steps", "1", "-o", str(tmp_path / "u.png")) == 1
    assert capsys.readouterr().err == (
        "t2i: internal error: ValueError: something deep inside (set T2I_DEBUG=1 for the traceback)\n"
    )
    monkeypatch.setenv("T2I_DEBUG", "1")
    with pytest.raises(ValueError, match="something deep inside"):
        run_cli("generate", "a cat", "--model", "tiny:sd15", "--steps", "1", "-o", str(tmp_path / "v.png"))


def test_broken_pipe_is_quiet() -> None:
    code = "import subprocess, sys; p = subprocess.Popen(['t2i', 'plugins'], stdout=subprocess.PIPE, stderr=subprocess.PIPE); p.stdout.close(); print(p.wait(), repr(p.stderr.read()))"
    import shutil

    if shutil.which("t2i") is None:
        pytest.skip("the t2i console script is not on PATH")
    proc = _subprocess("-c", code)
    status, err = proc.stdout.strip().split(" ", 1)
    assert status == "0" and err == "b''", proc.stdout
