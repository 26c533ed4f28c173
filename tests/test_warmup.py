"""The warm-up kiln serve runs on a GPU before it is ready (kiln/engine/warmup.py): one prefill step of every token
bucket up to the engine's max_num_tokens, then nothing left behind (no sequence, no used or cached block, no
prefix-cache counts), and generation afterwards unchanged. Run here on the CPU, where it compiles nothing but takes
the same steps."""

from __future__ import annotations

import pytest

import kiln
from fixtures_serve import MPT_BOOKS
from kiln.cli.main import main as kiln_main
from kiln.engine.warmup import warm_up, warm_up_prompts

MAX_BATCH, MAX_INPUT_LEN, MAX_NUM_TOKENS = 4, 48, 160


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("warmup")
    assert kiln_main(["convert", "--model_dir", str(MPT_BOOKS), "--output_dir", str(root / "ckpt"), "--dtype",
                      "float32"]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(root / "engine"),
                      "--max_batch_size", str(MAX_BATCH), "--max_input_len", str(MAX_INPUT_LEN), "--max_seq_len",
                      "64", "--max_num_tokens", str(MAX_NUM_TOKENS)]) == 0
    return root / "engine"


def test_prompts_cover_the_tokens_within_the_limits():
    prompts = warm_up_prompts(100, 48, 4, vocab_size=1000, first_id=990)
    assert [len(p) for p in prompts] == [48, 48, 4]
    ids = [t for p in prompts for t in p]
    assert len(set(ids)) == 100 and all(0 <= t < 1000 for t in ids)  # distinct: no prefix-cache hit between them
    assert prompts[0][:11] == list(range(990, 1000)) + [0]
    # More tokens than max_batch_size prompts hold: capped at the batch.
    assert [len(p) for p in warm_up_prompts(300, 48, 4, 1000, 0)] == [48, 48, 48, 48]


def test_one_step_per_bucket_and_nothing_left_behind(engine):
    llm = kiln.LLM(engine, device="cpu")
    prompt = [[5, 17, 33, 2, 99, 150, 7, 8, 9]]
    params = kiln.SamplingParams(max_tokens=12, temperature=0.0)
    before = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    steps: list[int] = []
    launch = llm.engine.executor.launch

    def counted(output, feed=None):
        steps.append(sum(item.num_new_tokens for item in output.scheduled))
        return launch(output, feed)

    llm.engine.executor.launch = counted
    sizes = warm_up(llm)
    llm.engine.executor.launch = launch
    # 1, 2, 4, ..., 128, then 160 (the engine's max_num_tokens caps bucket 256): each one prefill step of that size.
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, MAX_NUM_TOKENS]
    assert steps == sizes
    blocks = llm.engine.scheduler.block_manager
    assert not llm.engine.has_unfinished()
    assert blocks.num_free_blocks == blocks.num_blocks and blocks.num_cached_blocks == 0
    assert blocks.num_prefix_hit_tokens == 0 and blocks.num_prefix_query_tokens == 0
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == before


def test_a_kv_cache_smaller_than_a_step_caps_the_warm_up(engine):
    llm = kiln.LLM(engine, device="cpu", kv_cache_max_tokens=96)
    blocks = llm.engine.scheduler.block_manager
    room = (blocks.num_blocks - MAX_BATCH) * blocks.block_size
    assert room < MAX_NUM_TOKENS  # the case: the cache cannot hold the engine's largest step
    sizes = warm_up(llm)
    assert sizes and max(sizes) == room and sizes == sorted(set(sizes))
    assert blocks.num_free_blocks == blocks.num_blocks and not llm.engine.has_unfinished()
