"""GGUF files written from a state dict, laid out as the published ones are: stand-ins for tests.

The published GGUF denoisers (city96/FLUX.1-dev-gguf and the like) quantize the weights of the
linear layers and keep the small tensors (biases, norms, convolutions) in float. `write_gguf` does
the same with the ``gguf`` package's quantizers, and with its own for Q4_K (gguf-py only reads it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: the types `write_gguf` writes: float ones (every weight in that type) and quantized ones
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K")
#: what a K-quant writes for a weight whose rows are not whole blocks of 256, as llama.cpp does
K_FALLBACK = {"Q4_K": "Q5_0"}
#: the file type each writes in ``general.file_type`` (gguf's LlamaFileType names)
FILE_TYPES = {"F32": "ALL_F32", "Q4_K": "MOSTLY_Q4_K_S"}


def write_gguf(
    state_dict: Mapping[str, Any], path: str | os.PathLike[str], qtype: str = "Q8_0", *, architecture: str = "t2i"
) -> Path:
    """Write `state_dict` (names → torch tensors) as the GGUF file `path`, its weights in `qtype`.

    A tensor is written in `qtype` when it is a 2-D ``*.weight`` whose rows are whole blocks of
    the type (32 values for Q8_0 … Q4_0, 256 for Q4_K; Q4_K writes Q5_0 for rows of whole 32s
    only, as llama.cpp falls back); every other tensor keeps its own dtype (F32, F16, or BF16),
    as in the published files. Names are written as given: pass the layout the loader expects
    (the original one, or diffusers').

    :param qtype: one of `QUANT_TYPES`.
    :param architecture: the file's ``general.architecture`` (``flux``, ``sd3``, ...).
    :returns: `path`.
    :raises ValueError: an unknown `qtype`, naming the known ones.
    """
    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype={qtype!r} is not one write_gguf writes: expected one of {', '.join(QUANT_TYPES)}")
    try:
        import gguf
    except ImportError:
        raise ImportError("write_gguf needs the gguf package: python -m pip install gguf") from None
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES.get(qtype, f"MOSTLY_{qtype}")].value)
    for name, tensor in state_dict.items():
        chosen = _type_of(name, tensor, qtype)
        data, raw = _encoded(tensor, chosen)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _type_of(name: str, tensor: Any, qtype: str) -> str:
    """The GGUF type `tensor` is written in for a file of `qtype`."""
    import gguf
    import torch

    own = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(tensor.dtype, "F32")
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return own
    for candidate in (qtype, K_FALLBACK.get(qtype)):
        if candidate is None:
            continue
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[candidate]]
        if tensor.shape[-1] % block == 0:
            return candidate
    return own


def _encoded(tensor: Any, qtype: str) -> tuple[np.ndarray, Any]:
    """`tensor` in GGUF type `qtype`: the array to write and its raw type (None for a plain F32/F16 one)."""
    import gguf
    import numpy as np
    import torch

    if qtype == "F16":
        return tensor.detach().to(torch.float16).cpu().numpy(), None
    values = tensor.detach().to(torch.float32).cpu().numpy()
    if qtype == "F32":
        return values, None
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "Q4_K":
        return quantize_q4_k(values), kind
    return np.ascontiguousarray(gguf.quants.quantize(values, kind)), kind


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """`values` (rows of whole 256-blocks) as Q4_K blocks: llama.cpp's layout, a plain min/max fit.

    Each block of 256 holds eight sub-blocks of 32 with a 6-bit scale and a 6-bit minimum against
    the block's float16 ``d`` and ``dmin``, and 4-bit values: ``x ≈ d * scale * q - dmin * min``.
    """
    import numpy as np

    rows = values.shape[0]
    blocks = values.reshape(-1, 8, 32).astype(np.float32)
    count = blocks.shape[0]
    low = np.minimum(blocks.min(axis=-1), 0.0)
    scales = (blocks.max(axis=-1) - low) / 15.0
    minimums = -low
    d = (scales.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (minimums.max(axis=-1) / 63.0).astype(np.float16)
    scale_codes = _codes(scales, d.astype(np.float32)[:, None], 63)
    minimum_codes = _codes(minimums, dmin.astype(np.float32)[:, None], 63)
    step = d.astype(np.float32)[:, None] * scale_codes
    offset = dmin.astype(np.float32)[:, None] * minimum_codes
    quants = _codes(blocks + offset[..., None], step[..., None], 15)
    # sub-blocks 2i and 2i+1 share bytes 32i..32i+31: the first in the low nibbles, the second in the high
    packed_quants = (quants[:, 0::2] | (quants[:, 1::2] << 4)).reshape(count, 128)
    # sub-blocks 0-3: 6 bits in bytes 0-3 (scales) and 4-7 (minimums); 4-7: low 4 bits in bytes
    # 8-11 (scale low, minimum high nibble), high 2 bits in the top bits of bytes 0-7
    packed_scales = np.concatenate(
        [
            scale_codes[:, :4] | ((scale_codes[:, 4:] >> 4) << 6),
            minimum_codes[:, :4] | ((minimum_codes[:, 4:] >> 4) << 6),
            (scale_codes[:, 4:] & 15) | ((minimum_codes[:, 4:] & 15) << 4),
        ],
        axis=1,
    )
    header = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8)], axis=1)
    return np.concatenate([header, packed_scales, packed_quants], axis=1).reshape(rows, -1)


def _codes(values: np.ndarray, unit: np.ndarray, top: int) -> np.ndarray:
    """``round(values / unit)`` in [0, top] as uint8; 0 where `unit` is 0."""
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(unit > 0, np.rint(values / unit), 0.0)
    return np.clip(codes, 0, top).astype(np.uint8)
