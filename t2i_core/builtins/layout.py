"""Kernel-level accelerators: fused attention projections and the channels-last memory format."""

from __future__ import annotations

from typing import Any

from t2i_core import Accelerator, IncompatibleAcceleratorsError, LoadContext
from t2i_core.kit import is_gguf

from ._components import has_conv2d, nothing_to_do, torch_modules


class FuseQkv(Accelerator):
    name = "fuse_qkv"
    phase = "fusion"
    description = "fuses each attention's query/key/value projections into one matmul (diffusers fuse_qkv_projections)"

    def check(self, context: LoadContext) -> None:
        if is_gguf(context.source):
            # diffusers concatenates the projections' weights into a plain Linear: GGUF blocks are no weights there.
            raise IncompatibleAcceleratorsError(
                [self.name], f"{context.model} is a GGUF file: its quantized projections cannot be fused"
            )

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

        fused = []
        for module in torch_modules(pipeline).values():
            if not hasattr(module, "fuse_qkv_projections"):
                continue
            processors = {type(p) for p in getattr(module, "attn_processors", {}).values()}
            if any("AddedKV" in processor.__name__ for processor in processors):
                # diffusers cannot fuse attention with added key/value projections (Kandinsky's UNet).
                continue
            module.fuse_qkv_projections()
            attentions = [m for m in module.modules() if isinstance(m, Attention)]
            if not attentions or not all(hasattr(a, "to_kv" if a.is_cross_attention else "to_qkv") for a in attentions):
                continue  # a model whose generic fusion skips this attention class (Kandinsky's prior)
            if processors == {AttnProcessor2_0}:
                module.set_attn_processor(FusedAttnProcessor2_0())
                for attention in attentions:
                    release_unfused(attention)
            fused.append(module)
        if not fused:
            nothing_to_do(self.name, pipeline, "fused QKV projections")


def release_unfused(attention: Any) -> None:
    """Free the q/k/v weights the fused processor no longer reads (+1.2 GiB on SDXL's fp16 UNet).

    ``FusedAttnProcessor2_0`` reads ``to_qkv`` for self-attention, and ``to_q`` with ``to_kv``
    for cross-attention. The freed projections stay as modules with empty weights, so code that
    looks them up still finds them; calling one fails loudly instead of computing with stale
    weights. (diffusers' ``unfuse_qkv_projections`` cannot restore them: load again instead.)
    """
    import torch

    names = ("to_k", "to_v") if attention.is_cross_attention else ("to_q", "to_k", "to_v")
    for name in names:
        linear = getattr(attention, name, None)
        if linear is None:
            continue
        for parameter in ("weight", "bias"):
            old = getattr(linear, parameter, None)
            if old is not None:
                empty = torch.empty(0, dtype=old.dtype, device=old.device)
                setattr(linear, parameter, torch.nn.Parameter(empty, requires_grad=False))


class ChannelsLast(Accelerator):
    name = "channels_last"
    phase = "layout"
    description = "stores convolution weights channels-last (NHWC), the layout GPU tensor cores prefer"

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        import torch

        for module in torch_modules(pipeline).values():
            if has_conv2d(module):
                module.to(memory_format=torch.channels_last)


ACCELERATORS: tuple[Accelerator, ...] = (FuseQkv(), ChannelsLast())
