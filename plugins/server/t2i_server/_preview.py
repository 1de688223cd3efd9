"""Low-resolution previews of a generation in progress, read straight from its latents.

No VAE decode: a fixed linear map from the latent channels to RGB (the approximation
AUTOMATIC1111 and ComfyUI call "latent2rgb"), one pixel per latent, 1/8 of the image's size.
"""

from __future__ import annotations

import base64
import io
from typing import Any

#: latent channel -> (R, G, B) weights, and the RGB bias, for Stable Diffusion 1.x's VAE
_SD15 = (
    ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    (0.0, 0.0, 0.0),
)
#: ... for SDXL's VAE
_SDXL = (
    ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    (0.1084, -0.0175, -0.0011),
)
_FACTORS = {"sdxl": _SDXL}


def preview_png(latents: Any, family: str) -> tuple[str, int, int]:
    """Image 0 of `latents` (a torch tensor, batch x channels x h x w) as a base64 PNG, with its size."""
    import torch
    from PIL import Image

    sample = latents[0].detach().to("cpu", torch.float32)
    if sample.ndim != 3:
        raise ValueError(f"latents of shape {tuple(latents.shape)} are not images")
    channels = sample.shape[0]
    if channels == 4:
        weights, bias = _FACTORS.get(family, _SD15)
        rgb = torch.einsum("chw,cr->rhw", sample, torch.tensor(weights)) + torch.tensor(bias)[:, None, None]
        rgb = ((rgb + 1.0) * 127.5).clamp(0, 255)
    else:  # an unknown latent space: its mean, stretched to the full range
        mean = sample.mean(dim=0, keepdim=True)
        low, high = float(mean.min()), float(mean.max())
        rgb = ((mean - low) / max(high - low, 1e-6) * 255.0).expand(3, -1, -1)
    pixels = rgb.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    image = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), image.width, image.height
