"""Compile kiln's KV-cache write and paged attention with an INT8 and an FP8 cache for sm_90 (Hopper) without a GPU:
what the interpreter cannot check (types, bitcasts, conversions the GPU lowers). Run by
tests/test_kv_cache_quant_kernels.py in a process of its own (the tests' triton runs interpreted); prints one line
per compiled kernel."""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kiln.kernels.triton_kv_cache import _write_kv_kernel
from kiln.kernels.triton_attention_kernels import paged_attention_kernel

target = GPUTarget("cuda", 90, 32)
for cache in ("*i8", "*fp8e4nv"):
    sig = {"key_ptr": "*bf16", "value_ptr": "*bf16", "k_cache_ptr": cache, "v_cache_ptr": cache, "slot_ptr": "*i64",
           "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
           "stride_kcb": "i32", "stride_kcs": "i32", "stride_kch": "i32", "stride_vcb": "i32", "stride_vcs": "i32",
           "stride_vch": "i32", "width": "i32", "k_inv_ptr": "*fp32", "v_inv_ptr": "*fp32",
           "HEAD_DIM": "constexpr", "BLOCK_SIZE": "constexpr", "BLOCK": "constexpr", "QUANT": "constexpr",
           "QMAX": "constexpr", "IS_INT8": "constexpr"}
    const = {"HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK": 1024, "QUANT": True,
             "QMAX": 127.0 if cache == "*i8" else 448.0, "IS_INT8": cache == "*i8"}
    k = triton.compile(ASTSource(_write_kv_kernel, sig, const), target=target)
    print("write", cache, "ok", len(k.asm["ptx"]))
    args = ["q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr", "block_tables_ptr", "query_start_loc_ptr",
            "seq_lens_ptr", "alibi_ptr", "part_acc_ptr", "part_ml_ptr", "counters_ptr", "k_scale_ptr", "v_scale_ptr"]
    types = ["*bf16", cache, cache, "*bf16", "*i32", "*i32", "*i32", "*fp32", "*fp32", "*fp32", "*i32", "*fp32", "*fp32"]
    sig = dict(zip(args, types))
    for n in ["qk_scale"]:
        sig[n] = "fp32"
    for n in ["num_seqs", "num_tokens", "num_heads", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb",
              "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_bt"]:
        sig[n] = "i32"
    for splits in (1, 4):
        const = {"HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "GROUP": 1, "BLOCK_SIZE": 16, "BLOCK_M": 16, "BLOCK_Q": 16,
                 "BLOCK_N": 64, "NUM_SPLITS": splits, "KEYS_PER_SPLIT": 256, "FUSED_MERGE": True, "ONE_TILE": True,
                 "USE_ALIBI": True, "DOT_F32": False, "PRECISION": "tf32", "WHILE_LOOP": False, "QUANT_KV": True}
        for c in const:
            sig[c] = "constexpr"
        k = triton.compile(ASTSource(paged_attention_kernel, sig, const), target=target, options={"num_warps": 4, "num_stages": 3})
        print("attention", cache, "splits", splits, "ok", len(k.asm["ptx"]))
