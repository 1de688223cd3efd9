"""`ProviderConformance`: the promises every model-family plugin keeps, as tests to subclass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from ._images import (
    assert_images_close,
    assert_images_differ,
    assert_images_equal,
    reference_call,
)
from ._support import (
    cached_reference,
    forget_references,
    light_import_report,
    other_shipped_family_hint,
    read_index,
    run_cli,
    shipped_families,
    tiny_folder,
)

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest, GenerationResult, ModelProvider


class ProviderConformance:
    """The conformance tests of a model provider (a family plugin).

    Subclass it in a test module, name the subclass ``Test...`` and set `family`; pytest then
    runs every test below against your installed plugin::

        from t2i_core.testing import ProviderConformance

        class TestMyFamily(ProviderConformance):
            family = "my-family"

    Images are compared bit for bit with raw diffusers (`reference`), on CPU in float32, with
    few steps at the tiny checkpoint's size. The engine and the reference pipeline are loaded
    once per class. Override a test (same name) to replace it, or set it to ``None`` to drop it.
    """

    #: the family name under test (`ModelProvider.name`)
    family: ClassVar[str]
    #: the checkpoint the tests load; None = ``tiny:<family>``
    model: ClassVar[str | None] = None
    #: denoising steps of the test images: few, so that the tests stay fast
    steps: ClassVar[int] = 2
    seed: ClassVar[int] = 31
    prompt: ClassVar[str] = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
    negative_prompt: ClassVar[str] = "ugly, deformed"
    #: a guidance scale other than the family's default
    guidance_scale: ClassVar[float] = 3.0
    #: a (height, width) other than the native size; None = the native height and twice its width
    other_size: ClassVar[tuple[int, int] | None] = None
    #: family options added to every test request (e.g. fewer prior steps)
    request_options: ClassVar[Mapping[str, Any]] = {}
    #: extra arguments of every reference call: what `request_options` amount to in diffusers
    reference_kwargs: ClassVar[Mapping[str, Any]] = {}
    #: requests the family refuses before any work: the field its error names → request fields,
    #: e.g. ``{"height": {"height": 72}}`` for a family whose sizes must be multiples of 16
    invalid_requests: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    # -- what a subclass may override ------------------------------------------------------------
    def reference_pipeline(self, folder: str) -> Any:
        """The raw diffusers pipeline of the checkpoint in `folder` (loaded once per class).

        The default is what a diffusers user writes: ``AutoPipelineForText2Image.from_pretrained(folder)``.
        """
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(folder)

    def reference(self, folder: str, **call_kwargs: Any) -> list[Any]:
        """Raw diffusers images for `call_kwargs`: ``prompt``, ``height``, ``width``,
        ``num_inference_steps``, ``guidance_scale``, ``num_images_per_prompt``, ``generator``
        (as t2i seeds it), ``negative_prompt`` when the request has one, and `reference_kwargs`.

        The default calls `reference_pipeline(folder)` with them.
        """
        return list(self.raw_pipeline(folder)(**call_kwargs).images)

    def raw_pipeline(self, folder: str) -> Any:
        """`reference_pipeline(folder)`, loaded once per class (for `reference` overrides to call)."""
        return cached_reference(type(self), folder, self.reference_pipeline)

    # -- fixtures --------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, t2i_tiny_cache: Path) -> Iterator[Engine]:
        """The engine under test: `model` on CPU in float32 (the exact reference)."""
        from t2i_core import load

        yield load(cls()._model(), device="cpu", accelerators=("fp32",))
        forget_references(cls)

    @pytest.fixture(scope="class")
    @classmethod
    def base(cls, engine: Engine) -> GenerationResult:
        """The image of the plain test request, made once."""
        return engine.generate(cls().make_request())

    @pytest.fixture(scope="class")
    @classmethod
    def rerun(cls, engine: Engine) -> tuple[GenerationResult, list[tuple[int, int]]]:
        """The plain test request made again, with a progress callback, and the calls it got."""
        calls: list[tuple[int, int]] = []
        result = engine.generate(cls().make_request(), progress=lambda step, total: calls.append((step, total)))
        return result, calls

    # -- helpers -----------------------------------------------------------------------------------
    def _model(self) -> str:
        return self.model or f"tiny:{self.family}"

    def make_request(self, **changes: Any) -> GenerationRequest:
        """The test request (`prompt`, `seed`, `steps`, `request_options`) with `changes`."""
        from t2i_core import GenerationRequest

        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "seed": self.seed,
            "num_inference_steps": self.steps,
            "options": dict(self.request_options),
        }
        fields.update(changes)
        return GenerationRequest(**fields)

    def raw(self, engine: Engine, resolved: GenerationRequest) -> list[Any]:
        """The reference images for a request as `engine` resolved it."""
        return self.reference(engine.source, **reference_call(resolved, self.reference_kwargs))

    def _provider(self) -> ModelProvider:
        from t2i_core import get_registry

        return get_registry().provider(self.family)

    def _local_folder(self, engine: Engine) -> Path:
        folder = Path(engine.source)
        if not (folder / "model_index.json").is_file():
            pytest.skip(f"{self._model()} is not a local diffusers folder")
        return folder

    # -- registration ----------------------------------------------------------------------------
    def test_registers_without_importing_torch(self) -> None:
        """Discovering the plugin registers the family and imports no torch, diffusers or transformers."""
        report = light_import_report(
            "from t2i_core import get_registry\n"
            "registry = get_registry()\n"
            "report['families'] = sorted(registry.providers)\n"
            "report['errors'] = [info.error for info in registry.failures()]\n"
        )
        assert self.family in report["families"], f"family {self.family!r} is not registered: {report['errors']}"
        assert report["heavy"] == [], f"registering imported {report['heavy']}: import them inside methods"

    def test_t2i_plugins_lists_it(self) -> None:
        """``t2i plugins`` lists the family, and the plugin that registers it without an error."""
        import json

        code, out, err = run_cli("plugins", "--json")
        assert code == 0, err
        document = json.loads(out)
        assert self.family in document["families"]
        owners = [p for p in document["plugins"] if f"provider:{self.family}" in p["registers"]]
        assert len(owners) == 1 and owners[0]["error"] is None, owners

    # -- detection -------------------------------------------------------------------------------
    def test_detects_its_own_checkpoint(self, engine: Engine) -> None:
        """The family recognises its checkpoint's model_index.json, and loading the folder finds it."""
        from t2i_core import load

        folder = self._local_folder(engine)
        assert self._provider().detect(read_index(folder)), f"detect() refuses {folder}/model_index.json"
        detected = load(str(folder), device="cpu", accelerators=("fp32",))
        assert detected.family == self.family, f"{folder} is detected as family {detected.family!r}"

    def test_detects_no_other_shipped_family(self) -> None:
        """The family claims none of the tiny checkpoints of the families t2i ships."""
        others = shipped_families(exclude=self.family)
        if not others:
            pytest.skip(other_shipped_family_hint(self.family))
        provider = self._provider()
        for other in others:
            index = read_index(tiny_folder(other))
            assert not provider.detect(index), (
                f"family {self.family!r} claims tiny:{other} (pipeline class {index.get('_class_name')!r})"
            )

    def test_forced_family_on_another_checkpoint_is_refused(self) -> None:
        """``family=<this family>`` on a checkpoint of another family is refused with a t2i error."""
        from t2i_core import T2IError, load

        others = shipped_families(exclude=self.family)
        if not others:
            pytest.skip(other_shipped_family_hint(self.family))
        other = "sd15" if "sd15" in others else others[0]
        folder = tiny_folder(other)
        with pytest.raises(T2IError):
            load(str(folder), family=self.family, device="cpu", accelerators=("fp32",), cache=False)

    # -- images ------------------------------------------------------------------------------------
    def test_defaults_fill_the_request(self, engine: Engine, base: GenerationResult) -> None:
        """Size, guidance and scheduler default to the family's; the seed and steps are as asked."""
        provider = self._provider()
        height, width = provider.native_size(engine.pipeline)
        defaults = provider.pipeline_defaults(engine.pipeline)
        request = base.request
        assert (request.height, request.width) == (defaults.height or height, defaults.width or width)
        assert request.guidance_scale == defaults.guidance_scale
        assert request.num_inference_steps == self.steps and request.scheduler == "default"
        assert base.seeds == [self.seed] and base.family == self.family
        assert [image.size for image in base.images] == [(request.width, request.height)]

    def test_matches_the_reference(self, engine: Engine, base: GenerationResult) -> None:
        """The image equals raw diffusers' for the same checkpoint and arguments, bit for bit."""
        assert_images_equal(base.images, self.raw(engine, base.request))

    def test_generates_deterministically(self, base: GenerationResult, rerun: tuple[GenerationResult, Any]) -> None:
        """The same request gives the same image again (the second time with a progress callback)."""
        assert_images_equal(rerun[0].images, base.images, "the first run")

    def test_honours_the_seed(self, engine: Engine, base: GenerationResult) -> None:
        """Another seed gives another image, reported in `seeds`; no seed resolves to a fresh one."""
        other = engine.generate(self.make_request(seed=self.seed + 100))
        assert other.seeds == [self.seed + 100]
        assert_images_differ(other.images, base.images, "another seed")
        fresh, _ = engine.resolve(self.make_request(seed=None))
        assert fresh.seed is not None, "no seed must resolve to a fresh one"

    def test_honours_the_size(self, engine: Engine, base: GenerationResult) -> None:
        """A non-native (height, width) gives an image of that size, equal to raw diffusers'."""
        assert base.request.height is not None and base.request.width is not None
        height, width = self.other_size or (base.request.height, 2 * base.request.width)
        result = engine.generate(self.make_request(height=height, width=width))
        assert [image.size for image in result.images] == [(width, height)]
        assert_images_equal(result.images, self.raw(engine, result.request))

    def test_honours_the_steps(self, engine: Engine, base: GenerationResult) -> None:
        """Another step count changes the image, as it does in raw diffusers."""
        result = engine.generate(self.make_request(num_inference_steps=self.steps + 1))
        assert result.request.num_inference_steps == self.steps + 1
        assert_images_differ(result.images, base.images, "another step count")
        assert_images_equal(result.images, self.raw(engine, result.request))

    def test_honours_the_guidance_scale(self, engine: Engine, base: GenerationResult) -> None:
        """Another guidance scale changes the image, as it does in raw diffusers."""
        scale = self.guidance_scale
        if scale == base.request.guidance_scale:
            scale += 1.5
        result = engine.generate(self.make_request(guidance_scale=scale))
        assert result.request.guidance_scale == scale
        assert_images_differ(result.images, base.images, "another guidance scale")
        assert_images_equal(result.images, self.raw(engine, result.request))

    def test_honours_the_negative_prompt(self, engine: Engine, base: GenerationResult) -> None:
        """A negative prompt changes the image, as it does in raw diffusers."""
        result = engine.generate(self.make_request(negative_prompt=self.negative_prompt))
        assert_images_differ(result.images, base.images, "a negative prompt")
        assert_images_equal(result.images, self.raw(engine, result.request))

    def test_num_images_use_consecutive_seeds(self, engine: Engine, base: GenerationResult) -> None:
        """``num_images=2`` gives seeds [s, s+1], equal to raw diffusers' batch; image 0 is the lone run's."""
        result = engine.generate(self.make_request(num_images=2))
        assert result.seeds == [self.seed, self.seed + 1]
        assert_images_equal(result.images, self.raw(engine, result.request))
        assert_images_close(
            result.images[:1], base.images, max_levels=1, why="a batch of 2 rounds float32 differently from a lone run"
        )

    def test_progress_is_reported_once_per_step(self, rerun: tuple[GenerationResult, list[tuple[int, int]]]) -> None:
        """``generate(progress=)`` is called once per denoising step: (1, n), (2, n) ... (n, n)."""
        calls = rerun[1]
        assert calls, "progress was never called"
        total = calls[-1][1]
        assert total >= self.steps, f"total {total} < {self.steps} steps"
        assert calls == [(step, total) for step in range(1, total + 1)], calls

    def test_progress_can_cancel(self, engine: Engine) -> None:
        """A progress callback that returns False stops the generation with GenerationCancelled."""
        from t2i_core import GenerationCancelled

        with pytest.raises(GenerationCancelled):
            engine.generate(self.make_request(), progress=lambda step, total: False)

    # -- refusals ----------------------------------------------------------------------------------
    def test_refuses_unknown_and_bad_options(self, engine: Engine) -> None:
        """An unknown option, and a value of the wrong type for each declared option, are refused naming it."""
        from t2i_core import InvalidRequestError

        with pytest.raises(InvalidRequestError) as caught:
            engine.resolve(self.make_request(options={**self.request_options, "no_such_option": 1}))
        assert caught.value.field == "options['no_such_option']"
        for option in self._provider().options:
            bad = 12345 if option.type is str else "not-a-value"
            with pytest.raises(InvalidRequestError) as caught:
                engine.resolve(self.make_request(options={**self.request_options, option.name: bad}))
            assert caught.value.field == f"options[{option.name!r}]", caught.value

    def test_refuses_unknown_and_unsupported_schedulers(self, engine: Engine) -> None:
        """An unknown scheduler name, and each shared one the family does not run, are refused naming the field."""
        from t2i_core import InvalidRequestError, schedulers

        provider = self._provider()
        runs = schedulers.family_names(provider.schedulers, provider.named_schedulers)
        for name in ["no-such-scheduler", *(name for name in schedulers.SCHEDULERS if name not in runs)]:
            with pytest.raises(InvalidRequestError) as caught:
                engine.resolve(self.make_request(scheduler=name))
            assert caught.value.field == "scheduler"

    def test_every_scheduler_it_declares_runs(self, engine: Engine) -> None:
        """Each scheduler the family declares (shared and its own) makes an image with that scheduler class."""
        from t2i_core import schedulers

        provider = self._provider()
        own = dict(provider.named_schedulers)
        for name in schedulers.family_names(provider.schedulers, own):
            if name != schedulers.DEFAULT and not schedulers.installed(name, own):
                continue  # needs a package this environment lacks (dpm++-sde: torchsde)
            result = engine.generate(self.make_request(scheduler=name, num_inference_steps=1))
            assert result.request.scheduler == name and len(result.images) == 1
            if name != schedulers.DEFAULT:
                class_name = (own.get(name) or schedulers.SCHEDULERS[name])[0]
                used = type(provider.scheduler_owner(engine.pipeline).scheduler).__name__
                assert used == class_name, f"scheduler {name!r} ran {used}, not {class_name}"

    def test_refuses_unsupported_features(self, engine: Engine) -> None:
        """Conditioners restricted to other families are refused with UnsupportedFeatureError, before work."""
        from PIL import Image

        from t2i_core import Control, UnsupportedFeatureError, get_registry

        restricted = [
            c for c in get_registry().ordered_conditioners() if c.families is not None and self.family not in c.families
        ]
        candidates: list[dict[str, Any]] = [{"prompt_weighting": c.weighting} for c in restricted if c.weighting]
        candidates.append({"controls": (Control(image=Image.new("RGB", (64, 64)), model="some/controlnet"),)})
        checked = 0
        for conditioner in restricted:
            for changes in candidates:
                request = self.make_request(**changes)
                if not conditioner.wants(request):
                    continue
                with pytest.raises(UnsupportedFeatureError):
                    engine.resolve(request)
                checked += 1
                break
        if not checked:
            pytest.skip(f"every installed conditioner that this test can trigger supports {self.family!r}")

    def test_hires_fix_runs_or_is_refused(self, engine: Engine, base: GenerationResult) -> None:
        """With `ModelProvider.img2img_class` a hires request makes an image of `HiresFix.size`; without
        it the request is refused with UnsupportedFeatureError before any work."""
        from t2i_core import HiresFix, UnsupportedFeatureError

        hires = HiresFix(scale=2.0)
        request = self.make_request(hires=hires)
        if engine.provider.img2img_class is None:
            with pytest.raises(UnsupportedFeatureError, match="hires"):
                engine.resolve(request)
            return
        result = engine.generate(request)
        assert base.request.width is not None and base.request.height is not None
        size = hires.size(base.request.width, base.request.height)
        assert [image.size for image in result.images] == [size]

    def test_refuses_invalid_requests_before_work(self, engine: Engine) -> None:
        """Each of `invalid_requests` is refused by `Engine.resolve` (no image work), naming its field."""
        from t2i_core import T2IError

        if not self.invalid_requests:
            pytest.skip(
                f"nothing to refuse: family {self.family!r} declares no invalid_requests "
                "(set it if the family refuses some requests before any work, e.g. {'height': {'height': 72}})"
            )
        for field, changes in self.invalid_requests.items():
            what = f"invalid_requests[{field!r}] = {dict(changes)!r}"
            request: Any = None
            try:
                request = self.make_request(**changes)  # a request's own validators may refuse it
                engine.resolve(request)
            except T2IError as exc:
                named = getattr(exc, "field", None)
                assert named == field or (named is None and field in str(exc)), (
                    f"{what} was refused, but naming {named!r} rather than {field!r}: {exc}\nthe request: {request!r}"
                )
            except Exception as exc:
                raise AssertionError(
                    f"{what}: refused with {type(exc).__name__} rather than a T2IError naming {field!r}: {exc}"
                    f"\nthe request: {request!r}"
                ) from exc
            else:
                pytest.fail(
                    f"{what}: Engine.resolve accepted the request; the family must refuse it before any work, "
                    f"naming {field!r} (in check_request, or with an Option's bounds)\nthe request: {request!r}",
                    pytrace=False,
                )

    # -- engines -----------------------------------------------------------------------------------
    def test_cached_engines_share_weights(self, engine: Engine) -> None:
        """Two loads of one checkpoint share every torch module, but not the scheduler."""
        import torch

        from t2i_core import load

        other = load(self._model(), device="cpu", accelerators=("fp32",))
        assert other.pipeline is not engine.pipeline
        modules = {n: c for n, c in engine.pipeline.components.items() if isinstance(c, torch.nn.Module)}
        assert modules, "the pipeline has no torch modules"
        for name, module in modules.items():
            assert other.pipeline.components[name] is module, f"{name} is loaded twice"
        provider = self._provider()
        mine, theirs = provider.scheduler_owner(engine.pipeline), provider.scheduler_owner(other.pipeline)
        assert mine.scheduler is not theirs.scheduler, "engines share their scheduler (its state is per call)"

    def test_cli_generates_a_png(self, engine: Engine, tmp_path: Path) -> None:
        """``t2i generate --model <model>`` writes a PNG whose metadata names the family."""
        from PIL import Image

        out = tmp_path / "image.png"
        options = [f"--option={key}={value}" for key, value in self.request_options.items()]
        code, _, err = run_cli(
            "generate", self.prompt, "--model", self._model(), "--steps", "1", "--seed", "5",
            "--device", "cpu", "-o", str(out), *options,
        )  # fmt: skip
        assert code == 0, err
        with Image.open(out) as image:
            text = dict(getattr(image, "text", {}))
        assert text["family"] == self.family and text["seed"] == "5"
