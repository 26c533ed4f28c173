"""convert holds a few tensors at a time, not the model: peak anonymous memory stays near the largest tensor."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from fixtures_dbrx import dbrx_published_config

MiB = 1024**2

# Runs in a fresh process: samples RssAnon (file-backed pages of the memory-mapped inputs do not count, as they can
# be dropped at any time) while converting, and prints the peak growth over the baseline after imports.
PROBE = textwrap.dedent("""
    import sys, threading, time
    import kiln.cli.main as cli
    def rss_anon():
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                return int(line.split()[1]) * 1024
    base, peak, done = rss_anon(), [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss_anon()); time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    code = cli.main(sys.argv[1:])
    done[0] = True; t.join()
    print("PEAK", peak[0] - base, "CODE", code)
""")


def write_big_checkpoint(out: Path, layers: int) -> tuple[int, int]:
    """A DBRX checkpoint of `layers` layers written one layer file at a time; returns (total, largest) bytes."""
    cfg = dbrx_published_config(d_model=512, n_heads=8, n_layers=layers, vocab_size=1024,
                                attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": 1024,
                                                                         "moe_num_experts": 8})
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    d, f, e, v = 512, 1024, 8, 1024
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)

    def emit(file: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(out / file))
        weight_map.update({name: file for name in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())

    emit("embed.safetensors", {"transformer.wte.weight": torch.randn(v, d, generator=gen),
                               "transformer.norm_f.weight": torch.ones(d), "lm_head.weight": torch.randn(v, d, generator=gen)})
    for i in range(layers):
        b = f"transformer.blocks.{i}"
        emit(f"layer{i}.safetensors", {
            f"{b}.norm_attn_norm.norm_1.weight": torch.ones(d), f"{b}.norm_attn_norm.norm_2.weight": torch.ones(d),
            f"{b}.norm_attn_norm.attn.Wqkv.weight": torch.randn(d + 2 * 128, d, generator=gen),
            f"{b}.norm_attn_norm.attn.out_proj.weight": torch.randn(d, d, generator=gen),
            f"{b}.ffn.router.layer.weight": torch.randn(e, d, generator=gen),
            **{f"{b}.ffn.experts.mlp.{w}": torch.randn(e * f, d, generator=gen) for w in ("w1", "v1", "w2")},
        })
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total, 2 * e * f * d * 4  # the largest kiln tensor: w13, made from w1 and v1


def test_convert_peak_memory_is_near_largest_tensor(tmp_path):
    total, largest = write_big_checkpoint(tmp_path / "hf", layers=16)
    assert total > 12 * largest  # the model is much bigger than any tensor
    out = subprocess.run([sys.executable, "-c", PROBE, "convert", "--model_dir", str(tmp_path / "hf"),
                          "--output_dir", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert "CODE 0" in out.stdout, out.stderr[-2000:]
    peak = int(out.stdout.split("PEAK")[1].split()[0])
    # w1 + v1 read, w13 made, its shard written: a handful of the largest tensor, far below the model size.
    assert peak < 6 * largest + 64 * MiB, f"peak {peak / MiB:.0f} MiB for a {total / MiB:.0f} MiB model"
    assert peak < total / 3
