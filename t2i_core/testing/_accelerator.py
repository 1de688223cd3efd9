"""`AcceleratorConformance`: the promises every accelerator plugin keeps, as tests to subclass."""

from __future__ import annotations

from collections.abc import Iterator
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
    applied: list[str]


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
    dtype itself) with a plain ``fp32`` one, on `model` and `device`.
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
        registry = get_registry()
        applied: list[str] = []
        with pytest.MonkeyPatch.context() as patch:
            for accelerator in registry.accelerators.values():
                patch.setattr(accelerator, "apply", _recording(accelerator, applied))
            engine = load(self.model, device=self.device, accelerators=self.stack(), cache=False)
        yield Accelerated(engine=engine, applied=applied)

    # -- helpers ---------------------------------------------------------------------------------
    def instance(self) -> Accelerator:
        from t2i_core import get_registry

        return get_registry().accelerator(self.accelerator)

    def stack(self) -> list[str]:
        """The accelerators of the accelerated engine: ``fp32`` and this one, unless it sets the dtype."""
        accelerator = self.instance()
        if accelerator.phase == "dtype" or "fp32" in accelerator.conflicts:
            return [self.accelerator]
        return ["fp32", self.accelerator]

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
        """Its phase is one of PHASES, its devices are known device types, its conflicts are other names."""
        from t2i_core import PHASES
        from t2i_core.engine.sources import DEVICE_TYPES

        accelerator = self.instance()
        assert accelerator.phase in PHASES, f"phase {accelerator.phase!r} is not one of {PHASES}"
        assert accelerator.devices and set(accelerator.devices) <= set(DEVICE_TYPES), accelerator.devices
        assert all(isinstance(name, str) and name != self.accelerator for name in accelerator.conflicts)
        assert accelerator.description, "describe it in one line (t2i plugins shows it)"

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
        assert self.accelerator in accelerated.engine.accelerators

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


def _recording(accelerator: Accelerator, applied: list[str]) -> Any:
    original = accelerator.apply

    def apply(pipeline: Any, context: Any) -> None:
        applied.append(accelerator.name)
        original(pipeline, context)

    return apply


def _refuse_loading(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("weights were loaded: the accelerators should have been refused before")
