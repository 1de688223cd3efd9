"""t2i's own plugins pass the plugin author's conformance kit (t2i_core.testing), so CI runs the kit.

Each class is what a third-party plugin's test file looks like. The deeper checks of each
plugin stay in its own test module; these are the promises every plugin of a role keeps.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from t2i_core import Control
from t2i_core.testing import AcceleratorConformance, ConditionerConformance, ProviderConformance

# -- providers -----------------------------------------------------------------------------------


class TestSd15(ProviderConformance):
    family = "sd15"


class TestSdxl(ProviderConformance):
    family = "sdxl"


class TestKandinsky22(ProviderConformance):
    family = "kandinsky22"
    # The prior's own 25 steps would dominate: two are enough to compare with diffusers.
    request_options = {"prior_num_inference_steps": 2}
    reference_kwargs = {"prior_num_inference_steps": 2}
    invalid_requests = {"options['prior']": {"options": {"prior_num_inference_steps": 2, "prior": "tiny:sd15"}}}


# -- conditioners ----------------------------------------------------------------------------------


class TestNegativePrompt(ConditionerConformance):
    conditioner = "negative-prompt"
    wanted = {"negative_prompt": "ugly, deformed"}
    reference_kwargs: dict[str, Any] = {}  # the plain call already carries negative_prompt


class TestCompel(ConditionerConformance):
    conditioner = "compel"
    wanted = {"prompt": "Astronaut in a (jungle)1.5, cold color palette--", "prompt_weighting": "compel"}
    refused_requests = {
        "prompt": {"prompt": '("a cat", "a dog").blend(0.5, -0.5)', "prompt_weighting": "compel"},
        "negative_prompt": {
            "prompt": "a cat",
            "negative_prompt": "a dog withLora(x, 0.5)",
            "prompt_weighting": "compel",
        },
    }

    def reference(self, folder: str, **call_kwargs: Any) -> list[Any]:
        """diffusers called with Compel's embeddings of the prompt and negative prompt, padded to one length."""
        from compel import Compel

        pipeline = self.raw_pipeline(folder)
        compel = Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder)
        texts = [compel(call_kwargs.pop("prompt")), compel(call_kwargs.pop("negative_prompt", ""))]
        positive, negative = compel.pad_conditioning_tensors_to_same_length(texts)
        return list(pipeline(prompt_embeds=positive, negative_prompt_embeds=negative, **call_kwargs).images)


_EDGES = Image.new("RGB", (64, 64))
_EDGES.paste((255, 255, 255), (16, 16, 48, 48))


class TestControlNet(ConditionerConformance):
    conditioner = "controlnet"
    wanted = {"controls": (Control(image=_EDGES, model="tiny:controlnet-sd15"),)}
    reference_kwargs = {"image": _EDGES}
    refused_requests = {
        "controls[0].model": {"controls": (Control(image=_EDGES, model="tiny:controlnet-nothing"),)},
        "controls[0].preprocess": {"controls": (Control(image=_EDGES, model="tiny:controlnet-sd15", preprocess="x"),)},
    }

    def reference_pipeline(self, folder: str) -> Any:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
        from t2i_controlnet import tiny_controlnet_folder

        controlnet = ControlNetModel.from_pretrained(tiny_controlnet_folder("sd15"))
        return StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=controlnet)


# -- accelerators ----------------------------------------------------------------------------------


class TestChannelsLast(AcceleratorConformance):
    accelerator = "channels_last"
    tolerance = 1
    why = "channels-last convolutions accumulate in another order (0 or 1 level, by CPU)"

    def effect(self, engine: Any) -> Any:
        import torch

        return engine.pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


class TestFuseQkv(AcceleratorConformance):
    accelerator = "fuse_qkv"
    tolerance = 1
    why = "one fused matmul instead of three may round float32 differently"

    def effect(self, engine: Any) -> Any:
        return sorted({name for name, _ in engine.pipeline.unet.named_modules() if name.endswith("to_qkv")})


class TestVaeSlicing(AcceleratorConformance):
    accelerator = "vae_slicing"

    def effect(self, engine: Any) -> Any:
        return engine.pipeline.vae.use_slicing


class TestVaeTiling(AcceleratorConformance):
    accelerator = "vae_tiling"
    tolerance = 0  # not lossless above the tile size; the tiny checkpoint's images are far below it

    def effect(self, engine: Any) -> Any:
        return engine.pipeline.vae.use_tiling
