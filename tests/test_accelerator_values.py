"""Accelerators that take a value, written ``NAME@VALUE`` (issue #18): the value reaches ``apply``,
engines with different values are different engines, the spec is what the engine, the PNG metadata
and ``t2i generate --from`` carry, and a bad value is refused before any weights load, naming the
accelerator and what is allowed (one line and exit status 2 on the command line).

The accelerator under test, ``test-threshold``, is registered in-process: it records its value and
the load's plain names in its ``apply``; images stay those of plain fp32 (it changes no weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from t2i_core import (
    Accelerator,
    AcceleratorParameter,
    GenerationRequest,
    InvalidRequestError,
    LoadContext,
    Preset,
    UnknownAcceleratorError,
    get_registry,
    hookimpl,
    load,
    run_batch,
)
from t2i_core.testing import AcceleratorConformance, assert_images_equal, run_cli

NAME = "test-threshold"
PRESET = "test-threshold-stack"
#: (value, plain names of the load) of every apply, in order
APPLIED: list[tuple[float, tuple[str, ...]]] = []
BASE = ["generate", "a red fox", "--model", "tiny:sd15", "--steps", "1", "--device", "cpu", "--seed", "5"]


class Threshold(Accelerator):
    name = NAME
    phase = "cache"
    description = "records its threshold on the pipeline (a test accelerator)"
    parameter = AcceleratorParameter(
        name="threshold", kind=float, default=0.2, minimum=0, maximum=1, description="how far steps may differ"
    )

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        APPLIED.append((self.value, context.accelerators))
        pipeline.t2i_test_threshold = self.value


class Plugin:
    @hookimpl
    def register_accelerators(self, register: Callable[[Any], None]) -> None:
        register(Threshold())
        register(Preset(name=PRESET, description="fp32 and a threshold", stacks={"*": ("fp32", f"{NAME}@0.4")}))


@pytest.fixture(scope="module", autouse=True)
def threshold_plugin() -> Iterator[None]:
    registry = get_registry()
    registry.register_plugin(Plugin(), "test-threshold")
    try:
        yield
    finally:
        registry.unregister_plugin("test-threshold")


def tiny(*accelerators: str, cache: bool = False) -> Any:
    return load("tiny:sd15", device="cpu", accelerators=list(accelerators), cache=cache)


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        image.load()
        return dict(image.text)


# -- the parameter ------------------------------------------------------------------------------


def test_a_parameter_describes_parses_and_writes_its_values() -> None:
    parameter = Threshold.parameter
    assert parameter is not None
    assert parameter.describe() == "threshold: a number in [0, 1], default 0.2"
    assert parameter.parse(NAME, "0.15") == 0.15 and parameter.parse(NAME, " 1 ") == 1.0
    assert parameter.format(parameter.parse(NAME, ".5")) == "0.5"
    integer = AcceleratorParameter(name="blocks", kind=int, default=2, minimum=1)
    assert integer.describe() == "blocks: an integer of at least 1, default 2" and integer.parse("x", "3") == 3
    text = AcceleratorParameter(name="dtype", kind=str, default="int8", choices=("int8", "fp8"))
    assert text.describe() == "dtype: one of int8, fp8, default int8" and text.parse("x", "fp8") == "fp8"
    with pytest.raises(ValueError, match="default 2.0 is not a number in"):
        AcceleratorParameter(name="threshold", kind=float, default=2.0, minimum=0, maximum=1)
    with pytest.raises(TypeError, match="float, int or str"):
        AcceleratorParameter(name="flag", kind=bool, default=True)


def test_a_configured_copy_leaves_the_registered_accelerator_as_it_is() -> None:
    registry = get_registry()
    registered = registry.accelerators[NAME]
    configured = registry.accelerator(f"{NAME}@0.5")
    assert (configured.value, configured.spec) == (0.5, f"{NAME}@0.5")
    assert (registered.value, registered.spec) == (0.2, f"{NAME}@0.2")
    assert registry.accelerator(NAME) is registered
    fp32 = registry.accelerator("fp32")
    assert (fp32.value, fp32.spec) == (None, "fp32")
    with pytest.raises(InvalidRequestError, match="fp32 takes no value"):
        fp32.with_value(1)


# -- loading ----------------------------------------------------------------------------------


def test_the_value_reaches_apply_and_the_engine_lists_the_spec() -> None:
    APPLIED.clear()
    plain = tiny("fp32", NAME)
    valued = tiny("fp32", f"{NAME}@0.15")
    assert APPLIED == [(0.2, ("fp32", NAME)), (0.15, ("fp32", NAME))]  # the context keeps plain names
    assert plain.accelerators == ("fp32", f"{NAME}@0.2") and valued.accelerators == ("fp32", f"{NAME}@0.15")
    assert valued.pipeline.t2i_test_threshold == 0.15
    request = GenerationRequest(prompt="a red fox", seed=5, num_inference_steps=2)
    assert_images_equal(valued.generate(request).images, tiny("fp32").generate(request).images, "plain fp32")


def test_a_preset_may_hold_a_value() -> None:
    assert tiny(PRESET).accelerators == ("fp32", f"{NAME}@0.4")


def test_the_engine_cache_tells_values_apart() -> None:
    APPLIED.clear()
    first = tiny("fp32", f"{NAME}@0.31", cache=True)
    again = tiny("fp32", f"{NAME}@0.310", cache=True)  # the same value, written otherwise: the same weights
    other = tiny("fp32", f"{NAME}@0.37", cache=True)
    assert [value for value, _ in APPLIED] == [0.31, 0.37]
    assert first.pipeline.unet is again.pipeline.unet and first.pipeline.unet is not other.pipeline.unet
    assert other.pipeline.t2i_test_threshold == 0.37


@pytest.mark.parametrize(
    ("accelerators", "needle"),
    [
        ([f"{NAME}@1.5"], f"'{NAME}@1.5'"),
        ([f"{NAME}@-0.1"], f"'{NAME}@-0.1'"),
        ([f"{NAME}@high"], f"'{NAME}@high'"),
        ([f"{NAME}@nan"], f"'{NAME}@nan'"),
        ([f"{NAME}@"], f"'{NAME}@'"),
    ],
)
def test_a_bad_value_is_refused_naming_the_range(accelerators: list[str], needle: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        tiny("fp32", *accelerators)
    message = str(caught.value)
    assert caught.value.field == "accelerators" and needle in message
    assert "a number in [0, 1]" in message and f"{NAME}@THRESHOLD" in message and f"{NAME}@0.2" in message


def test_other_misuses_are_refused_naming_the_culprit() -> None:
    with pytest.raises(InvalidRequestError, match="fp32 takes no value") as caught:
        tiny("fp32@1", NAME)
    assert caught.value.value == "fp32@1"
    with pytest.raises(InvalidRequestError, match=f"one value of {NAME}: {NAME}@0.1 is asked for as well"):
        tiny("fp32", f"{NAME}@0.1", f"{NAME}@0.3")
    with pytest.raises(InvalidRequestError, match=f"one value of {NAME}: {NAME}@0.4 is asked for as well"):
        tiny(PRESET, f"{NAME}@0.3")
    with pytest.raises(InvalidRequestError, match="a preset takes no value"):
        tiny("auto@1")
    with pytest.raises(UnknownAcceleratorError) as unknown:
        tiny("no-such-accelerator@1")
    assert unknown.value.name == "no-such-accelerator"
    assert tiny("fp32", NAME, f"{NAME}@0.2").accelerators == ("fp32", f"{NAME}@0.2")  # the same value twice is one


def test_registration_refuses_an_at_in_a_name_and_a_parameter_of_another_type() -> None:
    class AtName(Accelerator):
        name, phase, description = "bad@name", "cache", "a name with an @"

    class NotAParameter(Accelerator):
        name, phase, description = "bad-parameter", "cache", "a parameter that is a dict"
        parameter = {"name": "threshold"}  # type: ignore[assignment]

    registry = get_registry()
    for accelerator, needle in ((AtName(), "cannot hold '@'"), (NotAParameter(), "expected an AcceleratorParameter")):

        class Bad:
            @hookimpl
            def register_accelerators(self, register: Callable[[Any], None]) -> None:
                register(accelerator)  # noqa: B023 - registered at once, in this iteration

        info = registry.register_plugin(Bad(), "test-bad-accelerator")
        try:
            assert info.error is not None and needle in info.error, info.error
            assert accelerator.name not in registry.accelerators
        finally:
            registry.unregister_plugin("test-bad-accelerator")


# -- what t2i plugins and the reference page show ---------------------------------------------


def test_t2i_plugins_shows_the_parameter() -> None:
    code, out, err = run_cli("plugins")
    assert code == 0, err
    assert f"    {NAME}@THRESHOLD  (a number in [0, 1]; default 0.2) (how far steps may differ)" in out.splitlines()
    code, out, err = run_cli("plugins", "--json")
    accelerators = json.loads(out)["accelerators"]
    assert accelerators["fp32"]["parameter"] is None
    assert accelerators[NAME]["parameter"] == {
        "name": "threshold",
        "type": "float",
        "default": "0.2",
        "minimum": 0,
        "maximum": 1,
        "choices": [],
        "allowed": "a number in [0, 1]",
        "description": "how far steps may differ",
    }


def test_the_reference_page_has_a_value_column_and_the_phases_in_order() -> None:
    import importlib.util

    from t2i_core import PHASES

    spec = importlib.util.spec_from_file_location("docgen", Path(__file__).resolve().parents[1] / "tools" / "docgen.py")
    assert spec is not None and spec.loader is not None
    docgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docgen)
    page = docgen.render_accelerators()
    assert "| name | phase | devices | lossless | value | cannot be combined with | what it does |" in page
    assert "in phase order (" + " → ".join(f"`{phase}`" for phase in PHASES) + ")" in page
    described = "threshold: a number in [0, 1], default 0.2 (how far steps may differ)"
    assert docgen._value(get_registry().accelerators[NAME]) == described
    assert docgen._value(get_registry().accelerators["fp32"]) == ""


# -- command line, PNG metadata, --from ---------------------------------------------------------


def test_the_cli_refuses_a_bad_value_in_one_line(tmp_path: Path) -> None:
    code, _out, err = run_cli(*BASE, "--accelerator", f"{NAME}@2", "-o", str(tmp_path / "x.png"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{NAME}@2'" in err and "a number in [0, 1]" in err
    assert not (tmp_path / "x.png").exists()


def test_the_png_holds_the_specs_and_from_makes_the_image_again(tmp_path: Path) -> None:
    first, again, other = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "other.png"
    code, _out, err = run_cli(*BASE, "--accelerator", "fp32", "--accelerator", f"{NAME}@0.15", "-o", str(first))
    assert code == 0, err
    assert png_text(first)["accelerators"] == f"fp32,{NAME}@0.15"
    APPLIED.clear()
    code, _out, err = run_cli("generate", "--from", str(first), "--device", "cpu", "-o", str(again))
    assert code == 0, err
    assert [value for value, _ in APPLIED] in ([], [0.15])  # [] when the engine cache had it already
    assert png_text(again)["accelerators"] == f"fp32,{NAME}@0.15"
    with Image.open(first) as made, Image.open(again) as remade:
        assert_images_equal([remade.convert("RGB")], [made.convert("RGB")], "the first image")
    code, _out, err = run_cli(
        "generate", "--from", str(first), "--device", "cpu", "--accelerator", "fp32", "-o", str(other)
    )
    assert code == 0, err
    assert png_text(other)["accelerators"] == "fp32"  # any --accelerator replaces the saved ones


def test_skip_existing_tells_outputs_of_other_values_apart(tmp_path: Path) -> None:
    out = tmp_path / "kept.png"
    run = [*BASE, "--num-images", "2", "-o", str(out), "--accelerator", "fp32"]
    code, _out, err = run_cli(*run, "--accelerator", f"{NAME}@0.15")
    assert code == 0, err
    made = sorted(tmp_path.glob("kept*.png"))
    assert len(made) == 2
    made[1].unlink()  # what is kept is checked against this run when the engine loads for the rest
    code, _out, err = run_cli(*run, "--accelerator", f"{NAME}@0.5", "--skip-existing")
    assert code == 2 and err.count("\n") == 1 and f"its accelerators is 'fp32,{NAME}@0.15'" in err, err
    code, _out, err = run_cli(*run, "--accelerator", f"{NAME}@0.15", "--skip-existing")
    assert code == 0 and made[1].exists(), err


# -- batch and server ---------------------------------------------------------------------------


def test_a_batch_refuses_a_bad_value_before_any_work(tmp_path: Path) -> None:
    jobs = [{"id": "fox", "prompt": "a red fox", "num_inference_steps": 1}]
    with pytest.raises(InvalidRequestError, match=r"a number in \[0, 1\]"):
        run_batch(jobs, out=tmp_path / "out", model="tiny:sd15", accelerators=[f"{NAME}@7"], dry_run=True)
    with pytest.raises(InvalidRequestError, match="fp32 takes no value"):
        run_batch(jobs, out=tmp_path / "out", model="tiny:sd15", accelerators=["fp32@1"], device="cpu")
    assert not (tmp_path / "out").exists()
    summary = run_batch(jobs, out=tmp_path / "out", model="tiny:sd15", accelerators=[f"{NAME}@0.5"], dry_run=True)
    assert summary.invalid == 0
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text(json.dumps(jobs[0]) + "\n")
    code, _out, err = run_cli(
        "batch", str(jobs_file), "--out", str(tmp_path / "cli"), "--model", "tiny:sd15", "--dry-run",
        "--accelerator", f"{NAME}@7",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "a number in [0, 1]" in err, err


def test_a_batch_applies_the_value(tmp_path: Path) -> None:
    APPLIED.clear()
    jobs = [{"id": "fox", "prompt": "a red fox", "num_inference_steps": 1, "seed": 5}]
    summary = run_batch(
        jobs, out=tmp_path / "out", model="tiny:sd15", accelerators=["fp32", f"{NAME}@0.61"], device="cpu"
    )
    assert summary.done == 1 and [value for value, _ in APPLIED] == [0.61]
    assert png_text(tmp_path / "out" / "fox.png")["accelerators"] == f"fp32,{NAME}@0.61"


def test_serve_refuses_a_bad_value_in_one_line() -> None:
    pytest.importorskip("t2i_server")
    code, _out, err = run_cli(
        "serve", "--model", "tiny:sd15", "--device", "cpu", "--port", "0", "--accelerator", f"{NAME}@9"
    )
    assert code == 2 and err.strip().splitlines()[-1].count(f"'{NAME}@9'") == 1, err
    assert "a number in [0, 1]" in err and "Traceback" not in err


# -- the conformance kit ------------------------------------------------------------------------


class TestThresholdConformance(AcceleratorConformance):
    """The kit's tests of an accelerator that takes a value, on the test accelerator."""

    accelerator = NAME
    values = (0.0, 0.35, 1.0)
    #: registered in-process, so a fresh interpreter's discovery cannot find it
    test_registers_without_importing_torch = None  # type: ignore[assignment]

    def effect(self, engine: Any) -> Any:
        return getattr(engine.pipeline, "t2i_test_threshold", None)

    def test_the_kit_derives_values_and_bad_values_from_the_parameter(self) -> None:
        assert TestThresholdConformance.values == self.good_values()
        derived = type("Derived", (TestThresholdConformance,), {"values": ()})()
        assert derived.good_values() == (0.2, 0.0, 1.0)
        assert derived.bad_values() == ["not-a-number", "nan", "-1.0", "2.0"]
