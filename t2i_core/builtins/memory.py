"""Memory-saving accelerators: CPU offloading of whole models or of every layer, and VAE tiling/slicing."""

from __future__ import annotations

from typing import Any

from t2i_core import Accelerator, LoadContext

from ._components import autoencoders, nothing_to_do


class CpuOffload(Accelerator):
    name = "cpu_offload"
    # It places the pipeline itself: the engine does not call pipeline.to(device).
    phase = "placement"
    devices = ("cuda",)
    conflicts = ("sequential_offload", "compile", "compile-vae")
    description = "keeps each model in CPU memory and moves it to the GPU only while it runs (model offload)"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        pipeline.enable_model_cpu_offload(device=context.device)


class SequentialOffload(Accelerator):
    name = "sequential_offload"
    phase = "placement"
    devices = ("cuda",)
    conflicts = ("cpu_offload", "compile", "compile-regional", "compile-vae")
    description = "streams every layer's weights to the GPU as it runs: the least GPU memory, much slower"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        pipeline.enable_sequential_cpu_offload(device=context.device)


class GroupOffload(Accelerator):
    name = "group_offload"
    phase = "placement"
    devices = ("cuda",)
    conflicts = ("cpu_offload", "sequential_offload", "compile", "compile-regional", "compile-vae")
    description = (
        "keeps weights in CPU memory and streams each layer to the GPU as it runs, prefetched on a "
        "side stream (diffusers group offloading, leaf level): about sequential_offload's memory, far faster"
    )

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        on_cuda = context.device.split(":", 1)[0] == "cuda"
        pipeline.enable_group_offload(
            onload_device=context.device, offload_type="leaf_level", use_stream=on_cuda, non_blocking=on_cuda
        )


#: the largest tile `vae_tiling` decodes in one piece, in pixels: SDXL's VAE would otherwise take
#: 1024x1024 (its config's sample_size) as one tile, and tiling would do nothing at its native size
MAX_TILE = 512


class VaeTiling(Accelerator):
    name = "vae_tiling"
    phase = "memory"
    # Above the tile size the tiles are blended, which changes pixels (below it nothing changes).
    lossless = False
    description = "decodes large images in overlapping tiles (bounded VAE memory at any size)"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        tiled = [vae for vae in autoencoders(pipeline).values() if hasattr(vae, "use_tiling")]
        for vae in tiled:
            vae.enable_tiling()
            if getattr(vae, "tile_sample_min_size", 0) > MAX_TILE and hasattr(vae, "tile_latent_min_size"):
                factor = vae.tile_sample_min_size // vae.tile_latent_min_size
                vae.tile_sample_min_size = MAX_TILE
                vae.tile_latent_min_size = MAX_TILE // factor
        if not tiled:
            nothing_to_do(self.name, pipeline, "tiled decoding")


class VaeSlicing(Accelerator):
    name = "vae_slicing"
    phase = "memory"
    description = "decodes a batch one image at a time (VAE memory of one image, whatever num_images)"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        sliced = [vae for vae in autoencoders(pipeline).values() if hasattr(vae, "use_slicing")]
        for vae in sliced:
            vae.enable_slicing()
        if not sliced:
            nothing_to_do(self.name, pipeline, "sliced decoding")


ACCELERATORS: tuple[Accelerator, ...] = (CpuOffload(), SequentialOffload(), GroupOffload(), VaeTiling(), VaeSlicing())
