"""How `kiln.LLM`'s first argument becomes an engine directory: a kiln engine as it is, a Hugging Face checkpoint
through the one-step cache (kiln.one_step), with vLLM's option names for what the convert and build are told."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import DTYPES, ConfigError
from kiln.one_step import OneStepOptions, engine_for, is_kiln_artifact

# vLLM's other spellings of the dtypes.
_VLLM_DTYPES = {"half": "float16", "float": "float32", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class OneStepArgs:
    """vLLM's names for the options of a one-step engine; None: the default (or, for an engine, whatever it has)."""

    dtype: str | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None

    def options(self) -> OneStepOptions:
        dtype = None if self.dtype in (None, "auto") else str(self.dtype).replace("torch.", "")
        dtype = _VLLM_DTYPES.get(dtype, dtype)
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one kiln runs; use one of auto, {', '.join(sorted(DTYPES))}")
        # vLLM takes any prompt shorter than the context: the one-step engine's input limit says the same.
        return OneStepOptions(dtype, self.tensor_parallel_size or 1, self.pipeline_parallel_size or 1,
                              self.max_num_seqs or OneStepOptions.max_batch_size, None, self.max_model_len,
                              self.max_num_batched_tokens, self.block_size, prompts_up_to_seq_len=True)

    def check_engine(self, info: Any) -> None:
        """Options given with a built engine must be what it was built with (an engine is not rebuilt silently)."""
        want = {"dtype": self.options().dtype, "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size, "max_model_len": self.max_model_len,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "block_size": self.block_size}
        has = {"dtype": info.model.dtype, "tensor_parallel_size": info.mapping.tp_size,
               "pipeline_parallel_size": info.mapping.pp_size, "max_model_len": info.build.max_seq_len,
               "max_num_seqs": info.build.max_batch_size, "max_num_batched_tokens": info.build.max_num_tokens,
               "block_size": info.build.kv_block_size}
        for name, value in want.items():
            if value is not None and value != has[name]:
                raise ConfigError(f"{name}={value!r}, but the engine {info.path} was built with {has[name]!r}; drop "
                                  f"the argument, or pass the Hugging Face checkpoint to build an engine with it")


def resolve_engine(model: str | Path | None, engine_dir: str | Path | None, one_step: OneStepArgs) -> Path:
    """The engine directory to load: `model` or `engine_dir` when it is a kiln engine, else the cached (or newly
    built) engine of the Hugging Face checkpoint it names."""
    if model is not None and engine_dir is not None:
        raise ConfigError("give the model (an engine or a Hugging Face checkpoint) once: model= or engine_dir=")
    path = model if model is not None else engine_dir
    if path is None:
        raise ConfigError("LLM needs a model: a kiln engine directory or a Hugging Face checkpoint directory")
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; kiln loads local engines and checkpoints only (it never "
                          "downloads): pass a kiln engine or a Hugging Face checkpoint directory")
    if is_kiln_artifact(path):
        return path  # load_artifact says so when it is a checkpoint rather than an engine
    return engine_for(path, one_step.options())
