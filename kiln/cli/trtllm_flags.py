"""TensorRT-LLM flags that kiln accepts without acting on them, and flags it refuses by name.

TensorRT-LLM's example scripts (convert_checkpoint.py, trtllm-build, the legacy build.py, run.py) take many flags that
steer TensorRT itself: plugins, padding removal, timing caches, parallel builds. A user's script must port with only
the command name changed, so kiln accepts them, does nothing, and says so once in one line, with what kiln does
instead where the flag asks for something kiln does its own way. Features kiln does not have (LoRA, prompt tables,
speculative decoding) are refused by name with the reason, never silently dropped. Quantization flags live in
quant_flags.py. Each command lists the names it takes; the specs are here, in one place.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from kiln.config import ConfigError

DEST_PREFIX = "trtllm__"


@dataclass(frozen=True)
class CompatFlag:
    """One TensorRT-LLM flag: its spellings, how many values it takes ("none", "optional", "one" or "many"), the
    note printed for it (what kiln does instead, or why it is refused) and the values that ask for nothing (a
    refused flag given one of them, such as `--max_prompt_embedding_table_size 0`, is merely ignored)."""

    names: tuple[str, ...]
    arity: str
    note: str
    inert: tuple[str, ...] = ()


KERNELS = "kiln chooses its own kernels, tuned at build on a GPU"
FUSED_ATTN = "kiln's attention is always fused and reads the paged KV cache"
ONE_PASS = "kiln converts and builds in one pass that reads each tensor once"
ARCH = "taken from the Hugging Face config.json, as TensorRT-LLM does when --model_dir is given"
NCCL = "kiln all-reduces through torch.distributed (NCCL on GPUs)"
NOTHING = "nothing for kiln to do"


def _flags(arity: str, note: str, *names: str, inert: tuple[str, ...] = ()) -> list[CompatFlag]:
    """One flag per name; "a|b" spells one flag two ways (the legacy build.py's `--use_gemm_plugin`)."""
    return [CompatFlag(tuple(name.split("|")), arity, note, inert) for name in names]


_ignored = _refused = _flags

IGNORED: dict[str, CompatFlag] = {f.names[0]: f for group in [
    # trtllm-build and the legacy build.py
    _ignored("optional", KERNELS, "--gemm_plugin|--use_gemm_plugin"),
    _ignored("optional", KERNELS, "--gpt_attention_plugin|--use_gpt_attention_plugin"),
    _ignored("optional", KERNELS, "--moe_plugin"),
    _ignored("optional", KERNELS, "--nccl_plugin"),
    _ignored("optional", KERNELS, "--lookup_plugin|--use_lookup_plugin"),
    _ignored("optional", KERNELS, "--use_layernorm_plugin", "--use_rmsnorm_plugin"),
    _ignored("optional", KERNELS, "--gemm_swiglu_plugin", "--low_latency_gemm_plugin", "--use_fused_mlp"),
    _ignored("optional", KERNELS, "--reduce_fusion", "--norm_quant_fusion", "--bert_attention_plugin"),
    _ignored("optional", "kiln always packs the batch's tokens without padding", "--remove_input_padding"),
    _ignored("optional", FUSED_ATTN, "--enable_context_fmha", "--context_fmha", "--use_paged_context_fmha"),
    _ignored("optional", FUSED_ATTN, "--enable_context_fmha_fp32_acc", "--dense_context_fmha"),
    _ignored("optional", "kiln's KV cache is always paged", "--paged_kv_cache", "--kv_cache_type"),
    _ignored("optional", "kiln batches requests continuously always", "--use_inflight_batching"),
    _ignored("optional", NCCL, "--use_custom_all_reduce"),
    _ignored("optional", "kiln's decode attention splits long sequences over blocks by itself", "--multi_block_mode"),
    _ignored("optional", "kiln computes in the checkpoint's dtype (logits in float32)", "--strongly_typed"),
    _ignored("one", ONE_PASS, "--workers"),
    _ignored("none", ONE_PASS, "--parallel_build"),
    _ignored("one", "kiln tunes its kernels at build and stores the result in the engine",
             "--input_timing_cache", "--output_timing_cache", "--timing_cache"),
    _ignored("one", NOTHING, "--profiling_verbosity", "--builder_opt", "--opt_num_tokens", "--gpus_per_node",
             "--cluster_key"),
    _ignored("none", NOTHING, "--enable_debug_output", "--visualize_network", "--monitor_memory", "--dry_run"),
    _ignored("one", "kiln's logits are always float32", "--logits_dtype"),
    _ignored("none", "kiln run returns logits when asked (--output_logits_npy); nothing to build",
             "--gather_context_logits", "--gather_generation_logits", "--gather_all_token_logits"),
    # convert_checkpoint.py and hf_baichuan_convert.py
    _ignored("none", "kiln shards the embedding and head as its layers need", "--use_parallel_embedding",
             "--use_embedding_sharing"),
    _ignored("one", "kiln shards the embedding and head as its layers need", "--embedding_sharding_dim"),
    _ignored("none", KERNELS, "--disable_weight_only_quant_plugin"),
    _ignored("one", "kiln normalises the chosen experts' weights as the checkpoint's config says",
             "--moe_renorm_mode", "--moe_normalization_mode"),
    _ignored("one", ARCH, "--moe_num_experts", "--moe_top_k", "--rotary_base", "--vocab_size", "--n_layer",
             "--n_head", "--n_kv_head", "--n_embd", "--inter_size", "--clip_qkv", "--hidden_act", "--max_seq_len"),
    _ignored("one", "kiln convert and build print a few plain progress lines", "--log_level"),
    _ignored("one", "kiln reads every tensor memory-mapped, one at a time", "--processes|-p"),
    _ignored("none", "kiln reads every tensor memory-mapped, one at a time", "--load_model_on_cpu", "--load_by_shard"),
    # run.py
    _ignored("none", "kiln has one runtime (the C++/Python session choice is TensorRT-LLM's)", "--use_py_session"),
    _ignored("none", "kiln applies no prompt template unless --chat is given (TensorRT-LLM has none for DBRX, MPT or "
             "Baichuan either)", "--no_prompt_template"),
    _ignored("none", "kiln always reuses the KV blocks of shared prompt prefixes (prefix caching)",
             "--kv_cache_enable_block_reuse"),
    _ignored("none", "kiln always prefills long prompts in chunks of the engine's max_num_tokens",
             "--enable_chunked_context"),
    _ignored("none", "kiln replays CUDA graphs for decode by default (--no_cuda_graphs turns them off)",
             "--cuda_graph_mode"),
    _ignored("none", NOTHING, "--debug_mode", "--return_all_generated_tokens", "--hf_device_map_auto"),
    _ignored("one", "kiln picks the tokenizer from the files in --tokenizer_dir", "--tokenizer_type", "--vocab_file"),
    _ignored("one", NOTHING, "--cross_kv_cache_fraction"),
    _ignored("one", "kiln run does not load a Hugging Face model", "--hf_data_type|--data_type"),
] for f in group}

LORA = "LoRA adapters are not supported by kiln; merge the adapter into the weights before converting"
PROMPT = "prompt tables (p-tuning) are not supported by kiln; give the prompt as text or token ids"
SPECULATIVE = "speculative decoding (Medusa, EAGLE, draft models, lookahead) is not supported by kiln"


REFUSED: dict[str, CompatFlag] = {f.names[0]: f for group in [
    _refused("many", LORA, "--lora_dir", "--lora_task_uids", "--lora_target_modules"),
    _refused("optional", LORA, "--lora_plugin", inert=("disable",)),
    _refused("one", LORA, "--max_lora_rank", "--lora_ckpt_source", "--hf_lora_dir", inert=("hf", "0")),
    _refused("one", PROMPT, "--prompt_table_path", "--prompt_tasks"),
    _refused("many", PROMPT, "--num_prepend_vtokens"),
    _refused("none", PROMPT, "--use_prompt_tuning"),
    _refused("one", PROMPT, "--max_prompt_embedding_table_size", inert=("0",)),
    _refused("one", SPECULATIVE, "--medusa_choices", "--eagle_choices", "--lookahead_config", "--draft_engine_dir",
             "--draft_target_model_config", "--prompt_lookup_config", "--max_draft_len"),
    _refused("one", SPECULATIVE, "--speculative_decoding_mode", inert=("disable",)),
    _refused("many", "sliding-window and sink-token attention are not in kiln (DBRX, MPT and Baichuan attend to the "
             "whole sequence)", "--max_attention_window_size", "--sink_token_length"),
    _refused("one", "diverse beam search is not in kiln", "--beam_search_diversity_rate", inert=("0", "0.0")),
    _refused("one", "weight streaming is not in kiln; every weight stays on the GPU", "--gpu_weights_percent",
             inert=("1", "1.0")),
    _refused("optional", "kiln shards a model as --tp_size/--pp_size say (automatic parallelism is not in kiln)",
             "--auto_parallel", inert=("1",)),
] for f in group}

_NARGS = {"none": 0, "optional": "?", "one": None, "many": "+"}
ORDER = DEST_PREFIX + "order"  # dest -> the spelling given, for the compat flags given, in command-line order


class _Given(argparse.Action):
    """Keeps a compat flag's value (True when it takes none) and its place among the compat flags given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True if values == [] else values)
        order = getattr(namespace, ORDER, {})
        order.pop(self.dest, None)
        setattr(namespace, ORDER, {**order, self.dest: option_string or self.dest})


def add_compat_flag(parser: argparse.ArgumentParser, flag: CompatFlag) -> None:
    """Register `flag` so that its value is kept only when given (default SUPPRESS), under one dest."""
    nargs = _NARGS[flag.arity]
    kwargs: dict = {"dest": _dest(flag), "default": argparse.SUPPRESS, "help": argparse.SUPPRESS,
                    "action": _Given, "nargs": nargs}
    if flag.arity != "none":
        kwargs["metavar"] = "X"
    if flag.arity == "optional":
        kwargs["const"] = True
    parser.add_argument(*flag.names, **kwargs)


def _dest(flag: CompatFlag) -> str:
    return DEST_PREFIX + flag.names[0].lstrip("-")


def in_given_order(args: argparse.Namespace, flags: list[CompatFlag]) -> list[CompatFlag]:
    """Those of `flags` that were given, in command-line order."""
    order = list(getattr(args, ORDER, {}))
    return sorted((f for f in flags if given(args, f)), key=lambda f: order.index(_dest(f)))


def spelled(args: argparse.Namespace, flag: CompatFlag) -> str:
    """The flag as the user wrote it (`-sq` for --smoothquant), to name it in messages."""
    return getattr(args, ORDER, {}).get(_dest(flag), flag.names[0])


def add_compat_flags(parser: argparse.ArgumentParser, ignored: list[str], refused: list[str]) -> None:
    """Add TensorRT-LLM's flags (by their first spelling) that this command ignores or refuses."""
    group = parser.add_argument_group("TensorRT-LLM flags (accepted and ignored, or refused: docs/cli.md)")
    for name in ignored:
        add_compat_flag(group, IGNORED[name])
    for name in refused:
        add_compat_flag(group, REFUSED[name])


def given(args: argparse.Namespace, flag: CompatFlag) -> bool:
    return hasattr(args, _dest(flag))


def check_compat_flags(args: argparse.Namespace, command: str, also_ignored: list[str] | None = None) -> list[str]:
    """Refuse a given refused flag (ConfigError naming it and the reason); print one line naming every ignored flag
    that was given (and `also_ignored`: flags the command parses itself), with what kiln does instead, and return
    their names."""
    ignored = [IGNORED[name] for name in also_ignored or []]
    for flag in in_given_order(args, list(REFUSED.values())):
        if str(getattr(args, _dest(flag))).lower() in flag.inert:
            ignored.append(flag)
        else:
            raise ConfigError(f"{spelled(args, flag)} is refused: {flag.note}")
    ignored += in_given_order(args, list(IGNORED.values()))
    names = [spelled(args, flag) for flag in ignored]
    if ignored:
        print(f"kiln {command}: {ignored_line(ignored, names)}", file=sys.stderr, flush=True)
    return names


def ignored_line(flags: list[CompatFlag], names: list[str]) -> str:
    """One line: the ignored flags (as spelled) grouped by what kiln does instead."""
    by_note: dict[str, list[str]] = {}
    for flag, name in zip(flags, names):
        by_note.setdefault(flag.note if flag.names[0] in IGNORED else "asks for nothing here", []).append(name)
    parts = [f"{', '.join(names)} ({note})" for note, names in by_note.items()]
    return "TensorRT-LLM flags accepted and ignored: " + "; ".join(parts)
