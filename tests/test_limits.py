"""Requests that pass the request's own validation but not the engine's: steps, guidance, size, prompt length."""

from __future__ import annotations

import copy
import inspect
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from t2i_core import (
    Control,
    DegenerateImageWarning,
    GenerationRequest,
    InvalidRequestError,
    Lora,
    ModelNotFoundError,
    PromptTruncatedWarning,
    load,
    schedulers,
)
from t2i_core.cli import main
from t2i_core.engine.checks import DEFAULT_MAX_PIXELS
from t2i_core.engine.prompts import warn_degenerate as _warn_degenerate


# SDXL runs the same scheduler classes as SD 1.5 (with another config): two families cover them all.
@pytest.fixture(scope="module", params=["sd15", "kandinsky22"])
def engine(request: Any) -> Any:
    return load(f"tiny:{request.param}", device="cpu")


def test_steps_beyond_what_the_scheduler_takes_are_refused_before_work(sd15_engine: Any) -> None:
    # PNDM (SD 1.5's default) and DDIM with steps_offset=1 would index timestep 1000 of 0..999.
    for name in ("default", "ddim"):
        with pytest.raises(InvalidRequestError) as caught:
            sd15_engine.resolve(GenerationRequest(prompt="x", num_inference_steps=1000, scheduler=name))
        assert caught.value.field == "num_inference_steps"
        assert "[1, 999]" in caught.value.allowed and name in caught.value.allowed
        sd15_engine.resolve(GenerationRequest(prompt="x", num_inference_steps=999, scheduler=name))


def test_every_scheduler_runs_its_whole_step_limit(engine: Any) -> None:
    """The limit the engine reports is what the scheduler really runs: a full schedule of steps at
    the limit completes (model outputs stand in for the denoiser), and one more step is refused."""
    import torch

    for name in engine.provider.schedulers or schedulers.names():
        limit = engine._step_limit(name)
        with pytest.raises(InvalidRequestError, match=r"num_inference_steps=\d+ is not allowed"):
            engine.resolve(GenerationRequest(prompt="x", num_inference_steps=limit + 1, scheduler=name))
        if name == "lms":
            continue  # its steps integrate with scipy: 6 s for 999 of them; the engine's own search ran them
        scheduler = copy.deepcopy(engine._scheduler(name))
        scheduler.set_timesteps(limit, device="cpu")
        sample = torch.zeros(1, 4, 4, 4)
        generator = torch.Generator("cpu").manual_seed(0)
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, timestep)
            kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            sample = scheduler.step(torch.zeros_like(model_input), timestep, sample, **kwargs).prev_sample
        assert torch.isfinite(sample).all(), name


def test_guidance_is_bounded(sd15_engine: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.resolve(GenerationRequest(prompt="x", guidance_scale=1e30))
    assert caught.value.field == "guidance_scale" and "[0, 100]" in caught.value.allowed
    sd15_engine.resolve(GenerationRequest(prompt="x", guidance_scale=100))


def test_a_flat_image_is_reported() -> None:
    request = GenerationRequest(prompt="x", guidance_scale=50.0)
    noisy = Image.effect_noise((8, 8), 50).convert("RGB")
    with pytest.warns(DegenerateImageWarning) as caught:
        _warn_degenerate([noisy, Image.new("RGB", (8, 8))], request)
    assert len(caught) == 1 and str(caught[0].message).startswith("image 1 is a single flat colour (0, 0, 0)")
    assert "(guidance_scale=50; half precision" in str(caught[0].message)
    # Every value that scales the model's output is named, not only guidance (red team).
    scaled = request.evolve(
        controls=(Control(image="edges.png", model="m", scale=9.5),), loras=(Lora("s.safetensors", -3),)
    )
    with pytest.warns(
        DegenerateImageWarning, match=r"guidance_scale=50, controls\[0\].scale=9.5, loras\[0\].scale=-3;"
    ):
        _warn_degenerate([Image.new("RGB", (8, 8))], scaled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_degenerate([noisy], request)


def test_nan_latents_end_in_a_warning_not_a_silent_black_image(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    engine = load("tiny:sd15", device="cpu", cache=False)
    unet = engine.pipeline.unet
    real = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: (real(*a, **k)[0] * torch.nan,))
    with pytest.warns(DegenerateImageWarning, match="single flat colour"):
        engine.generate(GenerationRequest(prompt="x", seed=1, num_inference_steps=2))


def test_the_pixel_limit_is_checked_before_any_work(sd15_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.generate(GenerationRequest(prompt="x", height=100_000, width=64))
    assert time.perf_counter() - started < 1.0
    assert caught.value.field == "height x width" and caught.value.value == "100000x64"
    assert str(DEFAULT_MAX_PIXELS) in caught.value.allowed
    # Overridable per engine, and by the environment for engines loaded afterwards.
    engine = load("tiny:sd15", device="cpu")
    engine.max_pixels = 32 * 32
    with pytest.raises(InvalidRequestError, match="at most 1024 pixels"):
        engine.resolve(GenerationRequest(prompt="x", height=40, width=32))
    monkeypatch.setenv("T2I_MAX_PIXELS", "4096")
    assert load("tiny:sd15", device="cpu").max_pixels == 4096
    monkeypatch.setenv("T2I_MAX_PIXELS", "lots")
    with pytest.raises(InvalidRequestError, match=r"\$T2I_MAX_PIXELS='lots'"):
        load("tiny:sd15", device="cpu")


def test_cli_limits_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.png")
    cases = [
        (["--steps", "1000"], "num_inference_steps=1000"),
        (["--guidance-scale", "1e30"], "guidance_scale=1e+30"),
        (["--height", "100000", "--width", "64"], "height x width='100000x64'"),
    ]
    for extra, field in cases:
        assert main(["generate", "a cat", "--model", "tiny:sd15", "--device", "cpu", "-o", out, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("t2i: error: ") and field in lines[0], lines
    assert not Path(out).exists()


def test_a_huge_prompt_gives_a_short_warning(
    sd15_engine: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "a lighthouse at dusk " * 5000
    with pytest.warns(PromptTruncatedWarning) as caught:
        sd15_engine.generate(GenerationRequest(prompt=prompt, seed=1, num_inference_steps=1))
    (warning,) = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    text = str(warning.message)
    assert len(text) < 300 and "tokens are ignored" in text and "'a lighthouse at dusk a lighthouse ...'" in text
    with pytest.warns(PromptTruncatedWarning) as caught:  # one 100,000-character word (red team)
        sd15_engine.generate(GenerationRequest(prompt="x" * 100_000, seed=1, num_inference_steps=1))
    (warning,) = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(str(warning.message)) < 300 and f"'{'x' * 60} ...'" in str(warning.message)
    assert (
        main(
            [
                "generate",
                prompt,
                "--model",
                "tiny:sd15",
                "--device",
                "cpu",
                "--steps",
                "1",
                "-o",
                str(tmp_path / "p.png"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert len(err) < 400 and err.startswith("t2i: warning: prompt is ") and err.count("\n") == 1, err


def test_accelerator_warnings_carry_the_cli_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--device", "cpu", "--steps", "1", "--accelerator", "fuse_qkv", "-o", str(tmp_path / "k.png")]
    assert main(["generate", "x", "--model", "tiny:kandinsky22", *args]) == 0
    err = capsys.readouterr().err
    assert "t2i: warning: accelerator 'fuse_qkv' changed nothing" in err
    assert all(line.startswith("t2i: warning: ") for line in err.strip().splitlines()), err


def test_a_missing_component_folder_is_named(sd15_folder: str, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(sd15_folder, broken)
    shutil.rmtree(broken / "vae")
    for family in (None, "sd15"):
        with pytest.raises(ModelNotFoundError, match=r"component folder vae/ is missing"):
            load(str(broken), device="cpu", family=family, cache=False)


def _text_chunks(data: bytes) -> dict[str, bytes]:
    """PNG text chunks by keyword → chunk type (tEXt, zTXt or iTXt)."""
    import struct

    chunks, offset = {}, 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            chunks[body.split(b"\0", 1)[0].decode("latin-1")] = kind
        offset += 12 + length
    return chunks


def test_a_nul_in_a_prompt_is_stored_in_an_itxt_chunk(sd15_engine: Any, tmp_path: Path) -> None:
    result = sd15_engine.generate(GenerationRequest(prompt="a\0cat", seed=1, num_inference_steps=1))
    path = tmp_path / "nul.png"
    result.save(path)
    chunks = _text_chunks(path.read_bytes())
    assert chunks["prompt"] == b"iTXt" and chunks["seed"] == b"tEXt"
    with Image.open(path) as image:
        image.load()
        assert image.text["prompt"] == "a\0cat"


def test_a_prompt_is_cut_only_past_the_longest_reader() -> None:
    """Flux's T5 reads max_sequence_length tokens where its CLIP reads 77: no warning until T5 cuts too."""
    import warnings as _warnings

    from t2i_core import PromptTruncatedWarning, load

    engine = load("tiny:flux")
    medium = "a cat " * 60  # about 120 tokens: past CLIP's 77, within T5's window
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", PromptTruncatedWarning)
        engine.generate(GenerationRequest(prompt=medium, seed=1, num_inference_steps=1))
    with pytest.warns(PromptTruncatedWarning, match=r"the text encoder reads 77: "):  # CLIP's, the longer
        engine.generate(
            GenerationRequest(prompt=medium, seed=1, num_inference_steps=1, options={"max_sequence_length": 64})
        )
