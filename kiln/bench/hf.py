"""transformers beside kiln: its model of the same family and shapes, with kiln's own weights where the family's
weight map can be inverted, and the timing of its `generate`.

Same weights: each tensor of kiln's rank-0 file is mapped back to its Hugging Face name(s) by inverting the rule
that made it (kiln.models.family / transforms). Families transformers lacks (Baichuan: remote code only) get no
column; shapes transformers cannot hold get no column; anything else that cannot be inverted gets random weights at
the same shapes, and the report says so."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open

from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ModelConfig
from kiln.models.family import find_rule, sources_for


class HFUnavailable(Exception):
    """transformers cannot run this engine's model at its shapes; the message says why."""


class NotInvertible(Exception):
    """kiln's weights cannot be mapped back to transformers' names; the message says why."""


def _w13_to_w1_v1(t: torch.Tensor, c: ModelConfig) -> list[torch.Tensor]:
    # [experts, 2 * ffn, hidden] rows gate then up -> w1, v1 each [experts * ffn, hidden] (transforms.dbrx_experts_w13)
    ffn = t.shape[1] // 2
    return [t[:, :ffn].reshape(-1, t.shape[2]), t[:, ffn:].reshape(-1, t.shape[2])]


def _w2_to_hf(t: torch.Tensor, c: ModelConfig) -> list[torch.Tensor]:
    # [experts, hidden, ffn] -> [experts * ffn, hidden] (transforms.dbrx_experts_w2)
    return [t.transpose(1, 2).reshape(-1, t.shape[1])]


# Inverses of kiln.models.transforms: kiln tensor -> its sources, in the rule's order. concat_rows cannot be split
# without its sources' sizes, and l2_normalize_rows loses the norms; neither is needed for the families transformers
# has (both are Baichuan's).
INVERSES: dict[str, Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]] = {
    "identity": lambda t, c: [t],
    "dbrx_experts_w13": _w13_to_w1_v1,
    "dbrx_experts_w2": _w2_to_hf,
}


def hf_config(model: ModelConfig) -> Any:
    """transformers' config of the same model; HFUnavailable when it has no class for the family or cannot hold
    these shapes."""
    if model.family == "dbrx":
        return _dbrx_config(model)
    if model.family == "mpt":
        return _mpt_config(model)
    raise HFUnavailable(f"transformers has no {model.architecture} class ({model.family} checkpoints use remote "
                        "code): no transformers column")


def _dbrx_config(m: ModelConfig) -> Any:
    from transformers import DbrxConfig

    theta = float(m.rotary_base)
    # transformers 5 reads RoPE theta from rope_parameters, not attn_config (model-facts.md §1 (a)).
    return DbrxConfig(
        d_model=m.hidden_size, n_heads=m.num_attention_heads, n_layers=m.num_hidden_layers,
        max_seq_len=m.max_position_embeddings, vocab_size=m.vocab_size, tie_word_embeddings=False,
        attn_config={"clip_qkv": None if m.clip_qkv is None else float(m.clip_qkv),
                     "kv_n_heads": m.num_key_value_heads, "rope_theta": theta},
        ffn_config={"ffn_hidden_size": m.intermediate_size, "moe_num_experts": m.moe_num_experts,
                    "moe_top_k": m.moe_top_k,
                    "moe_normalize_expert_weights": None if m.moe_normalize_p is None else float(m.moe_normalize_p)},
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )


def mpt_gaps(m: ModelConfig) -> list[str]:
    """What transformers' MptForCausalLM cannot hold: it is MHA only, bias-free, 4x MLP, tied head, no qk_ln."""
    gaps = []
    if m.num_key_value_heads != m.num_attention_heads:
        gaps.append("grouped-query attention")
    if m.linear_bias or m.norm_bias:
        gaps.append("biases")
    if m.intermediate_size != 4 * m.hidden_size:
        gaps.append(f"an MLP of {m.intermediate_size} (it builds 4 x d_model)")
    if not m.tie_word_embeddings:
        gaps.append("an untied LM head")
    if m.qk_layernorm:
        gaps.append("qk_ln")
    return gaps


def _mpt_config(m: ModelConfig) -> Any:
    from transformers import MptConfig

    gaps = mpt_gaps(m)
    if gaps:
        raise HFUnavailable(f"transformers' MptForCausalLM has no {', '.join(gaps)}: no transformers column")
    attn = {"alibi": True, "alibi_bias_max": int(m.alibi_bias_max), "softmax_scale": m.softmax_scale,
            "clip_qkv": None if m.clip_qkv is None else float(m.clip_qkv)}
    return MptConfig(d_model=m.hidden_size, n_heads=m.num_attention_heads, n_layers=m.num_hidden_layers,
                     max_seq_len=m.max_position_embeddings, vocab_size=m.vocab_size, no_bias=True,
                     layer_norm_epsilon=m.norm_epsilon, attn_config=attn)


def behaviour_notes(m: ModelConfig) -> list[str]:
    """Where transformers computes something else from the same weights (speed is unaffected)."""
    notes = []
    if m.family == "mpt" and m.alibi_bias_max != 8:
        notes.append(f"transformers' MPT uses alibi_bias_max 8, this model {m.alibi_bias_max:g}")
    if m.family == "mpt" and m.logit_scale is not None:
        notes.append("transformers' MPT ignores logit_scale")
    return notes


def inverted_weights(info: ArtifactInfo, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every tensor of a one-rank engine's file, by inverting the family's rules.
    A name can come twice (MPT's embedding and tied head are both made from transformer.wte)."""
    if info.mapping.world_size != 1:
        raise NotInvertible(f"the engine has {info.mapping.world_size} ranks (shards would have to be gathered)")
    if info.weights_in_memory is not None:
        raise NotInvertible("its dummy weights are drawn in memory (no rank file); bench it with --weights_on_disk")
    rules = info.family.weight_rules(info.model)
    with safe_open(str(info.rank_file(0)), framework="pt", device=str(device)) as f:
        for name in f.keys():
            try:
                rule = find_rule(rules, name)
            except KeyError:
                raise NotInvertible(f"no weight rule makes {name}") from None
            if rule.transform not in INVERSES:
                raise NotInvertible(f"{name} is made by {rule.transform}, which cannot be inverted")
            tensors = INVERSES[rule.transform](f.get_tensor(name), info.model)
            yield from zip(sources_for(rule, name), tensors)


def _load_same_weights(model: torch.nn.Module, info: ArtifactInfo, device: torch.device) -> list[str]:
    """Copy kiln's weights into transformers' model, one tensor at a time; every tensor must land. Returns the
    names transformers holds once but kiln holds as two different tensors (the first one is kept)."""
    state = model.state_dict()
    filled: set[str] = set()
    conflicts: list[str] = []
    with torch.no_grad():
        for name, tensor in inverted_weights(info, device):
            if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                got = tuple(state[name].shape) if name in state else "no such tensor"
                raise NotInvertible(f"{name} {tuple(tensor.shape)} does not fit transformers' model ({got})")
            if name in filled:
                if not torch.equal(state[name], tensor.to(state[name].dtype)):
                    conflicts.append(name)
                continue
            state[name].copy_(tensor)
            filled.add(name)
    tied = {n for n, t in state.items() if n not in filled and any(t.data_ptr() == state[f].data_ptr() for f in filled)}
    missing = sorted(set(state) - filled - tied)
    if missing:
        raise NotInvertible(f"kiln's file has nothing for {', '.join(missing[:4])}")
    return conflicts


@dataclass
class HFModel:
    """transformers' model and how its weights relate to kiln's."""

    model: torch.nn.Module
    same_weights: bool
    note: str


def load_hf_model(info: ArtifactInfo, device: torch.device) -> HFModel:
    """transformers' model of the engine's family and shapes on `device`, in the engine's dtype, holding kiln's
    weights when they can be inverted (else random weights, said in `note`). HFUnavailable when there is none."""
    from transformers import DbrxForCausalLM, MptForCausalLM

    config = hf_config(info.model)
    cls = DbrxForCausalLM if info.model.family == "dbrx" else MptForCausalLM
    with torch.device(device):
        model = cls._from_config(config, dtype=info.model.torch_dtype).eval()
    try:
        conflicts = _load_same_weights(model, info, device)
        same, note = not conflicts, "the engine's weights (kiln's weight map inverted)"
        if conflicts:
            # Dummy weights draw kiln's embedding and LM head separately even where the model ties them.
            note += (f", except that transformers ties {', '.join(conflicts)} to one tensor where the engine has two "
                     "different ones (speed is the same)")
    except NotInvertible as err:
        same, note = False, f"random weights at the same shapes ({err})"
    extra = behaviour_notes(info.model)
    return HFModel(model, same, note + ("; " + "; ".join(extra) if extra else ""))


@dataclass(frozen=True)
class HFTiming:
    """transformers' generate, timed as kiln is: prefill until the first token's logits, then the mean step."""

    prefill_ms: float
    decode_ms: float


class _StepClock:
    """A logits processor that only records when each step's logits are ready (device synchronised, as kiln's steps
    are). generate calls it once per new token: after the prefill forward, then after every decode forward."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from kiln.bench.physics import synchronize

        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def time_hf_case(model: torch.nn.Module, batch: int, input_len: int, output_len: int, device: torch.device,
                 seed: int, warmup: int = 1) -> HFTiming:
    """Greedy generate of exactly output_len tokens for a batch of random prompts (the same ids kiln's case drew
    from the same seed), with per-step timestamps from inside generate."""
    from transformers import LogitsProcessorList

    from kiln.bench.physics import synchronize

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(2, model.config.vocab_size), (batch, input_len), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def run(n: int) -> tuple[float, list[float]]:
        clock = _StepClock(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        return start, clock.times

    for _ in range(warmup):
        run(min(output_len, 8))
    start, times = run(output_len)
    if len(times) != output_len:
        raise RuntimeError(f"transformers' generate made {len(times)} steps, not {output_len}")
    return HFTiming((times[0] - start) * 1e3, (times[-1] - times[0]) / (output_len - 1) * 1e3)
