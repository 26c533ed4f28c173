"""Issue 13's proof: every command line of TensorRT-LLM's DBRX, MPT and Baichuan example READMEs
(tests/data/trtllm_readme_commands.txt) replayed in kiln with only the command name changed, in each README's order,
on tiny random checkpoints in the published layouts placed where the READMEs look for them (./dbrx,
mosaicml/mpt-7b, baichuan-inc/Baichuan-13B-Chat, each with its tokenizer). Tensor and pipeline sizes above 2 are
scaled to 2 so that the ranks run on two CPU cores. Each line must produce what it is for (a checkpoint or engine with
the stated mapping, dtype, weight and KV-cache quantization, or generated text) or fail with the exact one-line reason:
quantization other than weight-only INT8/INT4, FP8 W8A8, SmoothQuant and an INT8/FP8 KV cache is refused until
issues 14/15 finish, the legacy build.py's one-step flags (--dtype, --model_version) over an already converted
checkpoint are refused, the tiny Baichuan stand-in cannot be recognised without --model_version (the published one
can), and the MPT README's `--tp_szie` is a misspelling that must stay an error.

Where a README points at a directory it never made (DBRX runs ./trt_engines/dbrx/tp8 after building .../8-gpu; MPT
runs .../mpt-30b/fp16/4-gpu/ after building .../fp16_tp4), the replay fixes the path and says so in FIXES; the
misspelled --tp_szie line is replayed as written (an error) and then as meant, so that the lines after it run.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures_baichuan import baichuan_published_config, random_state, save_published
from fixtures_dbrx import dbrx_published_config, hf_dbrx_model
from fixtures_dbrx import save_published as save_dbrx
from fixtures_mpt import hf_mpt_model, mpt_published_config, published_state, save_checkpoint
from fixtures_tokenizers import build_baichuan_tokenizer_dir, build_neox_tokenizer_dir
from kiln.cli.main import main as kiln_main
from kiln.cli.quant_flags import MESSAGE as QUANT_MESSAGE

DATA = Path(__file__).parent / "data" / "trtllm_readme_commands.txt"
SCRIPTS = {"convert_checkpoint.py": "convert", "hf_baichuan_convert.py": "convert", "trtllm-build": "build",
           "build.py": "build", "run.py": "run", "summarize.py": "summarize", "quantize.py": "quantize"}
PARALLEL_FLAGS = ("--tp_size", "--pp_size", "--world_size", "-tp", "--tensor-parallelism")
DBRX, MPT, BAICHUAN = "000_e7e66e6223bd5342.txt", "003_a8177696bb4198a3.txt", "004_45921b9ca5ff5ab8.txt"


@dataclass(frozen=True)
class Expect:
    """What one line must do. kind: "checkpoint"/"engine" (at `path`, with tp, pp, dtype and for DBRX the experts'
    ep size), "text" (prints generated text), "quant" (refused: `flags` named in the one-line quantization message),
    "missing" (reads `path`, which a refused line did not make), "typo" (argparse names `flags`), "summarize"
    (kiln summarize on the shipped set prints ROUGE), "error" (exit 2, the last line holding `flags`)."""

    kind: str
    path: str = ""
    tp: int = 1
    pp: int = 1
    dtype: str = ""
    ep: int = 1
    flags: str = ""
    same_text_as: int | None = None  # a "text" line whose engine holds the same weights: the same greedy text
    quant_algo: str | None = None  # a checkpoint's or engine's weight quantization (W8A16, W4A16)
    kv_algo: str | None = None  # its KV-cache quantization (INT8, FP8)


def ckpt(path: str, dtype: str, tp: int = 1, pp: int = 1, ep: int = 1, quant_algo: str | None = None,
         kv_algo: str | None = None) -> Expect:
    return Expect("checkpoint", path, tp, pp, dtype, ep, quant_algo=quant_algo, kv_algo=kv_algo)


def engine(path: str, dtype: str, tp: int = 1, pp: int = 1, ep: int = 1, quant_algo: str | None = None,
           kv_algo: str | None = None) -> Expect:
    return Expect("engine", path, tp, pp, dtype, ep, quant_algo=quant_algo, kv_algo=kv_algo)


def quant(flags: str) -> Expect:
    return Expect("quant", flags=flags)


TEXT, SUMMARIZE = Expect("text"), Expect("summarize")
DBRX_CKPT, DBRX_ENGINE = "tllm_checkpoint_dbrx_8gpu", "trt_engines/dbrx/8-gpu"
BC = "tmp/baichuan_v1_13b/trt_engines/"
BC_ROOT = "tmp/baichuan_v1_13b/"

EXPECT: dict[str, list[Expect]] = {
    DBRX: [
        ckpt(DBRX_CKPT, "bfloat16", tp=2), engine(DBRX_ENGINE, "bfloat16", tp=2),
        ckpt(DBRX_CKPT, "bfloat16", tp=2, pp=2), engine(DBRX_ENGINE, "bfloat16", tp=2, pp=2),
        ckpt(DBRX_CKPT, "bfloat16", tp=2, ep=2), engine(DBRX_ENGINE, "bfloat16", tp=2, ep=2),
        ckpt("tllm_checkpoint_dbrx_4gpu", "float16", tp=2, quant_algo="W8A16"),
        engine("trt_engines/dbrx/weight_only/4-gpu", "float16", tp=2, quant_algo="W8A16"),
        ckpt("tllm_checkpoint_4gpu_int8_kv", "float16", kv_algo="INT8"),
        ckpt("tllm_checkpoint_4gpu_int8_kv_wq", "float16", tp=2, quant_algo="W8A16", kv_algo="INT8"),
        engine("trt_engines/dbrx/int8_kv_cache_weight_only/4-gpu", "float16", tp=2, quant_algo="W8A16",
               kv_algo="INT8"),
        TEXT,
    ],
    MPT: [
        ckpt("ckpts/mpt-7b/fp16", "float16"), ckpt("ckpts/mpt-7b/fp32_tp4", "float32", tp=2),
        ckpt("ckpts/mpt-7b/int8_wo", "float32", quant_algo="W8A16"),
        ckpt("ckpts/mpt-7b/int4_wo", "float32", quant_algo="W4A16"),
        ckpt("ckpts/mpt-7b/int8_sq", "float32", quant_algo="W8A8_SQ_PER_TENSOR_PLUGIN"),
        ckpt("ckpts/mpt-7b/fp16_int8kv", "float16", kv_algo="INT8"),
        ckpt("ckpts/mpt-7b/int4_awq", "float32", quant_algo="W4A16_AWQ"),
        ckpt("ckpts/mpt-7b/fp8", "float32", quant_algo="FP8", kv_algo="FP8"),  # quantize.py --qformat fp8: FP8 W8A8
        ckpt("ckpts/mpt-7b/int8_wo", "float32", tp=2, quant_algo="W8A16"),
        ckpt("ckpts/mpt-7b/int4_wo", "float32", quant_algo="W4A16"),
        ckpt("ckpts/mpt-7b/sq_int8kv", "float32", quant_algo="W8A8_SQ_PER_CHANNEL", kv_algo="INT8"),
        engine("trt_engines/mpt-7b/fp16", "float16"),
        Expect("typo", flags="--tp_szie 4"),
        engine("trt_engines/mpt-30b/fp16_tp4", "float16", tp=2),
        TEXT,
    ],
    BAICHUAN: [
        engine(BC + "fp16/1-gpu", "float16"), engine(BC + "bf16/1-gpu", "bfloat16"),
        engine(BC + "int8_weight_only/1-gpu", "float16", quant_algo="W8A16"),
        engine(BC + "int4_weight_only/1-gpu", "float16", quant_algo="W4A16"),
        engine(BC + "fp16/2-gpu", "float16", tp=2),
        # hf_baichuan_convert.py -kv names no --model_version, which kiln reads from the published sizes; the tiny
        # stand-in has none of them, so this line (only) stops there (the KV flags themselves are accepted).
        Expect("error", flags="cannot tell which Baichuan this is"),
        Expect("error", flags="applies only with --model_dir (a one-step build)"),  # its --dtype, --model_version
        quant("--quant_ckpt_path, --use_weight_only, --weight_only_precision, --per_group, --int8_kv_cache"),
        Expect("error", flags="cannot tell which Baichuan this is"),  # -sq runs, but the stand-in needs a version
        quant("--use_smooth_quant, --per_token, --per_channel"),
        # quantize.py --qformat fp8 runs (FP8 W8A8, as MPT's line shows), but this line's model directory is one the
        # README never made (/code/model/Baichuan2-13B-Chat): it stops there
        Expect("missing", "/code/model/Baichuan2-13B-Chat"),
        quant("--quantized_fp8_model_path, --enable_fp8, --fp8_kv_cache"),
        # quantize.py --qformat int4_awq runs (AWQ), but like -kv above it names no --model_version (quantize.py has
        # none), and the tiny stand-in's sizes are not the published 13B's: it stops there
        Expect("error", flags="cannot tell which Baichuan this is"),
        quant("--quant_ckpt_path, --use_weight_only, --weight_only_precision, --per_group, --group_size"),
        # GPTQ-for-LLaMa's file loads with int4_gptq, but the README's line names no --model_dir beside it
        Expect("error", flags="--quant_ckpt_path needs --model_dir"),
        TEXT, TEXT,
        TEXT, Expect("text", same_text_as=17),  # the INT8 weight-only engine, twice: the same greedy text
        Expect("text", same_text_as=15),  # tp 2 (mpirun -n 2) writes what one rank wrote
        SUMMARIZE, SUMMARIZE, SUMMARIZE,
    ],
}

# README paths that point at directories the README never made: (seed, line index) -> (as written, as meant).
FIXES = {(DBRX, 11): ("./trt_engines/dbrx/tp8", "./trt_engines/dbrx/8-gpu"),
         (MPT, 14): ("./trt_engines/mpt-30b/fp16/4-gpu/", "./trt_engines/mpt-30b/fp16_tp4")}
# The misspelled line, replayed as meant after the written one failed.
TYPO_FIXES = {(MPT, 12): ("--tp_szie", "--tp_size")}
# The summarize.py lines (the second reads the INT8 weight-only engine).
SUMMARIZE_LINES = {(BAICHUAN, 20), (BAICHUAN, 21), (BAICHUAN, 22)}


def read_commands() -> dict[str, list[str]]:
    """The data file's command lines by seed file."""
    commands: dict[str, list[str]] = {}
    seed = ""
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.startswith("[") and line.endswith("]"):
            seed = line[1:-1]
            commands[seed] = []
        elif line and not line.startswith("#"):
            commands[seed].append(line)
    return commands


def to_kiln(line: str) -> list[str]:
    """argv of the kiln command: `mpirun -n N [...] python[3] PATH/script.py ARGS` or `trtllm-build ARGS` becomes
    `<kiln command> ARGS`, with every parallel size above 2 scaled to 2."""
    argv = shlex.split(line)
    if argv[0] == "mpirun":
        argv = argv[next(i for i, a in enumerate(argv) if a.startswith("python")):]
    if argv[0].startswith("python"):
        argv = argv[1:]
    script, args = Path(argv[0]).name, argv[1:]
    return [SCRIPTS[script], *scale_parallel(args)]


def scale_parallel(args: list[str]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out):
        name, _, value = arg.partition("=")
        if name in PARALLEL_FLAGS and value and int(value) > 2:
            out[i] = f"{name}=2"
        elif arg in PARALLEL_FLAGS and i + 1 < len(out) and int(out[i + 1]) > 2:
            out[i + 1] = "2"
    return out


def test_every_readme_line_has_an_expectation():
    commands = read_commands()
    assert sorted(commands) == sorted(EXPECT)
    assert sum(len(lines) for lines in commands.values()) == 50
    for seed, lines in commands.items():
        assert len(lines) == len(EXPECT[seed]), seed
        assert all(Path(to_kiln(line)[0]).name in {"convert", "build", "run", "quantize", "summarize"}
                   for line in lines)
    kinds = Counter(e.kind for lines in EXPECT.values() for e in lines)  # the counts docs/cli.md states
    assert kinds == {"checkpoint": 17, "engine": 12, "text": 7, "quant": 4, "error": 5, "typo": 1, "summarize": 3,
                     "missing": 1}
    assert {(seed, i) for seed, lines in EXPECT.items() for i, e in enumerate(lines) if e.kind == "summarize"} == \
        SUMMARIZE_LINES
    assert to_kiln(commands[DBRX][2])[-4:] == ["--pp_size", "2", "--tp_size", "2"]
    assert to_kiln(commands[BAICHUAN][19])[:1] == ["run"]  # mpirun -n 2 --allow-run-as-root python ../run.py


def make_sources(root: Path) -> None:
    """The READMEs' model directories under `root`, tiny and random, each in its published layout with its tokenizer:
    ./dbrx (sharded safetensors, a tokenizer.json BPE tokenizer), mosaicml/mpt-7b and mosaicml/mpt-30b (sharded
    pytorch_model*.bin, GPT-NeoX tokenizer.json, max_seq_len 2048 so that the README's --max_seq_len 1536 fits) and
    baichuan-inc/Baichuan-13B-Chat (v1 13B: ALiBi, sharded .bin, SentencePiece tokenizer.model, model_max_length 4096
    as published, so that summarize.py's 923-token prompts fit the README's engines)."""
    cfg = dbrx_published_config(vocab_size=512)
    build_neox_tokenizer_dir(save_dbrx(hf_dbrx_model(cfg), cfg, root / "dbrx", shards=2), chat_template=False)
    for name in ("mpt-7b", "mpt-30b"):
        cfg = mpt_published_config(vocab_size=512, max_seq_len=2048)
        out = save_checkpoint(published_state(hf_mpt_model(cfg)), cfg, root / "mosaicml" / name, fmt="bin")
        build_neox_tokenizer_dir(out, chat_template=False)
    baichuan = root / "baichuan-inc" / "Baichuan-13B-Chat"
    build_baichuan_tokenizer_dir(baichuan, version=1)  # its config.json stub is replaced by the model's below
    cfg = baichuan_published_config("v1_13b", vocab_size=704, model_max_length=4096)  # as published: summarize's 923
    save_published(random_state(cfg, "v1_13b"), cfg, baichuan, fmt="bin", shards=3)


def run_line(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = kiln_main(argv)
    except SystemExit as exit_:  # argparse's own errors (unknown command, unrecognized flag)
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def check_artifact(expect: Expect, kind: str) -> None:
    config = json.loads((Path(expect.path) / "config.json").read_text())
    mapping = config["mapping"]
    assert config["kind"] == kind and config["dtype"] == expect.dtype, config
    assert (mapping["tp_size"], mapping["pp_size"]) == (expect.tp, expect.pp), mapping
    assert config["quantization"]["quant_algo"] == expect.quant_algo, config["quantization"]
    assert config["quantization"]["kv_cache_quant_algo"] == expect.kv_algo, config["quantization"]
    if config["family"] == "dbrx":  # experts: ep as --moe_tp_mode says, tensor parallel over the rest
        assert (mapping["moe_ep_size"], mapping["moe_tp_size"]) == (expect.ep, expect.tp // expect.ep), mapping
    ranks = sorted(p.name for p in Path(expect.path).glob("rank*.safetensors"))
    assert ranks == [f"rank{r}.safetensors" for r in range(expect.tp * expect.pp)]


def check_line(expect: Expect, argv: list[str], code: int, out: str, err: str) -> None:
    """The line did what it is for, or failed with the one-line reason expected (text lines: check_text)."""
    if expect.kind in ("checkpoint", "engine"):
        assert code == 0, err
        check_artifact(expect, expect.kind)
        if argv[0] == "build" and "--max_batch_size" in argv:  # the README's limits are the engine's
            build = json.loads((Path(expect.path) / "config.json").read_text())["build"]
            assert (build["max_batch_size"], build["max_input_len"], build["max_seq_len"]) == (32, 1024, 1536)
    elif expect.kind == "quant":
        assert code == 2 and err.strip().splitlines()[-1] == f"kiln {argv[0]}: error: {expect.flags}: {QUANT_MESSAGE}"
    elif expect.kind == "missing":
        assert code == 2 and f"{Path(expect.path)} is not a directory" in err.splitlines()[-1], err
    elif expect.kind == "error":
        assert code == 2 and expect.flags in err.strip().splitlines()[-1], err
    elif expect.kind == "typo":
        assert code == 2 and f"unrecognized arguments: {expect.flags}" in err, err
    elif expect.kind == "summarize":  # ROUGE of the engine's summaries of the shipped set
        assert code == 0, err
        assert re.search(r"rouge1\b.*\d", out, re.S) and "rougeLsum" in out, out
    else:
        raise AssertionError(expect.kind)


def check_text(argv: list[str], code: int, out: str, err: str) -> str:
    """A run line printed its prompt and non-empty generated text (returned)."""
    assert code == 0, err
    prompt = argv[argv.index("--input_text") + 1] if "--input_text" in argv else \
        "Born in north-east France, Soyer trained as a"  # run.py's default prompt
    assert f'Input [Text 0]: "{prompt}"' in out, out
    generated = re.findall(r'^Output \[Text 0 Beam 0\]: "(.*)"$', out, re.M | re.S)
    assert generated and generated[0].strip(), out
    return generated[0]


@pytest.mark.parametrize("seed", [DBRX, MPT, BAICHUAN], ids=["dbrx", "mpt", "baichuan"])
def test_replay_readme(seed, tmp_path, monkeypatch, capsys):
    """Every line of one README, in order, in one directory (later lines read what earlier ones wrote)."""
    make_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    texts: dict[int, str] = {}
    for index, (line, expect) in enumerate(zip(read_commands()[seed], EXPECT[seed])):
        written, meant = FIXES.get((seed, index), ("", ""))
        argv = to_kiln(line.replace(written, meant) if written else line)
        code, out, err = run_line(argv, capsys)
        if expect.kind == "text":
            texts[index] = check_text(argv, code, out, err)
            if expect.same_text_as is not None:
                assert texts[index] == texts[expect.same_text_as]
        else:
            check_line(expect, argv, code, out, err)
        if (seed, index) in TYPO_FIXES:  # the line as meant, so that the README's next lines have its output
            wrong, right = TYPO_FIXES[(seed, index)]
            code, _, err = run_line(to_kiln(line.replace(wrong, right)), capsys)
            assert code == 0, err
