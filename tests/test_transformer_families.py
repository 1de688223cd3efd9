"""Flux, SD3 and Z-Image everywhere else: ``--from`` re-runs, threads, and conditioners they refuse.

Their conformance kits, ``t2i batch``, ``t2i serve``, LoRA and warm-up are tested with each plugin
and in test_warmup.py / the ray plugin's tests; here the parts of the SDK that every family must
honour: a PNG's metadata makes the same image again bit for bit, family options included; an engine
shared by threads gives each request its own image; and a conditioner made for other families
(Compel, an SD1.5 ControlNet) is refused before any work, naming what it is and the family.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from t2i_core import Control, Engine, GenerationRequest, UnsupportedFeatureError, load
from t2i_core.testing import assert_images_equal, refuse_to_run, run_cli

FAMILIES = ("flux", "sd3", "z-image")
STEPS = 2

#: each family's options on the command line, with the negative prompt and guidance they act on
CLI_RUNS: dict[str, list[str]] = {
    "flux": [
        "--negative-prompt", "blurry", "--guidance-scale", "2.5",
        "--option", "true_cfg_scale=3.5", "--option", "max_sequence_length=64",
    ],
    "sd3": [
        "--negative-prompt", "blurry", "--scheduler", "flow-euler", "--option", "t5=false",
        "--option", "max_sequence_length=32", "--option", "skip_guidance_layers=0,1",
        "--option", "skip_layer_guidance_stop=0.9",
    ],
    "z-image": [
        "--negative-prompt", "blurry", "--guidance-scale", "2.5",
        "--option", "cfg_truncation=0.5", "--option", "cfg_normalization=0.3",
    ],
}  # fmt: skip

#: the same kinds of settings as Python values (a bool, a list, floats), as an application passes them
PYTHON_RUNS: dict[str, dict[str, Any]] = {
    "flux": {"negative_prompt": "blurry", "guidance_scale": 2.0, "options": {"true_cfg_scale": 3.0}},
    "sd3": {
        "negative_prompt": "blurry",
        "options": {"t5": False, "skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.9},
    },
    "z-image": {
        "negative_prompt": "blurry",
        "guidance_scale": 3.0,
        "options": {"cfg_truncation": 0.6, "max_sequence_length": 48},
    },
}


def saved(path: Path) -> tuple[dict[str, str], np.ndarray]:
    with Image.open(path) as image:
        image.load()
        return dict(image.text), np.asarray(image.convert("RGB"))  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request: pytest.FixtureRequest) -> Engine:
    return load(f"tiny:{request.param}", device="cpu", accelerators=("fp32",))


# -- t2i generate --from ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_from_remakes_a_cli_image_with_its_family_options(tmp_path: Path, family: str) -> None:
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    args = ["--model", f"tiny:{family}", "--steps", str(STEPS), "--seed", "4", "--device", "cpu"]
    code, _, err = run_cli("generate", "a red cat", *args, *CLI_RUNS[family], "-o", str(first))
    assert code == 0, err
    code, _, err = run_cli("generate", "--from", str(first), "--device", "cpu", "-o", str(again))
    assert code == 0, err
    text, pixels = saved(first)
    text_again, pixels_again = saved(again)
    pairs = list(zip(CLI_RUNS[family][::2], CLI_RUNS[family][1::2], strict=True))
    options = dict(value.split("=", 1) for flag, value in pairs if flag == "--option")
    assert {key: value for key, value in text.items() if key.startswith("option.")} == {
        f"option.{name}": value for name, value in options.items()
    }
    assert text["family"] == family and text["negative_prompt"] == "blurry"
    assert text_again == text
    assert np.array_equal(pixels_again, pixels), f"--from did not remake the {family} image bit for bit"
    # ... and that image is the one the same request makes in Python.
    request = GenerationRequest(
        prompt="a red cat",
        negative_prompt="blurry",
        seed=4,
        num_inference_steps=STEPS,
        guidance_scale=float(text["guidance_scale"]),
        scheduler=text["scheduler"],
        options=options,
    )
    made = load(f"tiny:{family}", device="cpu").generate(request)
    assert_images_equal([Image.fromarray(pixels)], made.images, "the SDK's image of the same request")


def test_from_remakes_a_python_image_and_the_documented_rebuild_too(tmp_path: Path, engine: Engine) -> None:
    """Options given as Python values (False, a list) are saved as text that both ``--from`` and
    the rebuild in docs/rerun.md read back into the same image."""
    request = GenerationRequest(prompt="a lighthouse", seed=6, num_inference_steps=STEPS, **PYTHON_RUNS[engine.family])
    result = engine.generate(request)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    result.save(first)
    code, _, err = run_cli("generate", "--from", str(first), "--device", "cpu", "-o", str(again))
    assert code == 0, err
    text, _ = saved(first)
    text_again, pixels_again = saved(again)
    assert text_again == text and {f"option.{name}" for name in request.options} <= text.keys()
    assert_images_equal([Image.fromarray(pixels_again)], result.images, "the image --from remade")

    # docs/rerun.md, "In Python": every setting from the text, options as text.
    rebuilt = GenerationRequest(
        prompt=text["prompt"],
        negative_prompt=text["negative_prompt"] or None,
        seed=int(text["seed"]),
        num_inference_steps=int(text["steps"]),
        guidance_scale=float(text["guidance_scale"]),
        height=int(text["height"]),
        width=int(text["width"]),
        scheduler=text.get("scheduler"),
        prompt_weighting=text.get("prompt_weighting"),
        options={key[len("option.") :]: value for key, value in text.items() if key.startswith("option.")},
    )
    again_engine = load(
        text["model"], family=text["family"], device="cpu", accelerators=text["accelerators"].split(",")
    )
    assert_images_equal(again_engine.generate(rebuilt).images, result.images, "the request rebuilt from the PNG")


def test_from_keeps_an_sd3_loaded_without_t5(tmp_path: Path) -> None:
    """The PNG of an engine loaded with 'no-t5' names it, and --from loads the model the same way."""
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    code, _, err = run_cli(
        "generate", "a red cat", "--model", "tiny:sd3", "--steps", str(STEPS), "--seed", "2", "--device", "cpu",
        "--accelerator", "fp32", "--accelerator", "no-t5", "-o", str(first),
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("generate", "--from", str(first), "--device", "cpu", "-o", str(again))
    assert code == 0, err
    text, pixels = saved(first)
    text_again, pixels_again = saved(again)
    assert "no-t5" in text["accelerators"].split(",") and text_again == text
    assert np.array_equal(pixels_again, pixels)
    # Without no-t5 the prompt is read by T5 too, and the image is another one.
    with_t5 = load("tiny:sd3", device="cpu", accelerators=("fp32",)).generate(
        GenerationRequest(prompt="a red cat", seed=2, num_inference_steps=STEPS)
    )
    assert not np.array_equal(np.asarray(with_t5.images[0]), pixels)


# -- threads ---------------------------------------------------------------------------------------


def mixed_requests(family: str) -> list[GenerationRequest]:
    """Sizes, batches, negative prompts and the family's options: what a server's callers mix."""
    base = GenerationRequest(prompt="a red bicycle", seed=11, num_inference_steps=STEPS)
    python_run = PYTHON_RUNS[family]
    return [
        base,
        base.evolve(height=48, width=80, seed=12),
        base.evolve(seed=13, num_images=2),
        base.evolve(prompt="a lighthouse at dusk, " * 2, seed=14, **python_run),
    ]


def test_one_engine_shared_by_threads_gives_the_sequential_images(engine: Engine) -> None:
    requests = mixed_requests(engine.family)
    sequential = [[image.tobytes() for image in engine.generate(r).images] for r in requests]
    barrier = threading.Barrier(4)

    def work(index: int) -> list[list[bytes]]:
        barrier.wait()
        return [
            [image.tobytes() for image in engine.generate(requests[(index + k) % len(requests)]).images]
            for k in range(2)
        ]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(4)))
    wrong = [
        (index, (index + k) % len(requests))
        for index, made in enumerate(results)
        for k, images in enumerate(made)
        if images != sequential[(index + k) % len(requests)]
    ]
    assert not wrong, f"{engine.family}: (thread, request) pairs whose images differ from the sequential ones: {wrong}"


# -- conditioners for other families ---------------------------------------------------------------


def test_compel_is_refused_before_any_work_naming_compel_and_the_family(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(UnsupportedFeatureError) as caught:
        engine.generate(GenerationRequest(prompt="a (red)1.3 cat", prompt_weighting="compel", seed=1))
    message = str(caught.value)
    assert f"family {engine.family!r}" in message and "Compel" in message, message
    assert caught.value.family == engine.family


@pytest.mark.parametrize("given_as", ["tiny name", "local folder"])
def test_an_sd15_controlnet_is_refused_before_any_work_naming_both_families(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, given_as: str
) -> None:
    t2i_controlnet = pytest.importorskip("t2i_controlnet")
    if given_as == "tiny name":
        model, kind = "tiny:controlnet-sd15", "an sd15 ControlNet"
    else:  # told by its config: the tiny one reads 32 features, neither SD 1.x's 768 nor SD 2.x's 1024
        model, kind = str(t2i_controlnet.tiny_controlnet_folder("sd15")), "an SD 1.x/2.x ControlNet"

    def never(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail("the ControlNet conditioner ran although the family cannot use it")

    refuse_to_run(monkeypatch, engine)
    monkeypatch.setattr(t2i_controlnet.ControlNet, "prepare", never)
    monkeypatch.setattr(t2i_controlnet.ControlNet, "condition", never)
    control = Control(image=Image.new("RGB", (64, 64)), model=model)
    with pytest.raises(UnsupportedFeatureError) as caught:
        engine.generate(GenerationRequest(prompt="a cat", seed=1, controls=(control,)))
    message = str(caught.value)
    assert f"family {engine.family!r} does not support ControlNet" in message, message
    assert f"controls[0].model={model!r} ({kind})" in message, message


def test_the_cli_refuses_an_sd15_controlnet_on_sd3_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("t2i_controlnet")
    pose, out = tmp_path / "pose.png", tmp_path / "never.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(pose)
    code, _, err = run_cli(
        "generate", "a cat", "--model", "tiny:sd3", "--device", "cpu", "--control",
        f"{pose}=tiny:controlnet-sd15", "-o", str(out),
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "family 'sd3' does not support ControlNet" in err and "an sd15 ControlNet" in err, err
    assert not out.exists()
