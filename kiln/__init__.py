"""kiln: an inference engine for DBRX, MPT and Baichuan. `kiln.LLM(engine_dir).generate(prompts, kiln.SamplingParams())`."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import kiln.engine` (plain Python) does not pull in torch.
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kiln.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
