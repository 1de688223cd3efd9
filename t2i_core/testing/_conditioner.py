"""`ConditionerConformance`: the promises every conditioner plugin keeps, as tests to subclass."""

from __future__ import annotations

import base64
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from ._images import assert_images_equal, reference_call
from ._support import (
    cached_reference,
    forget_references,
    light_import_report,
    offers_tiny,
    require_family,
    run_cli,
)

if TYPE_CHECKING:
    from t2i_core import Conditioner, Engine, GenerationRequest, GenerationResult


def _refuse_work(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("work started: the request should have been refused before")


class ConditionerConformance:
    """The conformance tests of a conditioner plugin.

    Subclass it in a test module (``class TestMyConditioner(ConditionerConformance)``), set
    `conditioner` (the registered name) and `wanted` (request fields that make it act)::

        class TestShout(ConditionerConformance):
            conditioner = "shout"
            wanted = {"prompt": "a cat!"}
            reference_kwargs = {"prompt": "A CAT!"}

    The tests run on `family`'s tiny checkpoint, on CPU in float32, once per class.
    """

    #: the conditioner's registered name (`Conditioner.name`)
    conditioner: ClassVar[str]
    #: request fields (besides prompt, seed and steps) of a request the conditioner acts on
    wanted: ClassVar[Mapping[str, Any]]
    #: the family whose tiny checkpoint the tests run on (one of the conditioner's families)
    family: ClassVar[str] = "sd15"
    #: the checkpoint; None = ``tiny:<family>``
    model: ClassVar[str | None] = None
    steps: ClassVar[int] = 2
    seed: ClassVar[int] = 31
    prompt: ClassVar[str] = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
    #: the raw diffusers arguments `wanted` amounts to, over the plain call (e.g. ``{"negative_prompt": "ugly"}``);
    #: None = no comparison with raw diffusers, unless `reference` is overridden
    reference_kwargs: ClassVar[Mapping[str, Any] | None] = None
    #: requests refused before any work: the field the error names → request fields
    refused_requests: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    # -- what a subclass may override ------------------------------------------------------------
    def reference_pipeline(self, folder: str) -> Any:
        """The raw diffusers pipeline of `folder` (loaded once per class); default ``AutoPipelineForText2Image``."""
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(folder)

    def reference(self, folder: str, **call_kwargs: Any) -> list[Any]:
        """Raw diffusers images of a wanted request for `call_kwargs`: the plain call (``prompt``,
        ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``, ``num_images_per_prompt``,
        ``generator``, ``negative_prompt`` when given) updated with `reference_kwargs`."""
        return list(self.raw_pipeline(folder)(**call_kwargs).images)

    def raw_pipeline(self, folder: str) -> Any:
        """`reference_pipeline(folder)`, loaded once per class (for `reference` overrides to call)."""
        return cached_reference(type(self), folder, self.reference_pipeline)

    def plain_reference(self, folder: str, **call_kwargs: Any) -> list[Any]:
        """Raw diffusers images of a request the conditioner does not want: ``AutoPipelineForText2Image``."""
        from diffusers import AutoPipelineForText2Image

        pipeline = cached_reference(ConditionerConformance, folder, AutoPipelineForText2Image.from_pretrained)
        return list(pipeline(**call_kwargs).images)

    # -- fixtures --------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, t2i_tiny_cache: Path) -> Iterator[Engine]:
        """`model` on CPU in float32."""
        from t2i_core import load

        if cls.model is None:
            require_family(cls.family)
        yield load(cls.model or f"tiny:{cls.family}", device="cpu", accelerators=("fp32",))
        forget_references(cls)

    @pytest.fixture(scope="class")
    @classmethod
    def conditioned(cls, engine: Engine) -> GenerationResult:
        """The image of the wanted request, made once."""
        return engine.generate(cls().make_request(**cls.wanted))

    # -- helpers ---------------------------------------------------------------------------------
    def make_request(self, **changes: Any) -> GenerationRequest:
        """The plain test request (`prompt`, `seed`, `steps`) with `changes`."""
        from t2i_core import GenerationRequest

        fields: dict[str, Any] = {"prompt": self.prompt, "seed": self.seed, "num_inference_steps": self.steps}
        fields.update(changes)
        return GenerationRequest(**fields)

    def instance(self) -> Conditioner:
        from t2i_core import get_registry

        return get_registry().conditioners[self.conditioner]

    def raw(self, engine: Engine, resolved: GenerationRequest, extra: Mapping[str, Any] | None = None) -> list[Any]:
        """Raw diffusers images for a request as `engine` resolved it: `reference` with `extra` call
        arguments for a wanted request (`extra` given), `plain_reference` otherwise."""
        kwargs = reference_call(resolved)
        if extra is None:
            return self.plain_reference(engine.source, **kwargs)
        kwargs.update(extra)
        return self.reference(engine.source, **kwargs)

    # -- tests -----------------------------------------------------------------------------------
    def test_registers_and_wants_without_importing_torch(self) -> None:
        """Registering, and ``wants()`` on a wanted and a plain request, import no torch; wants() is right."""
        blob = base64.b64encode(pickle.dumps(dict(self.wanted))).decode()
        report = light_import_report(
            "import base64, pickle\n"
            "from t2i_core import GenerationRequest, get_registry\n"
            "registry = get_registry()\n"
            f"conditioner = registry.conditioners.get({self.conditioner!r})\n"
            "report['errors'] = [info.error for info in registry.failures()]\n"
            "if conditioner is not None:\n"
            f"    fields = {{'prompt': {self.prompt!r}, **pickle.loads(base64.b64decode({blob!r}))}}\n"
            "    wanted = GenerationRequest(**fields)\n"
            f"    report['wants'] = conditioner.wants(wanted)\n"
            f"    report['wants_plain'] = conditioner.wants(GenerationRequest(prompt={self.prompt!r}))\n"
        )
        assert "wants" in report, f"conditioner {self.conditioner!r} is not registered: {report['errors']}"
        assert report["wants"] is True, f"wants() is False for a request with {dict(self.wanted)}"
        assert report["wants_plain"] is False, "wants() is True for a plain request"
        assert report["heavy"] == [], f"registering or wants() imported {report['heavy']}"

    def test_t2i_plugins_lists_it(self) -> None:
        """``t2i plugins`` lists the conditioner, and its plugin without an error."""
        import json

        code, out, err = run_cli("plugins", "--json")
        assert code == 0, err
        document = json.loads(out)
        assert self.conditioner in document["conditioners"]
        owners = [p for p in document["plugins"] if f"conditioner:{self.conditioner}" in p["registers"]]
        assert len(owners) == 1 and owners[0]["error"] is None, owners

    def test_a_request_it_does_not_want_is_untouched(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """A plain request never reaches ``prepare``/``condition``, and equals raw diffusers' plain call."""
        conditioner = self.instance()
        monkeypatch.setattr(conditioner, "prepare", _refuse_work)
        monkeypatch.setattr(conditioner, "condition", _refuse_work)
        result = engine.generate(self.make_request())
        assert_images_equal(result.images, self.raw(engine, result.request))

    def test_matches_the_reference(self, engine: Engine, conditioned: GenerationResult) -> None:
        """The wanted request equals raw diffusers called with `reference_kwargs`, bit for bit."""
        overridden = type(self).reference is not ConditionerConformance.reference
        if self.reference_kwargs is None and not overridden:
            pytest.skip("declare reference_kwargs (or override reference) to compare with raw diffusers")
        assert_images_equal(conditioned.images, self.raw(engine, conditioned.request, self.reference_kwargs or {}))

    def test_state_is_made_once_per_engine(self, engine: Engine, conditioned: GenerationResult) -> None:
        """A second wanted request reuses what the first left in ``engine.state``, and gives the same image."""
        before = dict(engine.state)
        again = engine.generate(self.make_request(**self.wanted))
        for key, value in before.items():
            assert engine.state.get(key) is value, f"engine.state[{key!r}] was made again"
        assert_images_equal(again.images, conditioned.images, "the first run")

    def test_refusals_happen_before_work(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each of `refused_requests` is refused naming its field, before ``condition`` or the pipeline run."""
        from t2i_core import T2IError

        if not self.refused_requests:
            pytest.skip(
                f"nothing to refuse: conditioner {self.conditioner!r} declares no refused_requests "
                "(set it if the conditioner refuses some requests before any work, in prepare())"
            )
        monkeypatch.setattr(self.instance(), "condition", _refuse_work)
        monkeypatch.setattr(engine.provider, "run", _refuse_work)
        for field, changes in self.refused_requests.items():
            what = f"refused_requests[{field!r}] = {dict(changes)!r}"
            with pytest.raises(T2IError) as caught:
                engine.generate(self.make_request(**changes))
                pytest.fail(f"{what}: the request was accepted; it must be refused naming {field!r}", pytrace=False)
            named = getattr(caught.value, "field", None)
            assert named == field or (named is None and field in str(caught.value)), (
                f"{what} was refused, but naming {named!r} rather than {field!r}: {caught.value}"
            )

    def test_other_families_are_refused(self, t2i_tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a family outside `Conditioner.families`, a wanted request is refused before any work."""
        from t2i_core import UnsupportedFeatureError, get_registry, load

        conditioner = self.instance()
        if conditioner.families is None:
            pytest.skip(f"{self.conditioner!r} works with every family")
        registry = get_registry()
        candidates = [
            *sorted(registry.first_party("provider")),
            *sorted(registry.providers),
        ]
        others = [
            name for name in dict.fromkeys(candidates)
            if name not in conditioner.families and offers_tiny(registry.providers[name])
        ]  # fmt: skip
        if not others:
            outside = "sdxl" if "sd15" in conditioner.families else "sd15"
            pytest.skip(
                f"no installed family outside {sorted(conditioner.families)} offers a tiny checkpoint: "
                f"install one (e.g. from a checkout of t2i: python -m pip install -e plugins/{outside}) to run this cross-family check"
            )
        other = load(f"tiny:{others[0]}", device="cpu", accelerators=("fp32",))
        monkeypatch.setattr(conditioner, "prepare", _refuse_work)
        monkeypatch.setattr(other.provider, "run", _refuse_work)
        with pytest.raises(UnsupportedFeatureError):
            other.generate(self.make_request(**self.wanted))
