"""The Python API follows vLLM (issue 19): LLM takes a Hugging Face checkpoint and converts and builds it once into
a cache (a second call hits it), vLLM's argument names, SamplingParams fields and defaults, outputs shaped as
vLLM's (logprobs as {token_id: Logprob} per position, checked against the model's own logits from LLM.score),
vLLM's prompt shapes, and a vLLM-style script that runs with only its import line changed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kiln
from fixtures_api import tiny_hf_dir
from kiln.checkpoint.output_guard import MARKER
from kiln.config import ConfigError
from kiln.llm import RequestError
from kiln.one_step import OneStepOptions, cached_engine_dir
from kiln.outputs import Logprob

REPO = Path(__file__).resolve().parent.parent
GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("vllm_api") / "hf")


@pytest.fixture(scope="module")
def llm(hf_dir, tmp_path_factory):
    os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        with kiln.LLM(str(hf_dir), dtype="float32", device="cpu") as loaded:
            yield loaded
    finally:
        del os.environ["KILN_CACHE_DIR"]


# ----------------------------------------------------------------------------------------------- one step, cache
def test_one_step_builds_once_then_hits_the_cache(hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    first = kiln.LLM(str(hf_dir), dtype="float32", device="cpu")
    built = capsys.readouterr().err
    second = kiln.LLM(str(hf_dir), dtype="float32", device="cpu")
    hit = capsys.readouterr().err
    assert "converted and built" in built and str(first.engine_dir) in built
    assert hit.strip() == f"kiln: using the cached engine {first.engine_dir} for {hf_dir}"
    assert first.engine_dir == second.engine_dir and first.engine_dir.parent == tmp_path / "cache" / "engines"
    prompt = [3, 4, 5, 6]
    assert (first.generate([prompt], kiln.SamplingParams(**GREEDY))[0].outputs[0].token_ids
            == second.generate([prompt], kiln.SamplingParams(**GREEDY))[0].outputs[0].token_ids)


def test_cache_key_follows_options_and_files(hf_dir, tmp_path):
    base = cached_engine_dir(hf_dir, OneStepOptions(dtype="float32"), tmp_path)
    assert base == cached_engine_dir(hf_dir, OneStepOptions(dtype="float32"), tmp_path)
    assert base != cached_engine_dir(hf_dir, OneStepOptions(dtype="bfloat16"), tmp_path)
    assert base != cached_engine_dir(hf_dir, OneStepOptions(dtype="float32", tp_size=2), tmp_path)
    assert base != cached_engine_dir(hf_dir, OneStepOptions(dtype="float32", max_seq_len=32), tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in hf_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = sorted(copy.glob("*.safetensors"))[0]
    stat = weights.stat()
    key = cached_engine_dir(copy, OneStepOptions(), tmp_path)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # new weights, same size
    assert cached_engine_dir(copy, OneStepOptions(), tmp_path) != key


def test_one_step_equals_convert_build_run(hf_dir, llm, tmp_path):
    from kiln.cli.main import main as kiln_main

    assert kiln_main(["convert", "--model_dir", str(hf_dir), "--dtype", "float32", "--output_dir",
                      str(tmp_path / "ckpt")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "engine"),
                      "--no_tune"]) == 0
    with kiln.LLM(str(tmp_path / "engine"), device="cpu") as explicit:
        want = explicit.generate(["The quick brown fox"], kiln.SamplingParams(**GREEDY))[0].outputs[0]
    got = llm.generate(["The quick brown fox"], kiln.SamplingParams(**GREEDY))[0].outputs[0]
    assert (got.token_ids, got.text) == (want.token_ids, want.text)


def test_interrupted_one_step_leaves_no_entry(hf_dir, tmp_path, monkeypatch):
    import kiln.build

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(kiln.build, "copy_tokenizer_files", interrupted)  # inside the atomic write of the entry
        with pytest.raises(KeyboardInterrupt):
            kiln.LLM(str(hf_dir), device="cpu")
    engines = tmp_path / "cache" / "engines"
    assert list(engines.iterdir()) == []  # no entry, no temporary left over
    # A one-step killed outright (no cleanup ran) leaves its checkpoint folder: the next one-step removes it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = engines / f".hf-0-checkpoint.tmp-{dead.pid}"
    left.mkdir()
    (left / MARKER).write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}"}}')
    assert kiln.LLM(str(hf_dir), device="cpu").engine_dir.is_dir()
    assert not left.exists() and len(list(engines.iterdir())) == 1


def test_vllm_build_options_reach_the_engine(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    built = kiln.LLM(str(hf_dir), max_model_len=40, max_num_seqs=3, max_num_batched_tokens=64, block_size=8,
                     device="cpu")
    b = built.build
    assert (b.max_seq_len, b.max_input_len, b.max_batch_size, b.max_num_tokens, b.kv_block_size) == (40, 39, 3, 64, 8)
    assert kiln.LLM(str(hf_dir), device="cpu").build.max_input_len == 63  # vLLM: prompts up to the context - 1
    with pytest.raises(ConfigError, match="block_size=16, but the engine"):
        kiln.LLM(str(built.engine_dir), block_size=16, device="cpu")


def test_engine_options_must_match(llm):
    with pytest.raises(ConfigError, match="tensor_parallel_size=2, but the engine"):
        kiln.LLM(str(llm.engine_dir), tensor_parallel_size=2, device="cpu")
    with pytest.raises(ConfigError, match="never downloads"):
        kiln.LLM("facebook/opt-125m-not-here")
    with pytest.raises(ConfigError, match="dtype='int3'"):
        kiln.LLM(str(llm.engine_dir), dtype="int3")


# ---------------------------------------------------------------------------------------------- SamplingParams
def test_sampling_params_has_vllms_fields_and_defaults():
    p = kiln.SamplingParams(stop=None, stop_token_ids=None, bad_words=None)
    vllm_defaults = dict(n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, temperature=1.0,
                         top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[], stop_token_ids=[], ignore_eos=False,
                         max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None, detokenize=True,
                         skip_special_tokens=True, spaces_between_special_tokens=True, include_stop_str_in_output=False,
                         truncate_prompt_tokens=None, logit_bias=None)
    assert {k: getattr(p, k) for k in vllm_defaults} == vllm_defaults
    assert kiln.SamplingParams(logit_bias={"7": 2}).logit_bias == {7: 2.0}  # OpenAI JSON spells ids as strings
    for bad, name in [({"prompt_logprobs": -1}, "prompt_logprobs"), ({"truncate_prompt_tokens": 0}, "truncate"),
                      ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {1: float("nan")}}, "logit_bias"),
                      ({"skip_special_tokens": "yes"}, "skip_special_tokens")]:
        with pytest.raises(ValueError, match=name):
            kiln.SamplingParams(**bad)


# --------------------------------------------------------------------------------------------------- outputs
def test_logprobs_are_vllm_shaped_and_match_the_models_logits(llm):
    prompt = llm.encode("The quick brown fox")
    out = llm.generate([prompt], kiln.SamplingParams(logprobs=3, **GREEDY))[0]
    done = out.outputs[0]
    assert len(done.logprobs) == len(done.token_ids) == 6
    for step, (token, entry) in enumerate(zip(done.token_ids, done.logprobs)):
        ref = torch.log_softmax(llm.score(prompt + done.token_ids[:step])[-1].double(), dim=-1)
        assert list(entry)[0] == token and entry[token].rank == 1  # greedy: the chosen token is the most likely
        top = ref.topk(3).indices.tolist()
        assert sorted(entry) == sorted(set([token] + top))
        for tid, lp in entry.items():
            assert isinstance(lp, Logprob) and lp.logprob == pytest.approx(ref[tid].item(), abs=1e-4)
            assert lp.decoded_token == llm.tokenizer.decode([tid], skip_special_tokens=False)
        assert [entry[t].rank for t in top] == [1, 2, 3]
    assert done.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(done.token_ids, done.logprobs)))
    plain = llm.generate([prompt], kiln.SamplingParams(**GREEDY))[0].outputs[0]
    assert plain.logprobs is None and plain.token_logprobs == pytest.approx(done.token_logprobs)


def test_sampled_tokens_outside_the_top_k_get_their_rank_in_the_whole_vocabulary(llm):
    """A sampled token that is not among the `logprobs` most likely still has its rank: 1 + the tokens the model
    scored strictly higher (vLLM's count), checked against the model's own logits."""
    prompt = llm.encode("The quick brown fox")
    params = kiln.SamplingParams(logprobs=1, temperature=5.0, max_tokens=12, seed=3, ignore_eos=True)
    done = llm.generate([prompt], params)[0].outputs[0]
    outside = 0
    for step, (token, entry) in enumerate(zip(done.token_ids, done.logprobs)):
        logits = llm.score(prompt + done.token_ids[:step])[-1].float()
        want = int((logits > logits[token]).sum()) + 1
        assert entry[token].rank == want
        outside += want > 1
    assert outside > 0  # the hot sampling left the top token at least once: the ranks above were not all 1


def test_prompt_logprobs_match_the_models_logits(llm):
    prompt = llm.encode("Large language models predict")
    out = llm.generate([{"prompt_token_ids": prompt}], kiln.SamplingParams(prompt_logprobs=2, max_tokens=1))[0]
    ref = torch.log_softmax(llm.score(prompt).double(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [entry[t].rank for t in ref[pos - 1].topk(2).indices.tolist()] == [1, 2]
        assert entry[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1


def test_logit_bias_steers_the_choice(llm):
    prompt = [3, 4, 5]
    plain = llm.generate([prompt], kiln.SamplingParams(**GREEDY))[0].outputs[0].token_ids
    target = next(t for t in range(10, 500) if t not in plain)
    biased = llm.generate([prompt], kiln.SamplingParams(logit_bias={target: 100.0}, **GREEDY))[0].outputs[0]
    assert biased.token_ids == [target] * 6
    with pytest.raises(RequestError, match="logit_bias token 512 is outside"):
        llm.generate([prompt], kiln.SamplingParams(logit_bias={512: 1.0}))


def test_stop_reason_finish_reason_and_truncation(llm):
    prompt = llm.encode("Hello, my name is")
    free = llm.generate([prompt], kiln.SamplingParams(**GREEDY))[0].outputs[0]
    assert (free.finish_reason, free.stop_reason) == ("length", None)
    assert free.text == " is is is,,,"  # the tiny model's greedy text, which the stops below cut
    stop_id = free.token_ids[3]
    by_id = llm.generate([prompt], kiln.SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_id]))
    first = free.token_ids.index(stop_id)
    assert by_id[0].outputs[0].token_ids == free.token_ids[:first + 1]
    assert (by_id[0].outputs[0].finish_reason, by_id[0].outputs[0].stop_reason) == ("stop", stop_id)
    by_text = llm.generate([prompt], kiln.SamplingParams(temperature=0, max_tokens=6, stop=["s i"]))[0].outputs[0]
    assert (by_text.finish_reason, by_text.stop_reason, by_text.text) == ("stop", "s i", " i")
    cut = llm.generate([prompt], kiln.SamplingParams(truncate_prompt_tokens=2, **GREEDY))[0]
    assert cut.prompt_token_ids == prompt[-2:]
    assert cut.outputs[0].token_ids == llm.generate([prompt[-2:]], kiln.SamplingParams(**GREEDY))[0].outputs[0].token_ids


def test_prompt_shapes(llm):
    text = "The quick brown fox"
    ids = llm.encode(text)
    p = kiln.SamplingParams(**GREEDY)
    outs = llm.generate([text, ids, {"prompt": text}, {"prompt_token_ids": ids}], p, use_tqdm=True)
    assert [o.prompt for o in outs] == [text, None, text, None]
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.prompt_token_ids for o in llm.generate(ids, p)] == [ids]  # one flat id list is one prompt
    assert [o.prompt for o in llm.generate({"prompt": text}, p)] == [text]
    batch = llm.get_tokenizer()([text, "hello"])  # a transformers BatchEncoding, passed as it is
    with pytest.raises(RequestError, match=r"BatchEncoding: pass the texts themselves"):
        llm.generate(batch, p)
    with pytest.raises(RequestError, match="prompt 1 is a mapping with keys \\['text'\\]"):
        llm.generate([text, {"text": text}], p)
    with pytest.raises(RequestError, match="tolist"):
        llm.generate(torch.tensor(ids), p)


def test_get_tokenizer_and_special_tokens(llm):
    import transformers

    tok = llm.get_tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    p = dict(max_tokens=2, temperature=0, ignore_eos=True, logit_bias={im_start: 100.0})
    skipped = llm.generate([[3, 4]], kiln.SamplingParams(**p))[0].outputs[0]
    kept = llm.generate([[3, 4]], kiln.SamplingParams(skip_special_tokens=False, **p))[0].outputs[0]
    assert skipped.text == "" and kept.text == "<|im_start|>" * 2
    assert llm.generate([[3, 4]], kiln.SamplingParams(detokenize=False, **GREEDY))[0].outputs[0].text == ""


# ------------------------------------------------------------------------------------- a vLLM script, unchanged
VLLM_SCRIPT = '''
from vllm import LLM, RequestOutput, SamplingParams

prompts = ["Hello, my name is", "The capital of France is"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
llm = LLM(model="facebook/opt-125m", dtype="float32", tensor_parallel_size=1, gpu_memory_utilization=0.5,
          enforce_eager=True, seed=0, trust_remote_code=True, max_model_len=64)
outputs = llm.generate(prompts, sampling_params)
assert all(isinstance(output, RequestOutput) for output in outputs)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")

greedy = SamplingParams(temperature=0, max_tokens=4, logprobs=2, stop_token_ids=[0])
for output in llm.generate([{"prompt": "Hello"}, {"prompt_token_ids": [5, 6, 7]}], greedy):
    completion = output.outputs[0]
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        print(token_id, position[token_id].logprob, position[token_id].decoded_token)
    print(completion.finish_reason, completion.cumulative_logprob, len(output.prompt_token_ids))
tokenizer = llm.get_tokenizer()
print(tokenizer.decode(outputs[0].outputs[0].token_ids) == outputs[0].outputs[0].text)
'''


def test_a_vllm_script_runs_with_only_the_import_changed(hf_dir, tmp_path):
    work = tmp_path / "work"
    (work / "facebook").mkdir(parents=True)
    (work / "facebook" / "opt-125m").symlink_to(hf_dir)  # the model name the script uses, as a local directory
    script = work / "script.py"
    script.write_text(VLLM_SCRIPT.replace("from vllm import", "from kiln import"))
    env = dict(os.environ, PYTHONPATH=str(REPO), KILN_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("Prompt: 'Hello, my name is', Generated text: ")
    assert lines[1].startswith("Prompt: 'The capital of France is', Generated text: ")
    assert lines[-1] == "True"
    assert "converted and built" in run.stderr


def test_llm_seed_makes_unseeded_sampling_repeat(llm):
    sampled = kiln.SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = []
    for _ in range(2):
        again = kiln.LLM(str(llm.engine_dir), seed=123, device="cpu")
        runs.append([o.outputs[0].token_ids for o in again.generate(["Hello", "The quick"], sampled)])
    assert runs[0] == runs[1]


def test_one_step_tensor_parallel_matches_one_rank(hf_dir, llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    params = kiln.SamplingParams(**GREEDY)
    prompts = ["Hello, my name is", "The quick brown fox"]
    with kiln.LLM(str(hf_dir), dtype="float32", tensor_parallel_size=2, device="cpu") as tp2:
        assert tp2.info.mapping.tp_size == 2
        got = [o.outputs[0].token_ids for o in tp2.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_outputs_on_the_gpu_match_the_cpu(hf_dir, llm, tmp_path, monkeypatch):
    """logprobs, prompt_logprobs and logit_bias through the CUDA path (Triton kernels, graphs, async scheduling)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    params = kiln.SamplingParams(logprobs=2, prompt_logprobs=2, logit_bias={7: 0.5}, **GREEDY)
    with kiln.LLM(str(hf_dir), dtype="float32", device="cuda") as gpu:
        got = gpu.generate(["Hello, my name is"], params)[0]
    want = llm.generate(["Hello, my name is"], params)[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    for g, w in zip(got.outputs[0].logprobs + got.prompt_logprobs[1:], want.outputs[0].logprobs + want.prompt_logprobs[1:]):
        assert set(g) == set(w)
        for tid in g:
            assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=1e-3) and g[tid].rank == w[tid].rank


def test_use_tqdm_shows_finished_prompts_on_a_terminal(llm, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    shown = Terminal()
    monkeypatch.setattr(sys, "stderr", shown)
    llm.generate(["Hello", "The quick"], kiln.SamplingParams(**GREEDY))
    assert "Processed prompts" in shown.getvalue() and "2/2" in shown.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    llm.generate(["Hello"], kiln.SamplingParams(**GREEDY), use_tqdm=False)
    assert quiet.getvalue() == ""
