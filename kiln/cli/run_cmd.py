"""kiln run: generate from an engine (flags as TensorRT-LLM's examples/run.py)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from kiln.cli.trtllm_flags import add_compat_flags, check_compat_flags
from kiln.cli.run_checks import (DEFAULT_TEMPERATURE, DEFAULT_TOP_K, check_run_args, greedy_note, read_csv_prompts,
                                  read_npy_prompts)
from kiln.config import ConfigError
from kiln.llm import LLM, RequestOutput
from kiln.one_step import OneStepOptions, engine_for, is_kiln_artifact
from kiln.sampling_params import SamplingParams

HELP = "generate text from an engine"
# run.py's flags that kiln accepts and ignores, or refuses (trtllm_flags.py says what kiln does instead, or why not).
IGNORED = ["--use_py_session", "--no_prompt_template", "--kv_cache_enable_block_reuse", "--enable_chunked_context",
           "--cuda_graph_mode", "--debug_mode", "--return_all_generated_tokens", "--hf_device_map_auto",
           "--tokenizer_type", "--vocab_file", "--cross_kv_cache_fraction", "--hf_data_type", "--multi_block_mode",
           "--enable_context_fmha_fp32_acc"]
REFUSED = ["--lora_dir", "--lora_task_uids", "--lora_ckpt_source", "--prompt_table_path", "--prompt_tasks",
           "--num_prepend_vtokens", "--medusa_choices", "--eagle_choices", "--lookahead_config", "--draft_engine_dir",
           "--draft_target_model_config", "--prompt_lookup_config", "--max_attention_window_size",
           "--sink_token_length", "--beam_search_diversity_rate", "--gpu_weights_percent"]
LOG_LEVELS = {"verbose": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
              "internal_error": logging.CRITICAL}
PROFILE_ITERATIONS = 10  # run.py's
DEFAULT_PROMPT = "Born in north-east France, Soyer trained as a"  # run.py's default


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_input_flags(p.add_argument_group("inputs"))
    add_limit_flags(p.add_argument_group("limits"))
    add_sampling_flags(p.add_argument_group("sampling"))
    add_output_flags(p.add_argument_group("outputs"))
    add_parallel_flags(p.add_argument_group("parallelism and device"))
    add_debug_flags(p.add_argument_group("debug and profiling"))
    add_compat_flags(p, IGNORED, REFUSED)


def add_input_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--engine_dir", default=None,
                   help="the kiln engine to run (default: kiln_engine, or with --model_dir alone the cached engine "
                        "of that checkpoint)")
    g.add_argument("--hf_model_dir", "--model_dir", dest="hf_model_dir",
                   help="a Hugging Face checkpoint: its tokenizer when --engine_dir is given (run.py), else converted "
                        "and built once into kiln's engine cache ($KILN_CACHE_DIR or ~/.cache/kiln) and run")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="with --model_dir alone: the engine's dtype (default: the checkpoint's)")
    g.add_argument("--tokenizer_dir", help="Hugging Face tokenizer directory (needed for text prompts and output; "
                                          "default --hf_model_dir, else the tokenizer the engine carries)")
    g.add_argument("--input_text", nargs="+", default=[DEFAULT_PROMPT], help="one or more prompts, batched together")
    g.add_argument("--input_file", help=".txt (a prompt per line), .csv (token ids per row) or .npy (token ids, "
                                        "padded with --pad_id)")
    g.add_argument("--chat", action="store_true",
                   help="treat each --input_text as a user message and apply the model's chat format")
    g.add_argument("--system_prompt", default=None, help="system message for --chat")
    g.add_argument("--no_add_special_tokens", dest="add_special_tokens", action="store_false",
                   help="tokenize prompts without the tokenizer's special tokens (BOS)")


def add_limit_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max_output_len", type=int, required=True, help="tokens to generate per output (at most)")
    g.add_argument("--max_input_length", type=int, default=None,
                   help="keep only the last N prompt tokens (default: no truncation; the engine's limit applies)")
    g.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9,
                   help="share of the free GPU memory the KV cache takes after the weights are loaded")
    g.add_argument("--max_tokens_in_paged_kv_cache", type=int, default=None,
                   help="at most this many tokens in the KV cache, whatever the memory fraction allows")


def add_sampling_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="softmax temperature (0: greedy)")
    g.add_argument("--top_k", type=int, default=DEFAULT_TOP_K, help="1 is greedy (run.py's default); 0 disables top-k")
    g.add_argument("--top_p", type=float, default=0.0, help="nucleus sampling mass; 0 disables top-p")
    g.add_argument("--min_p", type=float, default=0.0, help="drop tokens below this share of the most likely one's")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="transformers' (1: off)")
    g.add_argument("--presence_penalty", type=float, default=0.0, help="OpenAI's (0: off)")
    g.add_argument("--frequency_penalty", type=float, default=0.0, help="OpenAI's (0: off)")
    g.add_argument("--no_repeat_ngram_size", type=int, default=None,
                   help="no n-gram of prompt + output occurs twice (transformers' no_repeat_ngram_size)")
    g.add_argument("--min_length", type=int, default=0, help="no end token before this many outputs")
    g.add_argument("--random_seed", type=int, default=0, help="seed of sampled (not greedy) outputs")
    g.add_argument("--end_id", type=int, default=None, help="end token (default: the tokenizer's end tokens)")
    g.add_argument("--stop_words", nargs="+", action="append", default=None,
                   help="stop words; given once they apply to every prompt, repeated the i-th group is prompt i's "
                        "(run.py's grouping)")
    g.add_argument("--bad_words", nargs="+", action="append", default=None,
                   help="words never to produce, grouped per prompt as --stop_words")
    g.add_argument("--ignore_eos", action="store_true", help="generate max_output_len tokens whatever comes")
    g.add_argument("--num_return_sequences", type=int, default=None,
                   help="outputs per prompt (default: 1, or every beam with --num_beams)")
    g.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams (1: no beam search)")
    g.add_argument("--length_penalty", type=float, default=1.0,
                   help="beam search: finished beams score cumulative logprob / length ** length_penalty")
    g.add_argument("--early_stopping", type=early_stopping, default=True,
                   help="beam search, as run.py's integer: 1 stops once num_beams beams finished, 0 when no "
                        "running beam is likely to beat them, any other value (or 'never') when none can")


def add_output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--streaming", action="store_true",
                   help="print the text as it is made (one output: as it comes; several: a line per output every "
                        "--streaming_interval tokens), then the usual results")
    g.add_argument("--streaming_interval", type=int, default=5,
                   help="with several outputs, print each every N tokens (run.py's 5)")
    g.add_argument("--pad_id", type=int, default=None, help="padding of --output_npy/--output_csv and .npy input")
    g.add_argument("--output_csv", help="token ids (prompt + output, padded) per sequence, run.py's layout")
    g.add_argument("--output_npy", help="the same as an int32 [sequences, length] array")
    g.add_argument("--output_log_probs_npy",
                   help="log-probs of each generated token, float32 [prompts, outputs, max_output_len], 0-padded")
    g.add_argument("--output_logits_npy", help="the raw logits of every generated token, float32 [prompts, outputs, "
                   "max_output_len, vocab], 0-padded (vocab x 4 bytes per token: for short runs and debugging)")
    g.add_argument("--output_cum_log_probs_npy", help="cumulative log-prob of each output, float32 [prompts, outputs]")
    g.add_argument("--output_json", help="one object per prompt: input_ids, output_ids per beam, text per beam")


def add_parallel_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tp_size", type=int, default=None,
                   help="with --model_dir alone: tensor parallel ranks of the engine (default 1); a built engine "
                        "runs with the ranks it was converted for")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_debug_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--no_cuda_graphs", "--enforce_eager", dest="no_cuda_graphs", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (for debugging and profiling)")
    g.add_argument("--no_async_scheduling", action="store_true",
                   help="run each step only after the previous one's tokens reached the host (by default a "
                   "single-rank engine launches the next step first, overlapping host and GPU work)")
    g.add_argument("--run_profiling", action="store_true",
                   help="as run.py: after the run, time 10 more runs of the same batch (after as many "
                        "warm-up runs) and print the average latency")
    g.add_argument("--log_level", choices=sorted(LOG_LEVELS), default="info", help="run.py's log levels")


def early_stopping(text: str) -> bool | str:
    """--early_stopping as run.py reads it (an integer: 1 early stopping, 0 none, any other "stopping by length",
    which is transformers' "never": the search goes on while any beam could still win), or transformers' spellings."""
    value = text.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    if value == "never" or value.lstrip("-").isdigit():
        return "never"
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer (1, 0, other), true, false or never")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """run.py's conventions: top_k 1 means greedy, top_p 0 means off; --num_beams > 1 means beam search (sampling
    flags are then ignored, penalties and --bad_words still apply). Stop and bad words are set per prompt later."""
    greedy = args.top_k == 1
    if args.num_beams < 1:
        raise ConfigError(f"--num_beams is {args.num_beams}; it must be >= 1 (1: no beam search)")
    beams = args.num_beams > 1
    n = args.num_return_sequences if args.num_return_sequences is not None else args.num_beams
    if beams and n > args.num_beams:
        raise ConfigError(f"--num_return_sequences {n} exceeds --num_beams {args.num_beams}; beam search returns "
                          "at most num_beams beams")
    return SamplingParams(
        num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=args.early_stopping,
        max_tokens=args.max_output_len, n=n,
        temperature=0.0 if greedy else args.temperature, top_k=0 if greedy else args.top_k,
        top_p=1.0 if args.top_p == 0 else args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=None if greedy or beams else args.random_seed,
        end_id=args.end_id, ignore_eos=args.ignore_eos, min_tokens=args.min_length,
        return_logits=bool(args.output_logits_npy), no_repeat_ngram_size=args.no_repeat_ngram_size or 0,
        include_stop_str_in_output=True,  # run.py's outputs end with the stop word that ended them
    )


def word_groups(groups: list[list[str]] | None, prompts: int, flag: str) -> list[list[str]]:
    """run.py's grouping of --stop_words/--bad_words: given once, the words apply to every prompt; repeated, the
    i-th group is prompt i's. Any other count would drop or invent a group, so it is an error."""
    if not groups:
        return [[] for _ in range(prompts)]
    if len(groups) == 1:
        return [list(groups[0]) for _ in range(prompts)]
    if len(groups) != prompts:
        raise ConfigError(f"{flag} is given {len(groups)} times for {prompts} prompts; give it once (for every "
                          "prompt) or once per prompt, in the prompts' order")
    return [list(g) for g in groups]


def per_prompt_params(args: argparse.Namespace, base: SamplingParams, tokenizer, prompts: int) -> list[SamplingParams]:
    """`base` with each prompt's stop words and bad words (tokenized without special tokens, as run.py does)."""
    if args.bad_words and tokenizer is None:
        raise ConfigError("--bad_words needs --tokenizer_dir to turn words into tokens")
    stops = word_groups(args.stop_words, prompts, "--stop_words")
    bads = word_groups(args.bad_words, prompts, "--bad_words")
    return [dataclasses.replace(base, stop=stop, bad_word_ids=[tokenizer.encode(w, add_special_tokens=False)
                                                              for w in bad])
            for stop, bad in zip(stops, bads)]


def read_prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    """Token ids of every prompt, truncated on the left to --max_input_length when given."""
    if args.input_file:
        prompts = read_input_file(Path(args.input_file), tokenizer, args.pad_id, args.add_special_tokens)
    else:
        if tokenizer is None:
            raise ConfigError("text prompts need --tokenizer_dir: the engine carries no tokenizer (or give token ids "
                              "with --input_file x.csv/.npy)")
        prompts = [chat_prompt(tokenizer, text, args.system_prompt) if args.chat else
                   tokenizer.encode(text, add_special_tokens=args.add_special_tokens) for text in args.input_text]
    if args.max_input_length is not None:
        prompts = [ids[-args.max_input_length:] for ids in prompts]
    return prompts


def chat_prompt(tokenizer, text: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def read_input_file(path: Path, tokenizer, pad_id: int | None, special: bool = True) -> list[list[int]]:
    if not path.is_file():
        raise ConfigError(f"--input_file {path} does not exist")
    if path.suffix == ".txt":
        if tokenizer is None:
            raise ConfigError("a .txt --input_file needs --tokenizer_dir")
        return [tokenizer.encode(line.rstrip("\n"), add_special_tokens=special)
                for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".csv":
        return read_csv_prompts(path)
    if path.suffix == ".npy":
        return read_npy_prompts(path, pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer else None))
    raise ConfigError(f"--input_file must end in .txt, .csv or .npy, not {path.suffix!r}")


def write_outputs(args: argparse.Namespace, results: list[RequestOutput], pad: int) -> None:
    if args.output_json:
        data = [{"input_ids": r.prompt_token_ids, "output_ids": [o.token_ids for o in r.outputs],
                 "text": [o.text for o in r.outputs], "cum_log_probs": [o.cumulative_logprob for o in r.outputs],
                 "finish_reason": [o.finish_reason for o in r.outputs]} for r in results]
        for item, r in zip(data, results):
            if any(o.score is not None for o in r.outputs):  # beam search: every beam with its score
                item["score"] = [o.score for o in r.outputs]
        Path(args.output_json).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    rows = [r.prompt_token_ids + o.token_ids for r in results for o in r.outputs]
    width = max(len(row) for row in rows)
    padded = [row + [pad] * (width - len(row)) for row in rows]
    if args.output_csv:
        with open(args.output_csv, "w", newline="") as f:
            csv.writer(f).writerows(padded)
    if args.output_npy:
        np.save(args.output_npy, np.array(padded, dtype=np.int32))
    write_log_probs(args, results)


def write_log_probs(args: argparse.Namespace, results: list[RequestOutput]) -> None:
    """run.py's log-prob outputs: per token (0 after an output ends) and cumulative, [prompts, outputs, ...]."""
    if not (args.output_log_probs_npy or args.output_cum_log_probs_npy or args.output_logits_npy):
        return
    outputs = max(len(r.outputs) for r in results)
    per_token = np.zeros((len(results), outputs, args.max_output_len), dtype=np.float32)
    cumulative = np.zeros((len(results), outputs), dtype=np.float32)
    for i, r in enumerate(results):
        for j, o in enumerate(r.outputs):
            per_token[i, j, : len(o.token_logprobs)] = o.token_logprobs
            cumulative[i, j] = o.cumulative_logprob
    if args.output_log_probs_npy:
        np.save(args.output_log_probs_npy, per_token)
    if args.output_logits_npy:  # run.py's name: X.npy -> X_generation.npy
        generation = stacked_logits(results, args.max_output_len)
        np.save(args.output_logits_npy.split(".npy")[0] + "_generation.npy", generation)
    if args.output_cum_log_probs_npy:
        np.save(args.output_cum_log_probs_npy, cumulative)


def stacked_logits(results: list[RequestOutput], max_output_len: int) -> np.ndarray:
    """Every output's per-token logits as float32 [prompts, outputs, max_output_len, vocab], 0 after it ends."""
    vocab = next((o.logits[0].shape[-1] for r in results for o in r.outputs if o.logits), 0)
    out = np.zeros((len(results), max(len(r.outputs) for r in results), max_output_len, vocab), dtype=np.float32)
    for i, r in enumerate(results):
        for j, o in enumerate(r.outputs):
            for t, row in enumerate(o.logits):
                out[i, j, t] = row.numpy()
    return out


def print_results(results: list[RequestOutput], tokenizer) -> None:
    for i, r in enumerate(results):
        prompt = tokenizer.decode(r.prompt_token_ids) if tokenizer else r.prompt_token_ids
        print(f'Input [Text {i}]: "{prompt}"')
        for o in r.outputs:
            shown = o.text if tokenizer else o.token_ids
            score = f" (score {o.score:.4f})" if o.score is not None else ""
            print(f'Output [Text {i} Beam {o.index}]: "{shown}"{score}')


def stream_to_stdout(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], interval: int,
                     has_text: bool) -> list[RequestOutput]:
    """Print the text as it is made (incrementally detokenized, so never half a character). One output (one
    prompt, one sequence): its text as it comes, then a newline. Several: a line `[prompt.output] text` per output
    every `interval` tokens and when it ends (newlines shown as \\n, so that lines stay apart). Without a
    tokenizer the token ids are printed instead of text. The usual results follow (print_results)."""
    single = len(prompts) == 1 and params[0].n == 1 and not params[0].use_beam_search
    pending: dict[tuple[int, int], list[str]] = {}
    for delta in llm.stream(prompts, params):
        piece = delta.text if has_text else f" {delta.token_id}"
        if single:
            print(piece, end="", flush=True)
            continue
        key = (delta.request_id, delta.index)
        pending.setdefault(key, []).append(piece)
        if len(pending[key]) >= interval or delta.finish_reason:
            end = f" [{delta.finish_reason}]" if delta.finish_reason else ""
            text = "".join(pending.pop(key)).replace("\n", "\\n")
            print(f"[{key[0]}.{key[1]}] {text}{end}", flush=True)
    if single:
        print(flush=True)
    return llm.last_results


def write_context_logits(llm: LLM, results: list[RequestOutput], path: str) -> None:
    """run.py's X_context.npy: the logits at every prompt position, prompts concatenated, float32 [tokens, vocab]."""
    rows = [llm.score(r.prompt_token_ids).float().cpu().numpy() for r in results]
    np.save(path.split(".npy")[0] + "_context.npy", np.concatenate(rows, axis=0))


def profile(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """run.py's --run_profiling: as many warm-up runs as timed ones, then the average latency of the timed runs."""
    for _ in range(PROFILE_ITERATIONS):
        llm.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    for _ in range(PROFILE_ITERATIONS):
        llm.generate(prompts, params, use_tqdm=False)
    latency = (time.perf_counter() - start) / PROFILE_ITERATIONS
    print(f"batch_size: {len(prompts)}, avg latency of {PROFILE_ITERATIONS} iterations: {latency:.4f} sec")


def engine_dir(args: argparse.Namespace) -> str:
    """--engine_dir; else, with --model_dir (a Hugging Face checkpoint), its engine from kiln's one-step cache
    (converted and built on first use); else run.py's default, kiln_engine."""
    one_step = [f"--{n}" for n in ("dtype", "tp_size") if getattr(args, n) is not None]
    if args.engine_dir is not None or not args.hf_model_dir or is_kiln_artifact(args.hf_model_dir):
        if one_step:
            raise ConfigError(f"{', '.join(one_step)} applies to a one-step run from --model_dir alone; a built "
                              "engine runs with the dtype and ranks kiln convert gave it")
        if args.engine_dir is None and args.hf_model_dir and is_kiln_artifact(args.hf_model_dir):
            return args.hf_model_dir  # a kiln engine given as --model_dir: run it
        return args.engine_dir or "kiln_engine"
    if args.tp_size is not None and args.tp_size < 1:
        raise ConfigError(f"--tp_size must be >= 1, got {args.tp_size}")
    return str(engine_for(args.hf_model_dir, OneStepOptions(dtype=args.dtype, tp_size=args.tp_size or 1)))


def main(args: argparse.Namespace) -> int:
    check_compat_flags(args, "run")
    check_run_args(args)  # before loading: nothing generated is lost to a flag found wrong afterwards
    note = greedy_note(args)
    if note:
        print(note, file=sys.stderr)
    logging.getLogger("kiln").setLevel(LOG_LEVELS[args.log_level])
    tokenizer_dir = args.tokenizer_dir or (args.hf_model_dir if args.engine_dir is not None else None)
    llm = LLM(engine_dir(args), tokenizer_dir=tokenizer_dir, device=args.device,
              kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction,
              use_cuda_graphs=not args.no_cuda_graphs, async_scheduling=not args.no_async_scheduling,
              kv_cache_max_tokens=args.max_tokens_in_paged_kv_cache)
    try:
        return generate_and_write(args, llm)
    finally:
        llm.close()  # a multi-rank engine's worker processes end with the command


def generate_and_write(args: argparse.Namespace, llm: LLM) -> int:
    tokenizer = llm.tokenizer
    prompts = read_prompts(args, tokenizer)
    base = sampling_params(args)
    params = per_prompt_params(args, base, tokenizer, len(prompts))
    if args.streaming:
        results = stream_to_stdout(llm, prompts, params, args.streaming_interval, tokenizer is not None)
    else:
        results = llm.generate(prompts, params, use_tqdm=False)
    print_results(results, tokenizer)
    pad = args.pad_id if args.pad_id is not None else (base.end_id if base.end_id is not None else
                                                       (tokenizer.pad_token_id if tokenizer else 0)) or 0
    write_outputs(args, results, pad)
    if args.output_logits_npy:
        write_context_logits(llm, results, args.output_logits_npy)
    if args.run_profiling:
        profile(llm, prompts, params)
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace()))
