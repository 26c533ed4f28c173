"""End-to-end generation timing of a kiln engine (a first measurement before `kiln bench` exists).

    python benchmarks/bench_decode.py --engine_dir E --batch_size 1 32 --input_len 128 --output_len 128 \
        [--backend triton] [--compare_hf] [--hf_model_dir D]

Prints prefill time, decode ms per step, tokens/s, and the decode floor (weight bytes / measured copy bandwidth)
with the fraction reached. Prompts are random token ids; outputs ignore end tokens so every step is counted."""

from __future__ import annotations

import argparse
import time

import torch

import kiln


def copy_bandwidth_gbs() -> float:
    """HBM bandwidth from a device-to-device copy of 1 GiB: bytes read + written per second. Decode reads each
    weight once, so its floor is weight bytes over this rate."""
    x = torch.empty(256 * 1024**2, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - start) / 1e9


def time_case(llm: kiln.LLM, batch: int, input_len: int, output_len: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) for one batch of equal-length random prompts."""
    gen = torch.Generator().manual_seed(batch)
    vocab = llm.info.model.vocab_size
    prompts = [torch.randint(1, vocab, (input_len,), generator=gen).tolist() for _ in range(batch)]
    params = kiln.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, kiln.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm up
    llm.engine.scheduler.block_manager.reset_prefix_cache()
    torch.cuda.synchronize()
    start, first, count = time.perf_counter(), None, 0
    for _ in llm.stream(prompts, params):
        count += 1
        if count == batch:
            torch.cuda.synchronize()
            first = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return first - start, (end - first) / (output_len - 1)


def hf_model(llm: kiln.LLM):
    """transformers' model of the same family and shapes (random weights: speed does not depend on values)."""
    from transformers import DbrxConfig, DbrxForCausalLM, MptConfig, MptForCausalLM

    m = llm.info.model
    if m.family == "mpt":
        cfg = MptConfig(d_model=m.hidden_size, n_heads=m.num_attention_heads, n_layers=m.num_hidden_layers,
                        expansion_ratio=m.intermediate_size // m.hidden_size, max_seq_len=m.max_position_embeddings,
                        vocab_size=m.vocab_size, no_bias=not m.linear_bias)
        with torch.device("cuda"):
            return MptForCausalLM(cfg).to(m.torch_dtype).eval()
    if m.family != "dbrx":
        raise SystemExit(f"--compare_hf knows dbrx and mpt, not {m.family}")
    cfg = DbrxConfig(d_model=m.hidden_size, n_heads=m.num_attention_heads, n_layers=m.num_hidden_layers,
                     max_seq_len=m.max_position_embeddings, vocab_size=m.vocab_size,
                     attn_config={"clip_qkv": m.clip_qkv, "kv_n_heads": m.num_key_value_heads,
                                  "rope_theta": m.rotary_base},
                     ffn_config={"ffn_hidden_size": m.intermediate_size, "moe_num_experts": m.moe_num_experts,
                                 "moe_top_k": m.moe_top_k})
    with torch.device("cuda"):
        model = DbrxForCausalLM(cfg).to(m.torch_dtype).eval()
    return model


def time_hf(model, batch: int, input_len: int, output_len: int) -> float:
    """transformers generate: seconds per decode step, (t(output_len) - t(1)) / (output_len - 1)."""
    ids = torch.randint(1, model.config.vocab_size, (batch, input_len), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)
    return (run(output_len) - run(1)) / (output_len - 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine_dir", required=True)
    p.add_argument("--batch_size", type=int, nargs="+", default=[1, 32])
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=128)
    p.add_argument("--backend", default="triton")
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.3,
                   help="leave room for the transformers model of --compare_hf")
    p.add_argument("--compare_hf", action="store_true", help="time transformers' generate at the same shapes")
    args = p.parse_args()
    llm = kiln.LLM(args.engine_dir, device="cuda", kernel_backend=args.backend,
                   kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction)
    bw = copy_bandwidth_gbs()
    plan = llm.runner.plan
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s; "
          f"weights {plan.weight_bytes / 1e9:.2f} GB; backend {args.backend}")
    hf = hf_model(llm) if args.compare_hf else None
    for batch in args.batch_size:
        prefill, step = time_case(llm, batch, args.input_len, args.output_len)
        floor = plan.weight_bytes / (bw * 1e9)
        line = (f"batch {batch:3d}: prefill {prefill * 1e3:8.1f} ms, decode {step * 1e3:7.2f} ms/step, "
                f"{batch / step:8.1f} tok/s; floor (all weights) {floor * 1e3:.2f} ms/step, "
                f"{100 * floor / step:5.1f}% of floor")
        if hf is not None:
            hf_step = time_hf(hf, batch, args.input_len, args.output_len)
            line += f"; transformers {hf_step * 1e3:.2f} ms/step ({batch / hf_step:.1f} tok/s), kiln/hf {hf_step / step:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
