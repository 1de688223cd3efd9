"""`AcceleratorConformance`: the promises every accelerator plugin keeps, as tests to subclass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import pytest

from ._images import assert_images_close, assert_images_equal
from ._support import light_import_report, require_family

if TYPE_CHECKING:
    from t2i_core import Accelerator, Engine


#: plain fp32 images by (model, device, prompt, seed, steps): the reference of every accelerator class
_plain_images: dict[tuple[Any, ...], list[Any]] = {}


@attrs.frozen
class Accelerated:
    """An engine loaded with the accelerator, and the accelerators whose ``apply`` ran, in order."""

    engine: Engine
    #: their names
    applied: list[str]
    #: as written, with the value of one that takes a value (``first-block-cache@0.2``)
    specs: list[str] = attrs.Factory(list)


class AcceleratorConformance:
    """The conformance tests of an accelerator plugin.

    Subclass it (``class TestMyAccelerator(AcceleratorConformance)``), set `accelerator` and
    implement `effect`: something about an engine that the accelerator changes::

        class TestChannelsLast(AcceleratorConformance):
            accelerator = "my-channels-last"

            def effect(self, engine):
                import torch
                return engine.pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    The tests compare an engine with the accelerator (stacked on ``fp32`` unless it sets the
    dtype itself) with a plain ``fp32`` one, on `model` and `device`. An accelerator that takes a
    value (``NAME@VALUE``, its `Accelerator.parameter`) is also loaded with each of `values`, each
    of which must reach its ``apply``, and values outside what it declares must be refused before
    any weights load, with an error that names what is allowed.
    """

    #: the accelerator's registered name
    accelerator: ClassVar[str]
    #: the checkpoint the tests load
    model: ClassVar[str] = "tiny:sd15"
    #: the device the tests run on (skipped where absent)
    device: ClassVar[str] = "cpu"
    steps: ClassVar[int] = 2
    seed: ClassVar[int] = 31
    prompt: ClassVar[str] = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
    #: the most levels of 255 its images may differ from plain fp32 ones; None = 0 for a lossless
    #: accelerator (bit-exact), and required for one that is not
    tolerance: ClassVar[int | None] = None
    #: why the images differ at all, when `tolerance` > 0
    why: ClassVar[str] = ""
    #: for an accelerator that takes a value: values to load it with (each written ``NAME@VALUE``);
    #: empty = its default and, where declared, its bounds (a number) or its choices (a text)
    values: ClassVar[tuple[Any, ...]] = ()

    def effect(self, engine: Engine) -> Any:
        """What the accelerator changes in `engine` (a dtype, a flag, processor classes...).

        The kit checks that it differs between an engine with the accelerator and one without.
        """
        raise NotImplementedError(
            f"{type(self).__name__}: define effect(engine), returning what {self.accelerator!r} changes"
        )

    # -- fixtures --------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def plain(cls, t2i_tiny_cache: Path) -> Engine:
        """`model` on `device` in plain float32."""
        from t2i_core import load

        cls()._skip_without_device()
        return load(cls.model, device=cls.device, accelerators=("fp32",))

    @pytest.fixture(scope="class")
    @classmethod
    def accelerated(cls, t2i_tiny_cache: Path) -> Iterator[Accelerated]:
        """`model` with the accelerator (a load of its own), recording every ``apply`` in order."""
        from t2i_core import get_registry, load

        self = cls()
        self._skip_without_device()
        accelerated = Accelerated(engine=None, applied=[], specs=[])  # type: ignore[arg-type]
        with pytest.MonkeyPatch.context() as patch:
            _record_applies(patch, get_registry().accelerators.values(), accelerated)
            engine = load(self.model, device=self.device, accelerators=self.stack(), cache=False)
        yield attrs.evolve(accelerated, engine=engine)

    # -- helpers ---------------------------------------------------------------------------------
    def instance(self) -> Accelerator:
        from t2i_core import get_registry

        return get_registry().accelerator(self.accelerator)

    def stack(self, spec: str | None = None) -> list[str]:
        """The accelerators of the accelerated engine: ``fp32`` and this one (or `spec`, this one with a
        value), unless it sets the dtype."""
        accelerator = self.instance()
        spec = spec or self.accelerator
        if accelerator.phase == "dtype" or "fp32" in accelerator.conflicts:
            return [spec]
        return ["fp32", spec]

    def good_values(self) -> tuple[Any, ...]:
        """`values`, or the parameter's default and its bounds or choices; empty without a parameter."""
        parameter = self.instance().parameter
        if parameter is None:
            return ()
        if self.values:
            return self.values
        extremes = parameter.choices if parameter.kind is str else (parameter.minimum, parameter.maximum)
        found = [parameter.default]
        for value in extremes:
            if value is not None:
                value = parameter.kind(value)
                if value not in found:
                    found.append(value)
        return tuple(found)

    def bad_values(self) -> list[str]:
        """Texts after ``NAME@`` that its parameter must refuse (or any text, without a parameter)."""
        parameter = self.instance().parameter
        if parameter is None:
            return ["1"]
        if parameter.kind is str:
            return ["no-such-choice", ""] if parameter.choices else [""]
        bad = ["not-a-number", "nan"]
        if parameter.kind is int:
            bad.append("1.5")
        step = 1 if parameter.kind is int else max(abs(parameter.maximum or 0), abs(parameter.minimum or 0), 1.0)
        if parameter.minimum is not None:
            bad.append(parameter.format(parameter.kind(parameter.minimum - step)))
        if parameter.maximum is not None:
            bad.append(parameter.format(parameter.kind(parameter.maximum + step)))
        return bad

    def image(self, engine: Engine) -> list[Any]:
        from t2i_core import GenerationRequest

        request = GenerationRequest(prompt=self.prompt, seed=self.seed, num_inference_steps=self.steps)
        return engine.generate(request).images

    def plain_image(self, plain: Engine) -> list[Any]:
        """`image` of the plain engine, made once per model, device and request for every class."""
        key = (self.model, self.device, self.prompt, self.seed, self.steps)
        if key not in _plain_images:
            _plain_images[key] = self.image(plain)
        return _plain_images[key]

    def _skip_without_device(self) -> None:
        from t2i_core import InvalidRequestError
        from t2i_core.engine.sources import resolve_device

        try:
            resolve_device(self.device)
        except InvalidRequestError as exc:
            pytest.skip(str(exc))
        if self.device.split(":", 1)[0] not in self.instance().devices:
            pytest.skip(f"{self.accelerator!r} does not run on {self.device}")
        if self.model.startswith("tiny:"):
            require_family(self.model.removeprefix("tiny:"))

    # -- tests -----------------------------------------------------------------------------------
    def test_registers_without_importing_torch(self) -> None:
        """Discovering the plugin registers the accelerator and imports no torch, diffusers or transformers."""
        report = light_import_report(
            "from t2i_core import get_registry\n"
            "registry = get_registry()\n"
            "report['accelerators'] = sorted(registry.accelerators)\n"
            "report['errors'] = [info.error for info in registry.failures()]\n"
        )
        assert self.accelerator in report["accelerators"], f"not registered: {report['errors']}"
        assert report["heavy"] == [], f"registering imported {report['heavy']}: import them inside methods"

    def test_declares_its_phase_devices_and_conflicts(self) -> None:
        """Its phase is one of PHASES, its devices are known device types, its conflicts are other names;
        a parameter it declares describes itself, and its default is what a plain NAME gets."""
        from t2i_core import PHASES, AcceleratorParameter
        from t2i_core.engine.sources import DEVICE_TYPES

        accelerator = self.instance()
        assert "@" not in self.accelerator, "set accelerator to the registered name; list values in `values`"
        assert accelerator.phase in PHASES, f"phase {accelerator.phase!r} is not one of {PHASES}"
        assert accelerator.devices and set(accelerator.devices) <= set(DEVICE_TYPES), accelerator.devices
        assert all(isinstance(name, str) and name != self.accelerator for name in accelerator.conflicts)
        assert accelerator.description, "describe it in one line (t2i plugins shows it)"
        parameter = accelerator.parameter
        if parameter is None:
            assert not self.values, f"{self.accelerator!r} takes no value: drop `values`"
            assert accelerator.spec == self.accelerator and accelerator.value is None
            return
        assert isinstance(parameter, AcceleratorParameter), parameter
        assert parameter.description, "describe its parameter in one line (t2i plugins shows it)"
        assert accelerator.value == parameter.default
        assert accelerator.spec == f"{self.accelerator}@{parameter.format(parameter.default)}"

    def test_bad_values_are_refused_before_loading(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A value outside what its parameter allows (any value, when it declares none) is refused before any
        weights load, with an error naming the accelerator and what is allowed."""
        from t2i_core import InvalidRequestError, get_registry, load

        family = self.model.removeprefix("tiny:") if self.model.startswith("tiny:") else None
        if family is not None:
            monkeypatch.setattr(get_registry().provider(family), "load_pipeline", _refuse_loading)
        parameter = self.instance().parameter
        for text in self.bad_values():
            spec = f"{self.accelerator}@{text}"
            with pytest.raises(InvalidRequestError) as caught:
                load(self.model, device=self.device, accelerators=self.stack(spec), cache=False)
            message = str(caught.value)
            assert self.accelerator in message, message
            allowed = "takes no value" if parameter is None else parameter.allowed()
            assert allowed in message, f"{spec!r} was refused without saying what is allowed: {message}"

    def test_each_value_reaches_apply(self) -> None:
        """Loaded as ``NAME@VALUE`` for each of `values`, the engine lists that spec and its ``apply`` sees
        the value."""
        from t2i_core import get_registry, load

        parameter = self.instance().parameter
        if parameter is None:
            pytest.skip(f"{self.accelerator!r} takes no value")
        self._skip_without_device()
        for value in self.good_values():
            spec = f"{self.accelerator}@{parameter.format(value)}"
            recorded = Accelerated(engine=None, applied=[], specs=[])  # type: ignore[arg-type]
            with pytest.MonkeyPatch.context() as patch:
                _record_applies(patch, get_registry().accelerators.values(), recorded)
                engine = load(self.model, device=self.device, accelerators=self.stack(spec), cache=False)
            assert spec in engine.accelerators, (spec, engine.accelerators)
            assert recorded.specs.count(spec) == 1, f"{spec!r}: apply ran as {recorded.specs}"

    def test_conflicts_are_refused_before_loading(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each registered accelerator it conflicts with is refused together with it, before any weights load."""
        from t2i_core import IncompatibleAcceleratorsError, get_registry, load

        registry = get_registry()
        conflicts = [name for name in self.instance().conflicts if name in registry.accelerators]
        if not conflicts:
            pytest.skip(f"{self.accelerator!r} declares no conflict with a registered accelerator")
        family = self.model.removeprefix("tiny:") if self.model.startswith("tiny:") else None
        if family is not None:
            provider = registry.provider(family)
            monkeypatch.setattr(provider, "load_pipeline", _refuse_loading)
        for conflict in conflicts:
            with pytest.raises(IncompatibleAcceleratorsError) as caught:
                load(self.model, device=self.device, accelerators=[self.accelerator, conflict], cache=False)
            assert {self.accelerator, conflict} & set(caught.value.names), caught.value

    def test_undeclared_devices_are_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a device type it does not declare (CPU, here), loading with it is refused."""
        from t2i_core import IncompatibleAcceleratorsError, load

        if "cpu" in self.instance().devices:
            pytest.skip(f"{self.accelerator!r} runs on CPU; other devices are not checked here")
        with pytest.raises(IncompatibleAcceleratorsError):
            load(self.model, device="cpu", accelerators=[self.accelerator], cache=False)

    def test_applied_once_in_phase_order(self, accelerated: Accelerated) -> None:
        """Its ``apply`` runs exactly once per load, in phase order with the rest of the stack."""
        from t2i_core import PHASES, get_registry

        assert accelerated.applied.count(self.accelerator) == 1, accelerated.applied
        registry = get_registry()
        phases = [PHASES.index(registry.accelerator(name).phase) for name in accelerated.applied]
        assert phases == sorted(phases), accelerated.applied
        assert self.instance().spec in accelerated.engine.accelerators

    def test_takes_effect(self, plain: Engine, accelerated: Accelerated) -> None:
        """What `effect` observes differs between an engine with the accelerator and one without."""
        with_it, without = self.effect(accelerated.engine), self.effect(plain)
        assert with_it != without, f"{self.accelerator!r} changed nothing that effect() sees ({with_it!r})"

    def test_images_stay_within_tolerance(self, plain: Engine, accelerated: Accelerated) -> None:
        """Lossless: bit-exact with plain fp32 (or within a stated tolerance); otherwise within `tolerance`."""
        lossless = self.instance().lossless
        tolerance = self.tolerance
        if tolerance is None:
            assert lossless, f"{self.accelerator!r} is not lossless: declare tolerance (levels of 255) and why"
            tolerance = 0
        ours, reference = self.image(accelerated.engine), self.plain_image(plain)
        if tolerance == 0:
            assert_images_equal(ours, reference, "plain fp32")
        else:
            assert self.why, "say why the images differ from plain fp32 (why = ...)"
            assert_images_close(ours, reference, max_levels=tolerance, why=self.why)


def _record_applies(patch: pytest.MonkeyPatch, accelerators: Iterable[Accelerator], into: Accelerated) -> None:
    """Record each ``apply`` of `accelerators` into `into`, in order. The classes are patched, not the
    instances: the registry configures ``NAME@VALUE`` as copies of the registered instance."""
    for cls in {type(accelerator) for accelerator in accelerators}:
        original = cls.apply
        patch.setattr(cls, "apply", _recording(getattr(original, "__wrapped__", original), into))


def _recording(original: Any, into: Accelerated) -> Any:
    def apply(self: Accelerator, pipeline: Any, context: Any) -> None:
        into.applied.append(self.name)
        into.specs.append(self.spec)
        original(self, pipeline, context)

    apply.__wrapped__ = original  # type: ignore[attr-defined]
    return apply


def _refuse_loading(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("weights were loaded: the accelerators should have been refused before")
