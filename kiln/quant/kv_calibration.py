"""Calibration of an INT8/FP8 KV cache's scales: run the float model over calibration text and record, per attention
layer (and per kv head), the largest magnitude of the keys and of the values as the cache write receives them (after
RoPE and clip_qkv, exactly what is stored). scale = amax / 127 (INT8) or amax / 448 (FP8).

The text is kiln's shipped calibration file (kiln/eval/data/calibration.txt: passages of the training portion of the
reference books, never the held-out text perplexity is measured on) or `--calib_dataset` (a UTF-8 text file, or
JSON lines with a "text" or "article" field), read in chunks and tokenized as it goes until `num_samples` windows of
up to `max_seq_len` tokens are collected (TensorRT-LLM's defaults: 512 samples of 512 tokens). A shorter text gives
shorter windows (at least MIN_WINDOW tokens), then fewer of them.

The model runs once at tp 1 on one device (CUDA when present in the checkpoint's dtype, else the CPU in float32),
with the torch (or Triton) kernels; a kernel set whose cache write records the amax is the only hook. Dummy weights
(no tokenizer, no meaning) get unit scales instead: amax 1, for speed measurements only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from kiln.config import ConfigError, Mapping, ModelConfig
from kiln.kernels import KernelSet, select_kernels
from kiln.layers.context import AttentionMetadata, ForwardContext
from kiln.layers.sharding import full_shape, shard_for
from kiln.quant.calib_data import DEFAULT_TEXT, refuse_heldout
from kiln.quant.kv_cache import kv_cache_format
from kiln.quant.kv_published import published_kv_scales

MIN_WINDOW = 16
BLOCK = 16  # the calibration cache's block size
TOKENS_PER_STEP = 8192
CHUNK_CHARS = 1 << 10  # a few hundred tokens: below every tokenizer's length warning


@dataclass
class KVCalibration:
    """How convert calibrates the KV scales: the text (None: the shipped calibration.txt), how many windows of how many
    tokens, per layer or per kv head, on which device (None: CUDA when present)."""

    dataset: str | None = None
    num_samples: int = 512
    max_seq_len: int = 512
    per_head: bool = False
    device: str | None = None

    def validate(self) -> None:
        if self.num_samples < 1 or self.max_seq_len < MIN_WINDOW:
            raise ConfigError(f"--calib_size must be >= 1 and --calib_max_seq_length >= {MIN_WINDOW}, got "
                              f"{self.num_samples} and {self.max_seq_len}")
        path = self.text_path()
        if not path.is_file():
            raise ConfigError(f"--calib_dataset {path} is not a file; give a local UTF-8 text or JSON-lines file")
        refuse_heldout(path)

    def text_path(self) -> Path:
        return Path(self.dataset) if self.dataset else DEFAULT_TEXT


def _text_chunks(path: Path) -> Iterator[str]:
    """The calibration text in pieces of about CHUNK_CHARS characters, cut at line ends (JSON lines: one record's
    "text" or "article" field each)."""
    jsonl = path.suffix in (".jsonl", ".json")
    with open(path, encoding="utf-8", errors="replace") as f:
        if jsonl:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _record_text(line, path, number)
            return
        while True:
            chunk = f.read(CHUNK_CHARS)
            if not chunk:
                return
            yield chunk + f.readline()


def _record_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} line {number} is not JSON ({err.msg}); give JSON lines or a plain text file") \
            from None
    text = record.get("text", record.get("article")) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ConfigError(f"{path} line {number} has no \"text\" or \"article\" string field")
    return text + "\n"


def calibration_windows(tokenizer: Any, calib: KVCalibration, max_positions: int) -> list[list[int]]:
    """Token windows of one length: up to num_samples x max_seq_len tokens of the text, read until that many (a
    window never longer than the model's `max_positions`)."""
    max_len = min(calib.max_seq_len, max_positions)
    wanted = calib.num_samples * max_len
    ids: list[int] = []
    for chunk in _text_chunks(calib.text_path()):
        ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
        if len(ids) >= wanted:
            break
    length = min(max_len, max(MIN_WINDOW, len(ids) // calib.num_samples))
    count = min(calib.num_samples, len(ids) // length)
    if count == 0:
        raise ConfigError(f"--calib_dataset {calib.text_path()} holds {len(ids)} tokens, fewer than one "
                          f"{length}-token calibration window; give a longer text")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


class AmaxRecorder:
    """A cache write that also records each layer's per-kv-head amax of keys and values ([kv_heads] float32),
    keyed by the layer's cache tensor."""

    def __init__(self, write: Any) -> None:
        self.write = write
        self.amax: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: Any = None) -> None:
        k_max = key.detach().abs().float().amax(dim=(0, 2))  # [kv_heads]
        v_max = value.detach().abs().float().amax(dim=(0, 2))
        old = self.amax.get(id(k_cache))
        if old is not None:
            k_max, v_max = torch.maximum(old[0], k_max), torch.maximum(old[1], v_max)
        self.amax[id(k_cache)] = (k_max, v_max)
        self.write(key, value, k_cache, v_cache, slot_mapping, kv_scales)


def float_model(family: Any, config: ModelConfig, source: Any, device: torch.device) -> torch.nn.Module:
    """The unquantized model at tp 1 on `device`, its weights read from `source` (full tensors)."""
    with torch.device(device):
        model = family.model_class(config, Mapping())
    for name, param in model.named_parameters():
        full = source.full_tensor(name, full_shape(param)).to(device=device, dtype=param.dtype)
        param.data.copy_(shard_for(param, full))
    return model.eval()


def run_windows(model: torch.nn.Module, kernels: KernelSet, windows: list[list[int]], device: torch.device,
                 progress: bool, desc: str = "calibrate KV cache") -> None:
    """Prefill every window (several per forward, each its own sequence) through `model`."""
    length = len(windows[0])
    blocks_per_seq = -(-length // BLOCK)
    per_step = max(1, TOKENS_PER_STEP // length)
    attn_layers = model.attention_layers()
    dtype = next(model.parameters()).dtype
    shape = (per_step * blocks_per_seq, BLOCK, attn_layers[0].num_kv_heads, attn_layers[0].head_dim)
    for attn in attn_layers:
        attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
    bar = tqdm(total=len(windows), desc=desc, unit="seq", disable=not progress)
    for start in range(0, len(windows), per_step):
        batch = windows[start:start + per_step]
        seqs = len(batch)
        ids = torch.tensor(batch, dtype=torch.int64, device=device).flatten()  # [seqs * length]
        positions = torch.arange(length, device=device).repeat(seqs)
        seq_index = torch.arange(seqs, device=device)
        slots = (seq_index[:, None] * blocks_per_seq * BLOCK + torch.arange(length, device=device)).flatten()
        tables = (seq_index[:, None] * blocks_per_seq + torch.arange(blocks_per_seq, device=device)).to(torch.int32)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                                 query_start_loc=(torch.arange(seqs + 1, device=device) * length).to(torch.int32),
                                 seq_lens=torch.full((seqs,), length, dtype=torch.int32, device=device),
                                 max_query_len=length, max_seq_len=length)
        model(ids, positions, ForwardContext(kernels, meta))
        bar.update(seqs)
    bar.close()


@torch.inference_mode()
def calibrate_kv_scales(family: Any, config: ModelConfig, source: Any, tokenizer: Any, algo: str,
                        calib: KVCalibration, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """{"<layer>.attn.k_scale" / ".v_scale": full [num_kv_heads] float32 scale} of every attention layer, and a
    summary for the checkpoint's provenance."""
    fmt = kv_cache_format(algo)
    calib.validate()
    device = torch.device(calib.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_config = config if device.type == "cuda" else dataclasses.replace(config, dtype="float32")
    windows = calibration_windows(tokenizer, calib, config.max_position_embeddings)
    top = max(max(w) for w in windows)
    if top >= config.vocab_size:
        raise ConfigError(f"the checkpoint's tokenizer gives token id {top} on the calibration text, beyond the "
                          f"model's vocabulary of {config.vocab_size}; is the tokenizer this model's?")
    model = float_model(family, run_config, source, device)
    base = select_kernels(device)
    recorder = AmaxRecorder(base.write_kv_cache)
    run_windows(model, dataclasses.replace(base, write_kv_cache=recorder), windows, device, progress)
    scales: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "k_cache") and id(module.k_cache) in recorder.amax:
            for which, amax in zip(("k_scale", "v_scale"), recorder.amax[id(module.k_cache)]):
                amax = amax.cpu() if calib.per_head else amax.max().expand(amax.shape).cpu()
                scales[f"{name}.{which}"] = (amax / fmt.qmax).contiguous()
    summary = {"text": str(calib.text_path().name if calib.dataset is None else calib.text_path()),
               "samples": len(windows), "tokens_per_sample": len(windows[0]), "per_head": calib.per_head,
               "device": device.type}
    return scales, summary


def unit_kv_scales(family: Any, config: ModelConfig, algo: str) -> dict[str, torch.Tensor]:
    """Dummy weights' scales: amax 1 in every layer and head (nothing to calibrate on; for speed measurements)."""
    fmt = kv_cache_format(algo)
    with torch.device("meta"):
        model = family.model_class(config, Mapping())
    return {f"{name}.{which}": torch.full((config.num_key_value_heads,), 1.0 / fmt.qmax)
            for name, module in model.named_modules() if hasattr(module, "k_cache")
            for which in ("k_scale", "v_scale")}


class KVScaleSource:
    """A convert source that serves the calibrated KV scales by name and every other tensor from `inner`."""

    def __init__(self, inner: Any, scales: dict[str, torch.Tensor]) -> None:
        self.inner, self.scales = inner, scales

    def full_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in self.scales:
            scale = self.scales[name]
            if tuple(scale.shape) != tuple(shape):
                raise ConfigError(f"calibrated {name} has shape {tuple(scale.shape)}, the model expects {shape}")
            return scale
        return self.inner.full_tensor(name, shape)


def with_kv_scales(plan: Any, progress: bool = True) -> Any:
    """Convert's plan with a source that also serves the KV scales when its quantization asks for an INT8/FP8
    cache (calibrated on the plan's `kv_calibration`, or unit scales for dummy weights); the plan itself otherwise.
    What was done is recorded in the checkpoint's provenance."""
    algo = plan.quant.kv_cache_quant_algo
    if algo is None:
        return plan
    model_dir = plan.provenance.get("model_dir")
    published = None
    if algo == "FP8":  # a checkpoint that publishes its FP8 KV scales (vLLM's k_scale/v_scale) is not recalibrated
        published = published_kv_scales(plan.source, plan.config.num_hidden_layers, plan.config.num_key_value_heads)
    if published is not None:
        scales, summary = published, {"text": None, "published_scales": True}
    elif not model_dir:
        scales, summary = unit_kv_scales(plan.family, plan.config, algo), {"text": None, "unit_scales": True}
    else:
        from kiln.tokenizer import load_tokenizer  # only real checkpoints carry a tokenizer

        calib = plan.kv_calibration or KVCalibration()
        scales, summary = calibrate_kv_scales(plan.family, plan.config, plan.source, load_tokenizer(model_dir),
                                              algo, calib, progress)
    provenance = dict(plan.provenance, kv_cache_calibration=summary)
    return dataclasses.replace(plan, source=KVScaleSource(plan.source, scales), provenance=provenance)
