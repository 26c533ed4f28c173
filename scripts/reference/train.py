"""Train one reference model from scratch on the tokenized books (plain PyTorch; one GPU, or the CPU for a smoke
test).

    python scripts/reference/train.py --family mpt --data .reference_data/tokens --out OUT --budget_s 100
    python scripts/reference/train.py --family mpt --data .reference_data/tokens --out OUT --steps 4000  # rerun

With `--budget_s`, the step count is fixed after 30 timed steps so that training fits the budget, and recorded;
`--steps N` with the recorded N reruns the same schedule (AdamW, linear warm-up, cosine decay to 10%, seed 0).
The weights are written in bf16 as `{family}-0000i-of-0000n.safetensors` shards of at most 14.5 MiB under their
published names (every `--save_every_s` seconds and at the end, each file replaced atomically), with the training
record (steps, tokens, time, losses) in the first shard's metadata under `kiln_training`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SPECS, build  # noqa: E402

SHARD_BYTES = int(14.5 * 2**20)
SEQ_LEN = {"dbrx": 2048, "mpt": 1024, "baichuan": 1024}  # RoPE trained at its full length; ALiBi extrapolates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(SPECS), required=True)
    p.add_argument("--data", type=Path, required=True, help="folder of {family}_{train,heldout}.npy")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget_s", type=float, default=None, help="wall-clock budget for the training steps")
    p.add_argument("--steps", type=int, default=None, help="exact step count (overrides --budget_s)")
    p.add_argument("--batch_tokens", type=int, default=8192)
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every_s", type=float, default=30.0)
    p.add_argument("--eval_windows", type=int, default=48)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.steps is None and args.budget_s is None:
        p.error("give --steps or --budget_s")
    return args


def load_tokens(path: Path, device: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path).astype(np.int64)).to(device)


def batch(tokens: torch.Tensor, rows: int, seq: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq + 1 tokens: inputs [rows, seq] and next-token targets [rows, seq]."""
    starts = torch.randint(0, len(tokens) - seq - 1, (rows,), generator=gen).to(tokens.device)
    window = tokens[starts[:, None] + torch.arange(seq + 1, device=tokens.device)]
    return window[:, :-1], window[:, 1:]


def lr_at(step: int, total: int, peak: float) -> float:
    warm = 100  # fixed, so that the steps before the step count is chosen follow the same schedule
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_of(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                        enabled=device.startswith("cuda")):
        logits, aux = model(ids)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return ce, aux


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: torch.Tensor, seq: int, windows: int, device: str) -> float:
    """Mean next-token loss over the first `windows` non-overlapping windows of the held-out tokens."""
    model.eval()
    n = min(windows, (len(tokens) - 1) // seq)
    total = 0.0
    for i in range(0, n, 4):
        rows = torch.arange(i, min(n, i + 4), device=tokens.device)
        window = tokens[rows[:, None] * seq + torch.arange(seq + 1, device=tokens.device)]
        ce, _ = loss_of(model, window[:, :-1], window[:, 1:], device)
        total += ce.item() * len(rows)
    model.train()
    return total / n


def save_shards(model: torch.nn.Module, family: str, out: Path, record: dict) -> None:
    """bf16 shards of at most SHARD_BYTES in state-dict order, each written to a temporary name and renamed."""
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(shards):
        path = out / f"{family}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        meta = {"format": "pt"}
        if i == 0:
            meta["kiln_training"] = json.dumps(record)
        save_file(part, str(path) + ".tmp", metadata=meta)
        os.replace(str(path) + ".tmp", path)


def choose_steps(args: argparse.Namespace, seconds_per_step: float) -> int:
    return args.steps if args.steps is not None else max(100, int(args.budget_s / seconds_per_step))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    spec, seq = SPECS[args.family], args.seq_len or SEQ_LEN[args.family]
    rows = max(1, args.batch_tokens // seq)
    train_tokens = load_tokens(args.data / f"{args.family}_train.npy", args.device)
    held_tokens = load_tokens(args.data / f"{args.family}_heldout.npy", args.device)
    model = build(args.family, args.seed).to(args.device)
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=args.device.startswith("cuda"))
    gen = torch.Generator().manual_seed(args.seed)
    total = args.steps or 10**9
    record = {"family": args.family, "seed": args.seed, "seq_len": seq, "batch_rows": rows, "lr": args.lr,
              "train_tokens_available": len(train_tokens), "params": sum(p.numel() for p in model.parameters())}
    start = last_save = last_log = time.time()
    ema = None
    step = 0
    while step < total:
        if step == 35 and args.steps is None:  # steps 5..34 timed (after warm-up) fix the schedule
            total = choose_steps(args, (time.time() - timed_from) / 30)
            record["steps_planned"] = total
        if step == 5:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timed_from = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr)
        ids, targets = batch(train_tokens, rows, seq, gen)
        ce, aux = loss_of(model, ids, targets, args.device)
        opt.zero_grad(set_to_none=True)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        if now - last_log > 10 or step == total:
            ema = ce.item()
            print(f"[{args.family}] step {step}/{total} loss {ema:.3f} {now - start:.0f}s", flush=True)
            last_log = now
        if args.budget_s is not None and args.steps is None and now - start > 1.15 * args.budget_s:
            record["stopped_early"] = f"deadline after {step} of {total} steps"
            break
        if now - last_save > args.save_every_s:
            save_shards(model, args.family, args.out, {**record, "steps": step, "partial": True})
            last_save = time.time()
    record.update({"steps": step, "tokens_seen": step * rows * seq, "epochs": step * rows * seq / len(train_tokens),
                   "train_seconds": round(time.time() - start, 1), "final_train_loss": round(ce.item(), 4),
                   "heldout_loss": round(heldout_loss(model, held_tokens, seq, args.eval_windows, args.device), 4),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "torch": torch.__version__})
    save_shards(model, args.family, args.out, record)
    print(f"[{args.family}] done {json.dumps(record)}", flush=True)
    return record


if __name__ == "__main__":
    train(parse_args())
