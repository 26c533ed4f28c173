"""The quantization flags of TensorRT-LLM's scripts, and the one place that refuses them until kiln quantizes.

Every command that ports a TensorRT-LLM script registers the quantization flags that script takes (so that a
pasted command line parses), and calls `refuse_quantization` before doing anything: a given flag is refused with one
line naming it, never ignored. The quantization work (issues 14 and 15) replaces `refuse_quantization` with the
real mapping onto kiln's QuantConfig.
"""

from __future__ import annotations

import argparse

from kiln.cli.trtllm_flags import CompatFlag, add_compat_flag, in_given_order, spelled
from kiln.config import ConfigError

MESSAGE = ("quantization is not implemented in kiln yet (issues 14 and 15); drop the quantization flags for an "
           "unquantized model in the --dtype given")


def _flags(arity: str, *names: str) -> list[CompatFlag]:
    return [CompatFlag(tuple(name.split("|")), arity, MESSAGE) for name in names]


QUANT: dict[str, CompatFlag] = {f.names[0]: f for group in [
    # convert_checkpoint.py, the legacy build.py and hf_baichuan_convert.py
    _flags("none", "--use_weight_only", "--per_group", "--per_token", "--per_channel", "--int8_kv_cache",
           "--fp8_kv_cache", "--enable_fp8", "--use_smooth_quant", "--quantize_lm_head",
           "--calibrate_kv_cache|--calibrate-kv-cache|-kv"),
    _flags("one", "--weight_only_precision", "--group_size", "--quant_ckpt_path", "--quantized_fp8_model_path",
           "--smoothquant|-sq", "--calib_dataset", "--dataset_cache_dir", "--use_fp8_context_fmha"),
    # quantize.py (its --qformat full_prec and --dtype are not quantization: quantize_cmd.py handles them)
    _flags("one", "--kv_cache_dtype", "--awq_block_size", "--calib_size", "--calib_max_seq_length",
           "--auto_quantize_bits"),
] for f in group}


def add_quant_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Register the named quantization flags (first spellings in QUANT) so that they parse."""
    group = parser.add_argument_group("quantization (not implemented yet: refused with a message)")
    for name in names:
        add_compat_flag(group, QUANT[name])


def quant_flags_given(args: argparse.Namespace) -> list[str]:
    return [spelled(args, flag) for flag in in_given_order(args, list(QUANT.values()))]


def refuse_quantization(args: argparse.Namespace, extra: list[str] | None = None) -> None:
    """Raise a ConfigError naming every quantization flag given, in command-line order, after `extra` (what a
    command found itself, such as quantize.py's `--qformat int4_awq`)."""
    flags = list(extra or []) + quant_flags_given(args)
    if flags:
        raise ConfigError(f"{', '.join(flags)}: {MESSAGE}")
