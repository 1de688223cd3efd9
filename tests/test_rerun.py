"""``t2i generate --from IMAGE.png``: the settings saved in a PNG make the same image again, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import Control, GenerationRequest
from t2i_core.cli import main


def _saved(path: Path) -> tuple[dict[str, str], np.ndarray]:
    with Image.open(path) as image:
        image.load()
        return dict(image.text), np.asarray(image.convert("RGB"))  # type: ignore[attr-defined]


def test_from_remakes_the_image_bit_for_bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main([
        "generate", "a red cat", "--model", "tiny:sd15", "--negative-prompt", "blurry", "--steps", "2",
        "--guidance-scale", "6.5", "--scheduler", "euler", "--width", "96", "--device", "cpu", "-o", str(first),
    ]) == 0  # fmt: skip
    assert main(["generate", "--from", str(first), "--device", "cpu", "-o", str(again)]) == 0
    text, pixels = _saved(first)
    text_again, pixels_again = _saved(again)
    assert text_again == text and text["width"] == "96" and text["scheduler"] == "euler"
    assert np.array_equal(pixels_again, pixels)
    assert f"{again}  (seed {text['seed']})" in capsys.readouterr().out


def test_from_restores_options_weighting_and_controls(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "pose.png")
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main([
        "generate", "a (red)1.3 cat", "--model", "tiny:sdxl", "--weighting", "compel", "--steps", "2", "--seed", "3",
        "--option", "original_size=512,512", "--control", f"{tmp_path / 'pose.png'}=tiny:controlnet-sdxl@0.6,end=0.8",
        "--device", "cpu", "-o", str(first),
    ]) == 0  # fmt: skip
    assert main(["generate", "--from", str(first), "--device", "cpu", "-o", str(again)]) == 0
    text, pixels = _saved(first)
    text_again, pixels_again = _saved(again)
    assert text["option.original_size"] == "512,512" and text["prompt_weighting"] == "compel"
    assert '"end": 0.8' in text["controls"]
    assert text_again == text
    assert np.array_equal(pixels_again, pixels)


def test_flags_override_the_saved_settings(tmp_path: Path) -> None:
    first, changed = tmp_path / "first.png", tmp_path / "changed.png"
    assert main([
        "generate", "a red cat", "--model", "tiny:sdxl", "--steps", "2", "--seed", "8",
        "--option", "original_size=512,512", "--option", "target_size=64,64", "--device", "cpu", "-o", str(first),
    ]) == 0  # fmt: skip
    assert main([
        "generate", "a blue cat", "--from", str(first), "--seed", "9", "--option", "original_size=256,256",
        "--device", "cpu", "-o", str(changed),
    ]) == 0  # fmt: skip
    text, _ = _saved(changed)
    assert text["prompt"] == "a blue cat" and text["seed"] == "9" and text["steps"] == "2"
    assert text["option.original_size"] == "256,256" and text["option.target_size"] == "64,64"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (None, "the path of an existing PNG"),
        (lambda path: path.write_bytes(b"not a png"), "cannot be read"),
        (lambda path: Image.new("RGB", (8, 8)).save(path), "it has no prompt, model, seed metadata"),
    ],
)
def test_from_a_file_that_is_not_a_t2i_png_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, expected: str
) -> None:
    source = tmp_path / "source.png"
    if make is not None:
        make(source)
    assert main(["generate", "--from", str(source), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("t2i: error: --from=") and expected in err


def test_a_control_image_that_was_in_memory_must_be_given_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sd15_engine: Any
) -> None:
    control = Control(image=Image.new("RGB", (64, 64)), model="tiny:controlnet-sd15")
    result = sd15_engine.generate(GenerationRequest(prompt="a cat", seed=1, num_inference_steps=1, controls=(control,)))
    result.save(tmp_path / "first.png")
    assert main(["generate", "--from", str(tmp_path / "first.png"), "-o", str(tmp_path / "out.png")]) == 2
    assert "controls[0] was an image in memory" in capsys.readouterr().err


def test_prompt_and_model_are_required_without_from(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a cat"]) == 2
    assert "required: --model/-m (or --from IMAGE.png)" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny:sd15"]) == 2
    assert "required: PROMPT (or --from IMAGE.png)" in capsys.readouterr().err


def test_pairs_saved_by_0_1_0_are_read_back() -> None:
    from t2i_core.cli.rerun import _saved_option

    assert _saved_option("(512, 512)") == "512,512"
    assert _saved_option("(dramatic clouds)1.3") == "(dramatic clouds)1.3"
    assert _saved_option("(oil painting)") == "(oil painting)"
