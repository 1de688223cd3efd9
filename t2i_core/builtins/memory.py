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


ACCELERATORS: tuple[Accelerator, ...] = (CpuOffload(), SequentialOffload(), VaeTiling(), VaeSlicing())
