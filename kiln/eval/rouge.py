"""ROUGE as TensorRT-LLM's examples/summarize.py reports it, computed offline.

summarize.py calls `evaluate.load("rouge").compute()` with its defaults and prints each score x 100. That metric
(huggingface/evaluate, metrics/rouge/rouge.py) scores every (reference, prediction) pair with rouge-score's
`RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)` and aggregates them with
rouge-score's `BootstrapAggregator` (1000 resamples of the per-example F-measures; it reports the median of the
resampled means, `mid.fmeasure`), under `numpy.random.seed(0)` (evaluate seeds numpy with the metric's `seed`,
which summarize.py sets to 0). Doing exactly the same here, without the `evaluate` package and its download of the
metric script, gives the numbers of published TensorRT-LLM logs. rougeLsum splits texts into sentences at
newlines only, as rouge-score does when nobody splits them first.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for the block and restored after it (as evaluate's temp_seed does; the
    bootstrap draws from the global generator)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def rouge_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False,
                 seed: int = 0) -> dict[str, float]:
    """rouge1, rouge2, rougeL and rougeLsum F-measures x 100, aggregated as `evaluate`'s rouge metric does."""
    from rouge_score import rouge_scorer, scoring

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one each")
    if not predictions:
        raise ValueError("ROUGE needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    aggregator = scoring.BootstrapAggregator()
    for reference, prediction in zip(references, predictions):
        aggregator.add_scores(scorer.score(reference, prediction))
    with _numpy_seed(seed):
        result = aggregator.aggregate()
    return {key: float(result[key].mid.fmeasure) * 100 for key in ROUGE_TYPES}
