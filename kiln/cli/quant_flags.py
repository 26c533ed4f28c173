"""The quantization flags of TensorRT-LLM's scripts: the one place that maps them onto kiln's QuantConfig or refuses
them.

Every command that ports a TensorRT-LLM script registers the quantization flags that script takes (so that a
pasted command line parses), and calls `quant_config_from_flags` (or `refuse_quantization`) before doing anything.
What kiln runs: `--use_weight_only` with `--weight_only_precision int8` (the default, W8A16) or `int4` (W4A16), and
the group-wise `int4_awq` (W4A16_AWQ) and `int4_gptq` (W4A16_GPTQ) with their flags (`--per_group`, `--group_size`,
`--calib_dataset`, `--calib_size`, `--calib_max_seq_length`, GPTQ's `--desc_act`); an INT8 or FP8 KV cache
(`--int8_kv_cache`, `--calibrate_kv_cache`/`-kv`, `--fp8_kv_cache`, quantize.py's `--kv_cache_dtype int8|fp8`), alone
or with weight-only, calibrated as `--calib_dataset`, `--calib_size` and `--calib_max_seq_length` say (the same text
and windows as AWQ/GPTQ when both are asked for); `--quantize_lm_head` with the weight-only formats (the LM head
quantized like the other linears, kiln.quant.apply / kiln.quant.lm_head). Any other quantization flag, or a weight-only precision kiln does
not run, is refused with one line naming every quantization flag given, never ignored (issue 15 adds the other
formats).
"""

from __future__ import annotations

import argparse

from kiln.cli.trtllm_flags import DEST_PREFIX, CompatFlag, add_compat_flag, in_given_order, spelled
from kiln.config import GROUP_WISE_QUANT_ALGOS, LM_HEAD_QUANT_ALGOS, SMOOTHQUANT_ALGOS, ConfigError, QuantConfig
from kiln.quant.calibrate import CalibrationOptions
from kiln.quant.kv_calibration import KVCalibration
from kiln.quant.smoothquant import sq_algo

MESSAGE = ("this quantization is not implemented in kiln yet (issue 15; kiln runs weight-only "
           "--use_weight_only --weight_only_precision int8|int4|int4_awq|int4_gptq, FP8 --enable_fp8 [--per_channel] "
           "[--per_token], SmoothQuant --smoothquant ALPHA [--per_token] [--per_channel] and an INT8/FP8 KV cache, "
           "--int8_kv_cache or --fp8_kv_cache; --quantize_lm_head goes with the weight-only formats); use those, or "
           "drop the quantization flags for an unquantized model in the --dtype given")
# --weight_only_precision -> TensorRT-LLM's quant_algo.
WEIGHT_ONLY = {"int8": "W8A16", "int4": "W4A16", "int4_awq": "W4A16_AWQ", "int4_gptq": "W4A16_GPTQ"}
# What group-wise INT4 takes beside --use_weight_only/--weight_only_precision (convert) or --qformat (quantize).
GROUP_WISE_FLAGS = {"--per_group", "--group_size", "--awq_block_size", "--calib_dataset", "--calib_size",
                    "--calib_max_seq_length", "--desc_act"}
# TensorRT-LLM quantize.py's defaults (calib_size: at most what the calibration text holds in windows).
CALIB_SIZE, CALIB_LENGTH, GROUP_SIZE = 512, 512, 128
# SmoothQuant W8A8 (kiln.quant.smoothquant): --smoothquant ALPHA with --per_token / --per_channel, calibrated as the
# calibration flags say; quantize.py's --qformat int8_sq smooths with the MPT README's alpha.
SQ_FLAGS = {"--smoothquant", "--per_token", "--per_channel"}
QFORMAT_SQ_ALPHA = 0.5


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
    # kiln's own: GPTQ act-order (AutoGPTQ's desc_act)
    _flags("none", "--desc_act"),
] for f in group}


# The KV-cache flags (kiln.quant.kv_cache) and the calibration flags that go with them.
KV_CACHE_DTYPES = {"int8": "INT8", "fp8": "FP8"}
KV_FORMAT_FLAGS = {"--int8_kv_cache": "INT8", "--calibrate_kv_cache": "INT8", "--fp8_kv_cache": "FP8"}
CALIB_FLAGS = {"--calib_dataset", "--calib_size", "--calib_max_seq_length"}
KV_FLAGS = set(KV_FORMAT_FLAGS) | CALIB_FLAGS | {"--kv_cache_dtype"}


def add_quant_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Register the named quantization flags (first spellings in QUANT) so that they parse."""
    group = parser.add_argument_group("quantization (weight-only int8/int4 runs; the rest is refused with a message)")
    for name in names:
        add_compat_flag(group, QUANT[name])


def quant_flags_given(args: argparse.Namespace) -> list[str]:
    return [spelled(args, flag) for flag in in_given_order(args, list(QUANT.values()))]


def _fits(algo: str | None, others: set[str]) -> bool:
    """Whether the quantization flags `others` (beside those that chose `algo` and the KV cache's) belong to `algo`."""
    if algo in LM_HEAD_QUANT_ALGOS:  # the weight-only formats quantize the LM head too when asked
        others = others - {"--quantize_lm_head"}
    if algo in SMOOTHQUANT_ALGOS or algo == "FP8":  # SmoothQuant and static FP8 activation scales are calibrated
        return others <= CALIB_FLAGS
    if algo not in GROUP_WISE_QUANT_ALGOS:
        return not others
    allowed = GROUP_WISE_FLAGS - ({"--desc_act"} if algo == "W4A16_AWQ" else set())
    if algo == "W4A16_GPTQ":  # GPTQ-for-LLaMa's quantized safetensors beside the float checkpoint
        allowed = allowed | {"--quant_ckpt_path"}
    return others <= allowed


def calibrates_activations(quant: QuantConfig) -> bool:
    """Whether convert/quantize runs the float model on calibration text for `quant`: an INT8/FP8 KV cache's
    scales, static FP8 input scales, or SmoothQuant's input absmax (all on the same calibration flags)."""
    return quant.kv_cache_quant_algo is not None or quant.quant_algo == "FP8" or quant.quant_algo in SMOOTHQUANT_ALGOS


def quant_ckpt_path(args: argparse.Namespace) -> str | None:
    """`--quant_ckpt_path FILE` (int4_gptq only: GPTQ-for-LLaMa's safetensors), None when not given."""
    return getattr(args, _dest_of("--quant_ckpt_path"), None)


def weight_only_algo(args: argparse.Namespace) -> str | None:
    """The quant_algo of TensorRT-LLM's weight-only flags (`--use_weight_only`, optionally `--weight_only_precision
    int8|int4|int4_awq|int4_gptq`, the group-wise ones with their flags); None for anything else."""
    given = _given_names(args) - kv_flags_taken(args)  # an INT8/FP8 KV cache combines with weight-only
    if "--use_weight_only" not in given:
        return None
    precision = getattr(args, _dest_of("--weight_only_precision"), "int8")  # TensorRT-LLM's default
    algo = WEIGHT_ONLY.get(precision)
    return algo if _fits(algo, given - {"--use_weight_only", "--weight_only_precision"}) else None


def qformat_takes_flags(args: argparse.Namespace, algo: str | None) -> bool:
    """Whether every quantization flag given (beside the KV cache's) belongs to the format quantize.py's --qformat
    chose (`algo`; None: full_prec)."""
    return _fits(algo, _given_names(args) - kv_flags_taken(args))


# FP8 weights and activations (kiln.quant.fp8): --enable_fp8 alone is per-tensor with static activation scales
# ("FP8"); --per_token makes the activation scales dynamic, one per token, and --per_channel (with --per_token) the
# weight scales one per output channel.
FP8_FLAGS = {"--enable_fp8", "--per_channel", "--per_token"}


def fp8_algo(args: argparse.Namespace) -> str | None:
    """FP8 or FP8_PER_CHANNEL_PER_TOKEN when --enable_fp8 is given with nothing but FP8 and KV-cache/calibration
    flags; None otherwise."""
    given = _given_names(args) - KV_FLAGS
    if "--enable_fp8" not in given or not given <= FP8_FLAGS:
        return None
    per_channel, per_token = "--per_channel" in given, "--per_token" in given
    if per_channel and not per_token:
        raise ConfigError("kiln's FP8 with per-channel weight scales takes per-token activation scales: give "
                          "--enable_fp8 --per_channel --per_token (or drop --per_channel for per-tensor weights)")
    if per_token:
        return "FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8_PER_TENSOR_PER_TOKEN"
    return "FP8"


def _dest_of(name: str) -> str:
    return DEST_PREFIX + name.lstrip("-")


def _given_names(args: argparse.Namespace) -> set[str]:
    return {flag.names[0] for flag in in_given_order(args, list(QUANT.values()))}


def kv_cache_algo(args: argparse.Namespace) -> str | None:
    """INT8 or FP8 when the flags ask for a quantized KV cache (None: the engine dtype); asking for both or an
    unknown --kv_cache_dtype is a ConfigError."""
    given = _given_names(args)
    asked = {KV_FORMAT_FLAGS[name] for name in given if name in KV_FORMAT_FLAGS}
    if "--kv_cache_dtype" in given:
        value = str(getattr(args, _dest_of("--kv_cache_dtype"))).lower()
        if value not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv_cache_dtype {value} is not one kiln runs; choose int8 or fp8, or drop the flag "
                              "for a KV cache in the model dtype")
        asked.add(KV_CACHE_DTYPES[value])
    if len(asked) > 1:
        raise ConfigError("the flags ask for both an INT8 and an FP8 KV cache; give one of --int8_kv_cache "
                          "(-kv, --kv_cache_dtype int8) or --fp8_kv_cache (--kv_cache_dtype fp8)")
    return asked.pop() if asked else None


def kv_flags_taken(args: argparse.Namespace) -> set[str]:
    """The KV-cache flags this command line uses: with a KV format, its calibration flags too; without one, a
    calibration flag asks for something kiln does not run (refused with the rest)."""
    return KV_FLAGS if kv_cache_algo(args) else KV_FLAGS - CALIB_FLAGS


def kv_calibration_from_flags(args: argparse.Namespace, per_head: bool = False) -> KVCalibration:
    """How to calibrate the KV scales: --calib_dataset (default: kiln's shipped text), --calib_size (default 512
    sequences), --calib_max_seq_length (default 512 tokens each)."""
    def number(name: str, default: int) -> int:
        value = getattr(args, _dest_of(name), default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} takes a whole number, got {value!r}") from None

    calib = KVCalibration(dataset=getattr(args, _dest_of("--calib_dataset"), None),
                          num_samples=number("--calib_size", 512),
                          max_seq_len=number("--calib_max_seq_length", 512), per_head=per_head)
    calib.validate()
    return calib


def _int_flag(args: argparse.Namespace, name: str, default: int, lowest: int = 1) -> int:
    value = getattr(args, _dest_of(name), None)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = lowest - 1
    if number < lowest:
        raise ConfigError(f"{name} takes an integer >= {lowest}, got {value!r}")
    return number


def _group_size(args: argparse.Namespace) -> int:
    given = [n for n in ("--group_size", "--awq_block_size") if hasattr(args, _dest_of(n))]
    values = {_int_flag(args, n, GROUP_SIZE) for n in given}
    if len(values) > 1:
        raise ConfigError("--group_size and --awq_block_size name the same group size; give one of them")
    return values.pop() if values else GROUP_SIZE


def smoothquant_config(args: argparse.Namespace, kv: str | None) -> QuantConfig | None:
    """The SmoothQuant QuantConfig when the flags are `--smoothquant ALPHA` with optional --per_token, --per_channel
    and calibration flags (and a KV-cache format); None otherwise."""
    given = _given_names(args) - kv_flags_taken(args) - CALIB_FLAGS
    if "--smoothquant" not in given or not given <= SQ_FLAGS:
        return None
    value = getattr(args, _dest_of("--smoothquant"))
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--smoothquant takes the smoothing alpha, a number in [0, 1] (e.g. 0.5), got {value!r}") \
            from None
    return QuantConfig(quant_algo=sq_algo("--per_token" in given, "--per_channel" in given), kv_cache_quant_algo=kv,
                       smoothquant_val=alpha)


def quant_config_from_flags(args: argparse.Namespace, qformat_algo: str | None = None) -> QuantConfig:
    """The QuantConfig the quantization flags ask for (weight-only INT8/INT4/AWQ/GPTQ, SmoothQuant, or `qformat_algo`
    that quantize.py's --qformat chose, and the KV cache); anything else is refused by `refuse_quantization`'s one
    line."""
    kv = kv_cache_algo(args)
    algo = weight_only_algo(args) or fp8_algo(args)
    if algo is None:
        smooth = smoothquant_config(args, kv)
        if smooth is not None:
            return smooth
        if not qformat_takes_flags(args, qformat_algo):
            refuse_quantization(args)
        algo = qformat_algo
    if algo in SMOOTHQUANT_ALGOS:  # quantize.py's --qformat int8_sq
        return QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, smoothquant_val=QFORMAT_SQ_ALPHA)
    head = "--quantize_lm_head" in _given_names(args)  # (only here with a weight-only algo: _fits refused the rest)
    if algo not in GROUP_WISE_QUANT_ALGOS:
        return QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, quantize_lm_head=head)
    group = _group_size(args)
    if group not in (32, 64, 128):  # wider groups exist only for published checkpoints' group_size -1
        raise ConfigError(f"group size {group!r} is not one kiln runs for {algo}; use --group_size 32, 64 or 128")
    # What stays in the engine dtype (TensorRT-LLM's exclude_modules, in kiln's module names): lm_head leaves the
    # list when it is quantized, as TensorRT-LLM's quantize.py writes it.
    kept = ["embed_tokens", *([] if head else ["lm_head"]), "*router", "*norm*"]
    return QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv, group_size=group, has_zero_point=True,
                       exclude_modules=kept, quantize_lm_head=head)


def calibration_from_flags(args: argparse.Namespace, quant: QuantConfig,
                           seed: int) -> tuple[CalibrationOptions | None, str | None]:
    """AWQ's or GPTQ's calibration options and the --calib_dataset file (None, None for other formats)."""
    if quant.quant_algo not in GROUP_WISE_QUANT_ALGOS:
        return None, None
    algo = "awq" if quant.quant_algo == "W4A16_AWQ" else "gptq"
    options = CalibrationOptions(algo, sequences=_int_flag(args, "--calib_size", CALIB_SIZE),
                                 length=_int_flag(args, "--calib_max_seq_length", CALIB_LENGTH, lowest=2), seed=seed,
                                 desc_act=bool(getattr(args, _dest_of("--desc_act"), False)))
    return options, getattr(args, _dest_of("--calib_dataset"), None)


def calibration_asked(args: argparse.Namespace) -> bool:
    """Whether a flag of AWQ/GPTQ calibration was given (dummy weights are calibrated only then)."""
    return bool(_given_names(args) & (CALIB_FLAGS | {"--desc_act"}))


def refuse_quantization(args: argparse.Namespace, extra: list[str] | None = None) -> None:
    """Raise a ConfigError naming every quantization flag given, in command-line order, after `extra` (what a
    command found itself, such as quantize.py's `--qformat int4_awq`)."""
    flags = list(extra or []) + quant_flags_given(args)
    if flags:  # (named with the KV-cache flags too: one refused flag makes the whole line)
        raise ConfigError(f"{', '.join(flags)}: {MESSAGE}")
