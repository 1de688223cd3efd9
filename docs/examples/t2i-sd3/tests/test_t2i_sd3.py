"""t2i-sd3 passes the t2i conformance kit, and what SD3 adds is checked against raw diffusers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from t2i_core import Engine, GenerationRequest, InvalidRequestError, ModelNotFoundError
from t2i_core.testing import (
    AcceleratorConformance,
    ProviderConformance,
    assert_images_equal,
    cpu_generators,
    tiny_folder,
)

PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def raw_sd3(folder: str | Path) -> Any:
    """The checkpoint as a diffusers user loads Stable Diffusion 3 without T5."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class TestSd3(ProviderConformance):
    family = "sd3"
    # Sizes are whole transformer patches of whole latent pixels (16 pixels), at most 16 patches (256).
    invalid_requests = {"height": {"height": 72}, "width": {"width": 272}}

    def reference_pipeline(self, folder: str) -> Any:
        return raw_sd3(folder)


class TestFuseQkvOnATransformer(AcceleratorConformance):
    """The built-in accelerators find the transformer: no UNet needed."""

    accelerator = "fuse_qkv"
    model = "tiny:sd3"
    tolerance = 1
    why = "one fused matmul instead of three may round float32 differently"

    def effect(self, engine: Engine) -> Any:
        return sorted(name for name, _ in engine.pipeline.transformer.named_modules() if name.endswith("to_qkv"))


@pytest.fixture(scope="module")
def sd3(t2i_tiny_cache: Path) -> Engine:
    from t2i_core import load

    return load("tiny:sd3", device="cpu", accelerators=("fp32",))


@pytest.mark.parametrize(
    ("name", "class_name"),
    [("flow-euler", "FlowMatchEulerDiscreteScheduler"), ("flow-heun", "FlowMatchHeunDiscreteScheduler")],
)
def test_named_flow_schedulers_match_diffusers(sd3: Engine, name: str, class_name: str) -> None:
    import diffusers

    raw = raw_sd3(sd3.source)
    raw.scheduler = getattr(diffusers, class_name).from_config(raw.scheduler.config)
    expected = raw(PROMPT, num_inference_steps=3, generator=cpu_generators(8, 1)).images
    result = sd3.generate(GenerationRequest(prompt=PROMPT, seed=8, num_inference_steps=3, scheduler=name))
    assert type(sd3.pipeline.scheduler).__name__ == class_name
    assert_images_equal(result.images, expected)


def test_shared_schedulers_are_refused_with_the_family_s_own(sd3: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="default, flow-euler, flow-heun"):
        sd3.resolve(GenerationRequest(prompt=PROMPT, scheduler="ddim"))


def test_a_checkpoint_downloaded_without_t5_loads(
    sd3: Engine, tmp_path: Path, t2i_engine_factory: Callable[..., Engine]
) -> None:
    """model_index.json lists T5 (as the hub's does), but its folders were never downloaded."""
    folder = tmp_path / "sd3-without-t5"
    shutil.copytree(sd3.source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(OSError):  # what raw diffusers does without text_encoder_3=None
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.from_pretrained(folder)
    engine = t2i_engine_factory(str(folder))
    assert engine.family == "sd3" and engine.pipeline.text_encoder_3 is None
    request = GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=2)
    assert_images_equal(engine.generate(request).images, sd3.generate(request).images, "tiny:sd3")


def test_another_family_is_refused_before_its_weights_load(t2i_engine_factory: Callable[..., Engine]) -> None:
    with pytest.raises(ModelNotFoundError, match="it is a StableDiffusionPipeline, not a StableDiffusion3Pipeline"):
        t2i_engine_factory(str(tiny_folder("sd15")), family="sd3", cache=False)


def test_architecture_is_diffusers_config_layout() -> None:
    """architecture/ holds SD3 medium's configs as diffusers lays them out: they build the real models."""
    import torch
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    from t2i_core import get_registry

    folder = get_registry().provider("sd3").architecture_folder()
    assert folder is not None
    assert DiffusionPipeline.load_config(str(folder))["_class_name"] == "StableDiffusion3Pipeline"
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(
            SD3Transformer2DModel.load_config(str(folder), subfolder="transformer")
        )
    millions = sum(parameter.numel() for parameter in transformer.parameters()) / 1e6
    assert millions == pytest.approx(2028.3, rel=1e-4)  # "SD3 medium, 2B parameters"
