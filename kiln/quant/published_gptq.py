"""AutoGPTQ's published tensors (also GPTQ-for-LLaMa's, which AutoGPTQ's v1 layout continues) -> kiln's unpacked
group-wise values. Facts from AutoGPTQ's QuantLinear.pack and vLLM's gptq layer:

- `qweight` int32 [in * bits / 32, out]: 32 / bits values per int32 along the INPUT dim, the lowest bits first;
- `qzeros` int32 [groups, out * bits / 32]: the same packing along the OUTPUT dim; checkpoint_format "gptq" (v1)
  stores zero - 1 (the reader adds 1, as AutoGPTQ's kernels do, without wrapping: a v1 zero of 0 reads back as
  2^bits, exactly what those kernels compute), "gptq_v2" stores the zero itself;
- `scales` float16 [groups, out]; `g_idx` int32 [in]: the group of each input feature (`k // G` unless act-order);
- `w[o, k] = (q[k, o] - zero[g_idx[k], o]) * scales[g_idx[k], o]`; group_size -1 is one group over the input.
"""

from __future__ import annotations

import torch

from kiln.config import ConfigError

GPTQ_BITS = (4, 8)  # 2- and 3-bit GPTQ (3-bit values straddle int32 words) are refused by name
GPTQ_FORMATS = ("gptq", "gptq_v2")  # exllama/marlin repackings are other layouts


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32 / bits values each along `dim` (0 or 1), lowest bits first -> int16 values."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32)
    if dim == 0:  # [rows, cols] -> [rows * per, cols]
        values = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
        return values.reshape(-1, words.shape[1]).to(torch.int16)
    values = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [rows, cols, per]
    return values.reshape(words.shape[0], -1).to(torch.int16)


def read_gptq(tensors: dict[str, torch.Tensor], bits: int, v1_zeros: bool, where: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One linear's qweight/qzeros/scales(/g_idx) -> q [out, in] int16, scale [out, groups], zero [out, groups]
    (float32, integer-valued) and its g_idx [in] (None when absent)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    q = unpack_int32(qweight, bits, 0).t()  # [out, in]
    zero = unpack_int32(qzeros, bits, 1)[:, : scales.shape[1]].float() + (1 if v1_zeros else 0)  # [groups, out]
    if q.shape[0] != scales.shape[1] or zero.shape != scales.shape:
        raise ConfigError(f"{where}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                          f"{tuple(scales.shape)} do not describe one {bits}-bit GPTQ layer")
    g_idx = tensors.get("g_idx")
    return q, scales.float().t(), zero.t(), None if g_idx is None else g_idx.long()
