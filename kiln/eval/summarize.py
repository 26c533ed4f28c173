"""The loop of TensorRT-LLM's examples/summarize.py for one model (kiln's engine or transformers' model): build each
prompt as summarize.py does, generate in batches for `max_ite` iterations, decode, score with ROUGE (and, with
eval_ppl, the per-token perplexity of each prompt + output), and time the generation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from kiln.eval.datasets import SummaryExample
from kiln.eval.perplexity import Window, window_nll
from kiln.eval.rouge import rouge_scores

# prompts (token ids) -> generated ids per prompt (the end token included when generation stopped on it)
GenerateFn = Callable[[list[list[int]]], list[list[int]]]
LogitsFn = Callable[[list[int]], torch.Tensor]  # ids -> [len(ids), vocab]


@dataclass
class SummaryRun:
    """What one model produced: its summaries (in dataset order), token and time counts, ROUGE x 100, and the
    per-example perplexities with eval_ppl."""

    name: str
    ids: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    output_tokens: int = 0
    seconds: float = 0.0
    perplexities: list[float] = field(default_factory=list)
    rouge: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def perplexity(self) -> float | None:
        """summarize.py's "per-token perplexity": the mean over examples of each example's perplexity."""
        return sum(self.perplexities) / len(self.perplexities) if self.perplexities else None

    def to_json(self) -> dict:
        out: dict = dict(self.rouge)
        out.update(examples=len(self.summaries), output_tokens=self.output_tokens, time_s=self.seconds,
                   tokens_per_s=self.tokens_per_s, ids=self.ids, summaries=self.summaries)
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        return out


def prompt_text(article: str) -> str:
    """summarize.py's prompt: `article + ' TL;DR: '`, stripped, with " n't" joined to its word."""
    return (article + " TL;DR: ").strip().replace(" n't", "n't")


def encode_prompt(tokenizer, text: str, max_input_length: int) -> list[int]:
    """Token ids of `text`, keeping the last `max_input_length` (transformers' left truncation: the special tokens
    the tokenizer adds in front, a BOS for instance, stay)."""
    ids = tokenizer.encode(text)
    if len(ids) <= max_input_length:
        return ids
    prefix = tokenizer.encode("")
    keep = ids[: len(prefix)] if prefix and ids[: len(prefix)] == prefix else []
    return keep + ids[len(ids) - (max_input_length - len(keep)):]


def batches(examples: Sequence[SummaryExample], batch_size: int, max_ite: int) -> list[list[SummaryExample]]:
    """summarize.py's iteration: consecutive batches of `batch_size`, at most `max_ite` of them."""
    groups = [list(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]
    return groups[:max_ite]


def sequence_perplexity(logits_fn: LogitsFn, ids: list[int]) -> float:
    """Per-token perplexity of a whole sequence (every token after the first), as TensorRT-LLM's tools/ppl.py."""
    nll = window_nll(logits_fn(ids), ids, Window(0, len(ids), 1))
    return math.exp(nll / (len(ids) - 1))


def run_summaries(name: str, groups: Iterable[list[SummaryExample]], tokenizer, max_input_length: int,
                  generate: GenerateFn, logits_fn: LogitsFn | None = None) -> SummaryRun:
    """Summarize every example of every batch with `generate`, timing only the generation; with `logits_fn`, the
    perplexity of each prompt + summary too (not timed)."""
    run = SummaryRun(name)
    for group in groups:
        prompts = [encode_prompt(tokenizer, prompt_text(e.article), max_input_length) for e in group]
        start = time.perf_counter()
        outputs = generate(prompts)
        run.seconds += time.perf_counter() - start
        for example, prompt, output in zip(group, prompts, outputs):
            run.ids.append(example.id)
            run.summaries.append(tokenizer.decode(output, skip_special_tokens=True))
            run.references.append(example.highlights)
            run.output_tokens += len(output)
            if logits_fn is not None and output:
                run.perplexities.append(sequence_perplexity(logits_fn, prompt + output))
    if run.summaries:
        run.rouge = rouge_scores(run.summaries, run.references)
    return run
