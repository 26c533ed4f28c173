"""AutoAWQ's published GEMM tensors -> kiln's unpacked group-wise values. Facts from AutoAWQ's WQLinear_GEMM and
vLLM's awq layer:

- `qweight` int32 [in, out / 8]: eight 4-bit values per int32 along the OUTPUT dim; within each word, the value at
  shift 4 * i belongs to output column 8 * j + AWQ_ORDER[i] (AWQ's interleave, 0 2 4 6 1 3 5 7);
- `qzeros` int32 [groups, out / 8]: the same packing and order; zero points stored as they are (no offset);
- `scales` float16 [groups, out]; `w[o, k] = (q[k, o] - zero[k // G, o]) * scales[k // G, o]`.
"""

from __future__ import annotations

import torch

from kiln.config import ConfigError
from kiln.quant.published_gptq import unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))  # shift slot of output column c within its word


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 8] int32 in AWQ's order -> [rows, cols] int16 values in column order."""
    slots = unpack_int32(packed, 4, 1).view(packed.shape[0], -1, 8)  # [rows, words, shift slot]
    return slots[..., list(AWQ_REVERSE)].reshape(packed.shape[0], -1)


def read_awq(tensors: dict[str, torch.Tensor], where: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """One linear's qweight/qzeros/scales -> q [out, in] int16, scale and zero [out, groups] (float32)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    q, zero = unpack_awq(qweight).t(), unpack_awq(qzeros).float()  # [out, in], [groups, out]
    if q.shape[0] != scales.shape[1] or zero.shape != scales.shape:
        raise ConfigError(f"{where}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                          f"{tuple(scales.shape)} do not describe one AWQ GEMM layer")
    return q, scales.float().t(), zero.t(), None
