"""--quantize_lm_head under calibrated group-wise INT4: what AWQ and GPTQ do with the LM head.

- GPTQ: the head is one more linear layer. Its inputs are the final norm's outputs on the calibration tokens, after
  the blocks ran their GPTQ weights (AutoGPTQ's order: every layer sees what the quantized layers before it produce),
  so its Hessian `H = 2 X^T X / n` is taken there and the head is GPTQ'd like any [out, in] weight. Baichuan2's head
  is GPTQ'd as the model runs it, on its normalised rows (the weight source applies NormHead before anything sees
  the tensor); MPT's tied head is quantized as its own tensor, the embedding keeps its float rows.
- AWQ: round to nearest, group-wise, on the float head (convert does it; calibration leaves the tensor untouched).
  AWQ's per-channel scales for a layer are folded into whatever produces its input, here the final norm's weight; but
  a tied head (MPT) shares its tensor with the embedding, whose rows would need the inverse scales, and an MPT final
  LayerNorm with a bias or Baichuan2's normalised rows would need the scales carried through both. Rounding to
  nearest is exact with respect to the format and the same for every family; AutoAWQ itself leaves lm_head in float by
  default, so there is no published recipe to follow instead. docs/quantization.md records the perplexity it costs.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig
from kiln.layers.norm import make_norm
from kiln.quant.capture import InputStats
from kiln.quant.gptq import gptq_quantize
from kiln.quant.group_wise import GroupWiseMethod
from kiln.quant.layerwise import Activations, LayerwiseModel, fill

HEAD = "lm_head.weight"


def head_hessian(model: LayerwiseModel, acts: Activations) -> torch.Tensor:
    """The LM head's GPTQ Hessian [hidden, hidden] (float64): 2 X^T X / n over X = norm_f(hidden + residual), the
    final norm's output on every calibration token (`acts`: the last block's outputs)."""
    norm = fill(make_norm(model.config), "norm.", model.source).eval()
    stats = InputStats(sample_limit=0, hessian=True)
    with torch.no_grad():
        for part in model.chunks():
            hidden = acts.hidden[part] if acts.residual is None else acts.hidden[part] + acts.residual[part]
            stats.add(norm(hidden))  # [chunk tokens, hidden]
    return stats.hessian_matrix(model.config.hidden_size)


def gptq_lm_head(model: LayerwiseModel, acts: Activations, method: GroupWiseMethod, damp: float, desc_act: bool,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of the full LM head [vocab, hidden] -> (q [vocab, hidden], scale and zero [vocab, groups] in `dtype`), as
    convert stores a calibrated weight."""
    config: ModelConfig = model.config
    weight = model.source.full_tensor(HEAD, (config.vocab_size, config.hidden_size)).float()
    return gptq_quantize(weight, head_hessian(model, acts), method.group_size, method.bits, dtype, damp, desc_act)
