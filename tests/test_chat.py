"""Chat: `kiln run --chat` and `LLM.chat` format prompts with the tokenizer's chat format and stop on its end ids."""

from __future__ import annotations

import json

import kiln
from fixtures_dbrx import make_dbrx_checkpoint
from fixtures_tokenizers import build_neox_tokenizer_dir
from kiln.cli.main import main as kiln_main
from test_dbrx import convert_build, hf_greedy


def test_chat_uses_chat_template_and_matches_reference(tmp_path):
    model_dir, hf, _ = make_dbrx_checkpoint(tmp_path, seed=4, vocab_size=512)
    tok_dir = build_neox_tokenizer_dir(tmp_path / "tok", chat_template=True, generation_eos=[0, 401])
    engine = convert_build(tmp_path, model_dir)
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    expected_prompt = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected_prompt, "keys"):  # transformers 5 returns a BatchEncoding
        expected_prompt = expected_prompt["input_ids"]

    llm = kiln.LLM(engine, tokenizer_dir=tok_dir)
    out = llm.chat(messages, kiln.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids == list(expected_prompt)
    assert out.outputs[0].token_ids == hf_greedy(hf, list(expected_prompt), 12)
    assert llm.stop_ids(kiln.SamplingParams()) >= {0, 401}  # generation_config.json's end ids

    out_json = tmp_path / "chat.json"
    assert kiln_main(["run", "--engine_dir", str(engine), "--tokenizer_dir", str(tok_dir), "--chat",
                      "--system_prompt", "be brief", "--input_text", "hello world", "--max_output_len", "12",
                      "--ignore_eos", "--output_json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())[0]
    assert result["input_ids"] == list(expected_prompt)
    assert result["output_ids"][0] == out.outputs[0].token_ids
