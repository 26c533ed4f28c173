"""Time kiln's Triton kernels against torch at DBRX and MPT-7B shapes on a GPU; print bandwidth / TFLOPs.

    python benchmarks/bench_kernels.py [--only kv,attn,moe,moe_w8a8,gemv] [--tune] [--attn_sweep]

Every row gives the Triton time, the torch time (the reference, or torch's own fused op where the reference is a
Python loop), their ratio, and the achieved rate against the memory-copy bandwidth measured here first. Inputs are
random (never zeros); times are CUDA-event medians from triton.testing.do_bench."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

from kiln.kernels import reference
from kiln.kernels.triton_ops import fused_moe, paged_attention, tune_fused_moe, write_kv_cache

DTYPE = torch.bfloat16
ROWS: list[str] = []


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def row(name: str, ms: float, torch_ms: float | None, nbytes: float = 0.0, flops: float = 0.0, peak_bw=1.0) -> None:
    gbs = nbytes / ms / 1e6
    tflops = flops / ms / 1e9
    ratio = f"{torch_ms / ms:6.2f}x" if torch_ms else "   -   "
    torch_txt = f"{torch_ms:9.4f}" if torch_ms else "        -"
    text = (f"{name:44s} {ms:9.4f} {torch_txt} {ratio}  {gbs:8.1f} GB/s ({100 * gbs / peak_bw:5.1f}% of copy)"
            f"  {tflops:7.1f} TFLOP/s")
    ROWS.append(text)
    print(text, flush=True)


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    src = torch.randn(256 * 1024 * 1024 // 2, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_kv_write(peak: float) -> None:
    for name, tokens, kv_heads in (("dbrx", 2048, 8), ("dbrx", 64, 8), ("mpt7b", 2048, 32), ("mpt7b", 64, 32)):
        key = torch.randn(tokens, kv_heads, 128, dtype=DTYPE, device="cuda")
        value = torch.randn_like(key)
        blocks = 4096
        k_cache = torch.randn(blocks, 16, kv_heads, 128, dtype=DTYPE, device="cuda")
        v_cache = torch.randn_like(k_cache)
        slots = torch.randperm(blocks * 16, device="cuda")[:tokens]
        nbytes = 4 * key.numel() * key.element_size()  # k and v, read once and written once
        ms = bench(lambda: write_kv_cache(key, value, k_cache, v_cache, slots))
        ref = bench(lambda: reference.write_kv_cache(key, value, k_cache, v_cache, slots))
        row(f"kv_write {name} tokens={tokens}", ms, ref, nbytes, peak_bw=peak)


def paged_inputs(batch: int, q_len: int, ctx: int, heads: int, kv_heads: int):
    blocks_per_seq = -(-ctx // 16)
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1).to(torch.int32)
    k_cache = torch.randn(batch * blocks_per_seq, 16, kv_heads, 128, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(batch * q_len, heads, 128, dtype=DTYPE, device="cuda")
    starts = (torch.arange(batch + 1, device="cuda") * q_len).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, tables, starts, lens


def sdpa_equivalent(query, k_cache, v_cache, tables, batch, q_len, ctx, heads, alibi):
    """torch's fused attention on the same K/V gathered contiguous beforehand (no paging; ALiBi as a float mask)."""
    kv_heads = k_cache.shape[2]
    k = k_cache[tables.long()].reshape(batch, -1, kv_heads, 128)[:, :ctx].transpose(1, 2)
    v = v_cache[tables.long()].reshape(batch, -1, kv_heads, 128)[:, :ctx].transpose(1, 2)
    q = query.view(batch, q_len, heads, 128).transpose(1, 2)
    mask = None
    if alibi is not None:
        pos = torch.arange(ctx, device="cuda")
        q_pos = pos[ctx - q_len:]
        bias = alibi[:, None, None] * (pos[None, None, :] - q_pos[None, :, None]).float()
        mask = bias.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf")).to(DTYPE)[None]
    causal = mask is None and q_len > 1
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=kv_heads != heads)


ATTN_MODELS = {"mpt7b": (32, 32, True), "dbrx": (48, 8, False)}  # heads, kv heads, ALiBi; head_dim 128
ATTN_DECODE = [(b, c) for b in (1, 8, 32) for c in (160, 512, 2048, 4096)]  # (batch, context)
ATTN_PREFILL = [(1, 2048, 2048), (4, 512, 512)]  # (batch, new tokens, context)


def bench_graph(fn) -> float:
    """Mean milliseconds of one fn() call replayed in a CUDA graph (as the engine runs its decode steps)."""
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def attn_candidates(base):
    """Tile and split choices a tuning session tries per decode case (`--attn_sweep`)."""
    from dataclasses import replace

    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3):
                keys = max(block_n, base.keys_per_split // block_n * block_n)
                yield replace(base, block_n=block_n, num_warps=warps, num_stages=stages, keys_per_split=keys)
    for keys in (128, 512, 1024):
        yield replace(base, keys_per_split=max(keys, base.block_n) // base.block_n * base.block_n)


def bench_attention(peak: float, sweep: bool = False) -> None:
    """Decode as the engine launches it (max_query_len 1, the graph's context bound max(2048, ctx)), eager and
    replayed in a graph, against SDPA on pre-gathered K/V; then prefill. With sweep, every candidate config per
    decode case in a graph, and the best printed as a table entry for triton_attention._TUNED_CONFIGS."""
    from kiln.kernels import triton_attention as ta

    for model, (heads, kv_heads, use_alibi) in ATTN_MODELS.items():
        slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], device="cuda")
        alibi = slopes if use_alibi else None
        for batch, ctx in ATTN_DECODE:
            bound = max(2048, ctx)
            query, k_cache, v_cache, tables, starts, lens = paged_inputs(batch, 1, bound, heads, kv_heads)
            lens.fill_(ctx)

            def fn(config=None):
                return paged_attention(query, k_cache, v_cache, tables, starts, lens, 128**-0.5, alibi,
                                       max_query_len=1, max_seq_len=bound, config=config)

            key = ta.attention_key(True, 128, heads // kv_heads, batch, bound)
            chosen = ta.attention_config(True, 128, heads // kv_heads, batch, bound)
            splits = ta.choose_num_splits(batch * kv_heads, bound, query.device, True, chosen.keys_per_split,
                                          chosen.max_splits)
            torch_ms = bench(sdpa_equivalent(query, k_cache, v_cache, tables, batch, 1, ctx, heads, alibi))
            kv_bytes = 2 * batch * ctx * kv_heads * 128 * 2
            name = f"attn {model} decode b={batch} ctx={ctx}"
            row(f"{name} eager", bench(fn), torch_ms, kv_bytes, 0.0, peak)
            row(f"{name} graph [{splits} splits]", bench_graph(fn), torch_ms, kv_bytes, 0.0, peak)
            if sweep:
                timed = [(bench_graph(lambda c=c: fn(c)), c) for c in attn_candidates(chosen)]
                best_ms, best = min(timed, key=lambda t: t[0])
                print(f"    best {best_ms:.4f} ms ({100 * kv_bytes / best_ms / 1e6 / peak:.1f}% of copy): {key}: {best}")
        for batch, q_len, ctx in ATTN_PREFILL:
            query, k_cache, v_cache, tables, starts, lens = paged_inputs(batch, q_len, ctx, heads, kv_heads)
            ms = bench(lambda: paged_attention(query, k_cache, v_cache, tables, starts, lens, 128**-0.5, alibi))
            torch_ms = bench(sdpa_equivalent(query, k_cache, v_cache, tables, batch, q_len, ctx, heads, alibi))
            kv_bytes = 2 * batch * ctx * kv_heads * 128 * 2
            flops = 4 * batch * (q_len * ctx - q_len * (q_len - 1) / 2) * heads * 128
            row(f"attn {model} prefill b={batch} q={q_len} ctx={ctx}", ms, torch_ms, kv_bytes, flops, peak)


def bench_moe(peak: float, tune: bool) -> None:
    size, ffn, experts, top_k = 6144, 10752, 16, 4  # DBRX, one GPU holding every expert
    w13 = torch.randn(experts, 2 * ffn, size, dtype=DTYPE, device="cuda") * size**-0.5
    w2 = torch.randn(experts, size, ffn, dtype=DTYPE, device="cuda") * ffn**-0.5
    for tokens in (1, 8, 64, 256, 2048):
        hidden = torch.randn(tokens, size, dtype=DTYPE, device="cuda")
        weights, ids = torch.softmax(torch.randn(tokens, experts, device="cuda"), -1).topk(top_k, dim=-1)
        config = tune_fused_moe(tokens, size, ffn, experts, top_k, DTYPE) if tune else None
        ms = bench(lambda: fused_moe(hidden, w13, w2, weights, ids, config=config))
        ref = bench(lambda: reference.fused_moe(hidden, w13, w2, weights, ids))
        active = torch.unique(ids).numel()
        nbytes = active * 3 * ffn * size * 2 + 2 * hidden.numel() * 2
        flops = 2 * tokens * top_k * 3 * ffn * size
        row(f"moe dbrx tokens={tokens} ({active} experts){' tuned' if tune else ''}", ms, ref, nbytes, flops, peak)
        if tune:
            print(f"    config: {config}")


def bench_moe_w8a8(peak: float) -> None:
    """The W8A8 fused MoE (SmoothQuant INT8 per token and static, FP8 per tensor static and per channel/token) at
    DBRX's full expert width on one GPU, each beside the bf16 fused MoE at the same routing (the "torch ms" column
    holds the bf16 Triton time, so the ratio is the speedup over bf16); bytes are the 8-bit weights read."""
    from kiln.kernels.triton_moe_w8a8 import fused_moe_fp8, fused_moe_sq
    from kiln.quant import fp8

    size, ffn, experts, top_k = 6144, 10752, 16, 4
    w13 = torch.randn(experts, 2 * ffn, size, dtype=DTYPE, device="cuda") * size**-0.5
    w2 = torch.randn(experts, size, ffn, dtype=DTYPE, device="cuda") * ffn**-0.5
    q13 = torch.randint(-127, 128, w13.shape, dtype=torch.int8, device="cuda")
    q2 = torch.randint(-127, 128, w2.shape, dtype=torch.int8, device="cuda")
    s13 = torch.full(w13.shape[:2], size**-0.5 / 127, dtype=DTYPE, device="cuda")
    s2 = torch.full(w2.shape[:2], ffn**-0.5 / 127, dtype=DTYPE, device="cuda")
    smoother = torch.ones(experts, ffn, dtype=DTYPE, device="cuda")
    a13, a2 = torch.tensor([4 / 127], dtype=DTYPE, device="cuda"), torch.full((experts,), 1 / 127, device="cuda")
    f13, f2 = (q13.float() / 127 * 448).to(fp8.FP8_DTYPE), (q2.float() / 127 * 448).to(fp8.FP8_DTYPE)
    t13, t2 = torch.full((experts, 1), 1e-4, device="cuda"), torch.full((experts, 1), 1e-4, device="cuda")
    c13, c2 = s13.float() / 448 * 127, s2.float() / 448 * 127
    in_scale = torch.tensor([4 / 448], device="cuda")
    for tokens in (1, 8, 64, 256, 2048):
        hidden = torch.randn(tokens, size, dtype=DTYPE, device="cuda")
        weights, ids = torch.softmax(torch.randn(tokens, experts, device="cuda"), -1).topk(top_k, dim=-1)
        bf16 = bench(lambda: fused_moe(hidden, w13, w2, weights, ids))
        active = torch.unique(ids).numel()
        nbytes = active * 3 * ffn * size + 2 * hidden.numel() * 2
        flops = 2 * tokens * top_k * 3 * ffn * size
        cases = {"sq per-token": lambda: fused_moe_sq(hidden, q13, s13, None, q2, s2, None, smoother, weights, ids, 0),
                 "sq static": lambda: fused_moe_sq(hidden, q13, s13, a13, q2, s2, a2, smoother, weights, ids, 0)}
        if torch.cuda.get_device_capability() >= (8, 9):
            cases["fp8 static"] = lambda: fused_moe_fp8(hidden, f13, t13, f2, t2, in_scale, weights, ids, 0)
            cases["fp8 pc/pt"] = lambda: fused_moe_fp8(hidden, f13, c13, f2, c2, None, weights, ids, 0)
        print(f"moe dbrx bf16 tokens={tokens}: {bf16:.4f} ms")
        for name, fn in cases.items():
            row(f"moe_w8a8 {name} tokens={tokens} ({active} exp)", bench(fn), bf16, nbytes, flops, peak)


# Decode weight shapes (N, K) at one GPU: MPT-7B qkv, o, up, down, LM head; Baichuan2-13B W_pack, o, gate_up, down;
# the 10240x5120 of the brief; DBRX qkv and o.
GEMV_SHAPES = {
    "mpt7b": [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384), (50432, 4096)],
    "baichuan2-13b": [(15360, 5120), (5120, 5120), (27392, 5120), (5120, 13696), (10240, 5120)],
    "dbrx": [(8192, 6144), (6144, 6144)],
}


def bench_gemv(peak: float, rows_list=(1, 2, 4, 8, 16)) -> None:
    """The build's choice, measured: per decode shape and row count, the fastest Triton GEMV config (the build's
    candidates, timed as the build times them) against cuBLAS (F.linear), each as GB/s of weight + activations
    against the copy bandwidth. "won" marks where the build would pick Triton (by its 3% margin)."""
    from kiln.kernels.triton_gemv import tune_gemv

    for model, shapes in GEMV_SHAPES.items():
        for n, k in shapes:
            weight = torch.randn(n, k, dtype=DTYPE, device="cuda") * k**-0.5
            for rows in rows_list:
                timing = tune_gemv(rows, weight)
                nbytes = (n * k + rows * k + rows * n) * weight.element_size()
                cublas_pct = 100 * nbytes / timing.cublas_ms / 1e6 / peak
                tag = "won" if timing.winner is not None else "cuBLAS kept"
                row(f"gemv {model} {n}x{k} rows={rows} [{tag}; cuBLAS {cublas_pct:4.1f}%]", timing.triton_ms,
                    timing.cublas_ms, nbytes, 2 * rows * n * k, peak)
                print(f"    best: {timing.best}")
            del weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="kv,attn,moe,gemv", help="comma list of kv, attn, moe, moe_w8a8, gemv")
    parser.add_argument("--tune", action="store_true", help="tune the MoE tiles per shape first")
    parser.add_argument("--attn_sweep", action="store_true",
                        help="time candidate decode attention configs per case (graph replay) and print the best")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    peak = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {peak:.0f} GB/s")
    print(f"{'case':44s} {'triton ms':>9s} {'torch ms':>9s} speedup")
    only = set(args.only.split(","))
    if "kv" in only:
        bench_kv_write(peak)
    if "attn" in only:
        bench_attention(peak, args.attn_sweep)
    if "moe" in only:
        bench_moe(peak, args.tune)
    if "moe_w8a8" in only:
        bench_moe_w8a8(peak)
    if "gemv" in only:
        bench_gemv(peak)
    print("\nsummary\n" + "\n".join(ROWS))


if __name__ == "__main__":
    main()
