"""t2i model provider for PixArt-Sigma (``PixArtSigmaPipeline``).

The finished example of docs/tutorial-provider.md: an out-of-tree family whose denoiser is a
transformer (``PixArtTransformer2DModel``) and whose prompts are read by a T5 encoder. Only
t2i_core is imported here: torch, diffusers and transformers are imported inside the methods that
need them, so registering the plugin stays instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import FamilyDefaults, InvalidRequestError, ModelNotFoundError, ModelProvider, Option, hookimpl

if TYPE_CHECKING:
    from t2i_core import GenerationRequest

__version__ = "0.1.0"

PIPELINE_CLASS = "PixArtSigmaPipeline"


class PixArtSigma(ModelProvider):
    """PixArt-Sigma: a diffusion transformer conditioned on T5 embeddings of up to 300 tokens."""

    name = "pixart-sigma"
    aliases: ClassVar[Mapping[str, str]] = {"pixart-sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}
    pipeline_classes = (PIPELINE_CLASS,)
    # 1024x1024 is read from the checkpoint (transformer sample_size x VAE factor), so tiny:pixart-sigma stays tiny.
    defaults = FamilyDefaults(num_inference_steps=20, guidance_scale=4.5)
    description = "PixArt-Sigma, a diffusion transformer with a T5 encoder (1024x1024, 20 steps, guidance 4.5)"
    options = (
        Option(
            name="max_sequence_length",
            type=int,
            default=300,
            minimum=1,
            help="T5 tokens the prompt is padded or cut to (PixArt-Sigma was trained with 300)",
        ),
    )
    tiny_version = 1

    def load_pipeline(self, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None) -> Any:
        # model_index.json says what the checkpoint is before any weights load.
        if model_index is not None and model_index.get("_class_name") != PIPELINE_CLASS:
            found = model_index.get("_class_name")
            raise ModelNotFoundError(source, f"it is a {found}, not a {PIPELINE_CLASS}; check --family / family=")
        from diffusers import PixArtSigmaPipeline

        return PixArtSigmaPipeline.from_pretrained(source, **load_kwargs)

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        # The transformer sees the latents in patches: each side must be whole patches of whole latent pixels.
        factor, patch = pipeline.vae_scale_factor, pipeline.transformer.config.patch_size
        for field in ("height", "width"):
            value = getattr(request, field)
            if value % (factor * patch):
                allowed = f"a multiple of {factor * patch} (VAE factor {factor} x patch size {patch})"
                raise InvalidRequestError(field, value, allowed)

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        kwargs["max_sequence_length"] = options["max_sequence_length"]
        # Caption cleaning needs beautifulsoup4 and ftfy; without them diffusers warns on every
        # prompt and lower-cases it, which is exactly what clean_caption=False does.
        kwargs["clean_caption"] = False
        # The size asked for is the size made: diffusers' default would make the nearest of the
        # aspect ratios PixArt was trained at and resize the image to the size asked for.
        kwargs["use_resolution_binning"] = False
        return kwargs

    def build_tiny(self, folder: Path) -> None:
        import shutil

        from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
        from transformers import T5EncoderModel

        from t2i_core.tiny import t5_encoder_config, t5_tokenizer

        tokenizer = t5_tokenizer(folder / "_tokenizer")
        text_encoder = T5EncoderModel(t5_encoder_config(tokenizer, d_model=32))
        transformer = PixArtTransformer2DModel(
            sample_size=8,  # latent pixels: 8 x VAE factor 8 = 64x64 images
            patch_size=2,
            in_channels=4,
            out_channels=8,  # noise and variance, as PixArt's: the pipeline keeps the noise half
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=32,  # the T5 width
            norm_type="ada_norm_single",
            use_additional_conditions=False,  # Sigma, unlike Alpha, takes no size or aspect-ratio embedding
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),  # four blocks: a VAE factor of 8, as PixArt-Sigma's SDXL VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.13025,
        )
        scheduler = DPMSolverMultistepScheduler()  # PixArt-Sigma ships diffusers' defaults: DPM-Solver++ 2M
        pipeline = PixArtSigmaPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        pipeline.save_pretrained(folder)
        shutil.rmtree(folder / "_tokenizer", ignore_errors=True)


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(PixArtSigma())
