"""t2i-lora on the transformer families (FLUX.1, SD3, Z-Image): LoRAs equal raw diffusers, bit for bit.

The reference is what a diffusers user writes: ``load_lora_weights(file, adapter_name=n)`` for
each LoRA, ``set_adapters(names, adapter_weights=scales)``, then the same call. The files are
built offline by `t2i_lora.tiny` (PEFT adapters on the transformer's attention projections, and
on the CLIP text encoders the pipeline loads LoRAs into; for FLUX.1 also sd-scripts' Kohya layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from t2i_core import (
    Embedding,
    Engine,
    GenerationRequest,
    InvalidRequestError,
    Lora,
    UnsupportedFeatureError,
    load,
)
from t2i_core.testing import (
    assert_images_close,
    assert_images_differ,
    assert_images_equal,
    cpu_generators,
    raw_pipeline,
    refuse_to_run,
    require_family,
)

pytest.importorskip("t2i_lora")
from t2i_lora import tiny

STEPS = 2
PROMPT = "a lighthouse on a cliff"
#: each family's guidance, given to both sides (Z-Image-Turbo's is 0: no CFG)
GUIDANCE = {"flux": 3.5, "sd3": 4.0, "z-image": 0.0}
FAMILIES = tuple(GUIDANCE)
#: the CLIP text encoders of each family that diffusers loads LoRAs into (Z-Image's Qwen3 takes none)
TEXT_ENCODERS = {"flux": True, "sd3": True, "z-image": False}
#: fused weights compute W + s·BA once instead of Wx + s·B(Ax) each step: other rounding, same image
FUSE_LEVELS = 2

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    require_family(request.param)
    return str(request.param)


@pytest.fixture(scope="module")
def engine(family: str, t2i_tiny_cache: Path) -> Engine:
    # Weights of its own: the adapters loaded here go nowhere else.
    return load(f"tiny:{family}", device="cpu", accelerators=("fp32",), cache=False)


@pytest.fixture(scope="module")
def files(engine: Engine, family: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"lora-{family}")
    return {
        "style": tiny.lora_file(engine.source, root / "style.safetensors", seed=1, text_encoders=TEXT_ENCODERS[family]),
        "detail": tiny.lora_file(engine.source, root / "detail.safetensors", seed=2, rank=2, alpha=4),
    }


@pytest.fixture(scope="module")
def raw(engine: Engine) -> Iterator[Any]:
    pipeline = raw_pipeline(engine.source)
    yield pipeline


@pytest.fixture
def raw_lora(raw: Any) -> Iterator[Any]:
    yield raw
    raw.unload_lora_weights()


def request(family: str, **fields: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT, seed=5, num_inference_steps=STEPS, height=64, width=64, guidance_scale=GUIDANCE[family], **fields
    )


def raw_images(pipeline: Any, family: str, loras: tuple[tuple[Path, float], ...] = ()) -> list[Any]:
    """Raw diffusers: each LoRA loaded under a name, then set_adapters with the scales."""
    for index, (path, _) in enumerate(loras):
        pipeline.load_lora_weights(str(path), adapter_name=f"raw{index}")
    if loras:
        pipeline.set_adapters([f"raw{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
    call = {"height": 64, "width": 64, "guidance_scale": GUIDANCE[family]}
    return list(pipeline(prompt=PROMPT, num_inference_steps=STEPS, generator=cpu_generators(5, 1), **call).images)


def test_a_lora_matches_raw_diffusers(engine: Engine, family: str, files: dict[str, Path], raw_lora: Any) -> None:
    result = engine.generate(request(family, loras=(Lora(str(files["style"]), scale=0.8),)))
    assert_images_equal(result.images, raw_images(raw_lora, family, ((files["style"], 0.8),)))
    assert_images_differ(result.images, engine.generate(request(family)).images, "the LoRA")


def test_two_loras_match_raw_diffusers(engine: Engine, family: str, files: dict[str, Path], raw_lora: Any) -> None:
    loras = ((files["style"], 0.8), (files["detail"], 0.5))
    result = engine.generate(request(family, loras=tuple(Lora(str(path), scale) for path, scale in loras)))
    assert_images_equal(result.images, raw_images(raw_lora, family, loras))


def test_no_lora_after_loras_is_the_base_image(engine: Engine, family: str, files: dict[str, Path], raw: Any) -> None:
    engine.generate(request(family, loras=(Lora(str(files["detail"]), scale=1.0),)))
    assert_images_equal(engine.generate(request(family)).images, raw_images(raw, family))


def test_fused_loras_are_within_tolerance_and_unfusing_restores_the_base(
    engine: Engine, family: str, files: dict[str, Path], raw: Any
) -> None:
    fused = load(f"tiny:{family}", device="cpu", accelerators=("fp32", "fuse_lora"), cache=False)
    for loras in ((Lora(str(files["style"]), 0.8),), (Lora(str(files["style"]), 0.5), Lora(str(files["detail"]), 1.0))):
        ours = fused.generate(request(family, loras=loras)).images
        reference = engine.generate(request(family, loras=loras)).images
        assert_images_close(ours, reference, max_levels=FUSE_LEVELS, why="fused weights round differently")
    assert_images_equal(fused.generate(request(family)).images, raw_images(raw, family))


def test_embeddings_are_refused_naming_the_family_and_the_feature(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, family: str
) -> None:
    refuse_to_run(monkeypatch, engine)
    with pytest.raises(UnsupportedFeatureError, match=rf"family '{family}' does not support textual-inversion"):
        engine.generate(request(family, embeddings=(Embedding("neg.safetensors", token="<neg>"),)))


def test_a_lora_for_another_model_is_refused_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, family: str, tmp_path: Path
) -> None:
    refuse_to_run(monkeypatch, engine)
    unet = tiny.lora_file(load("tiny:sd15", device="cpu").source, tmp_path / "sd15.safetensors")
    with pytest.raises(InvalidRequestError, match=r"sd15.safetensors is for a UNet \(SD 1.x, SDXL\)"):
        engine.generate(request(family, loras=(Lora(str(unet)),)))
    # The same layers in a model of another width (the other families' tiny transformers).
    other = next(f for f in FAMILIES if f != family)
    require_family(other)
    wide = tiny.lora_file(load(f"tiny:{other}", device="cpu").source, tmp_path / "other.safetensors")
    with pytest.raises(
        InvalidRequestError,
        match=r"loras\[0\].source.*other.safetensors (gives its layer|adapts a layer it lacks)",
    ):
        engine.generate(request(family, loras=(Lora(str(wide)),)))


def test_a_transformer_lora_on_a_unet_model_is_refused(engine: Engine, tmp_path: Path) -> None:
    path = tiny.lora_file(engine.source, tmp_path / "transformer.safetensors")
    sd15 = load("tiny:sd15", device="cpu")
    with pytest.raises(InvalidRequestError, match=r"transformer.safetensors is for a transformer"):
        sd15.resolve(GenerationRequest(prompt=PROMPT, loras=(Lora(str(path)),)))


def test_a_kohya_flux_lora_matches_raw_diffusers(engine: Engine, family: str, raw_lora: Any, tmp_path: Path) -> None:
    """sd-scripts' layout (the original model's fused qkv layers, ``.alpha``), converted by diffusers at load."""
    if family != "flux":
        pytest.skip("the Kohya layout here is FLUX.1's")
    path = tiny.lora_file(engine.source, tmp_path / "kohya.safetensors", layout="kohya", alpha=2, text_encoders=True)
    result = engine.generate(request(family, loras=(Lora(str(path), scale=0.8),)))
    assert_images_equal(result.images, raw_images(raw_lora, family, ((path, 0.8),)))
    assert_images_differ(result.images, engine.generate(request(family)).images, "the Kohya LoRA")
