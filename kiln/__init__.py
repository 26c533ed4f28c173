"""kiln: an inference engine for DBRX, MPT and Baichuan. `kiln.LLM(engine_dir).generate(prompts, kiln.SamplingParams())`."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
# vLLM's top-level names for the outputs (kiln.outputs is plain Python: importing it loads no torch).
_OUTPUT_NAMES = ("RequestOutput", "CompletionOutput", "Logprob")


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import kiln.engine` (plain Python) does not pull in torch.
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kiln.sampling_params import SamplingParams

        return SamplingParams
    if name in _OUTPUT_NAMES:
        from kiln import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
