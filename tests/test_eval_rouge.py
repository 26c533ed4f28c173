"""ROUGE as summarize.py reports it: rouge-score's scorer, evaluate's bootstrap aggregation (seed 0), x 100."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from kiln.eval.rouge import ROUGE_TYPES, rouge_scores

PREDICTIONS = ["the cat sat on the mat", "a quick brown fox jumped over dogs", "nothing in common here",
               "Rain fell all day.\nThe river rose.", "markets closed higher on friday after a volatile week"]
REFERENCES = ["the cat is on the mat", "the quick brown fox jumps over the lazy dog", "completely different words",
              "The river rose.\nRain fell all day.", "stocks ended the volatile week higher on friday"]


def test_hand_computed_single_example():
    # unigrams: 5 of 6 shared; bigrams: the-cat, on-the, the-mat of 5; LCS: "the cat on the mat" (5 of 6)
    scores = rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(60.0)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["rougeLsum"] == pytest.approx(100 * 5 / 6)


def test_lsum_works_on_newline_separated_sentences():
    # The same two sentences in the other order: the LCS of the whole texts covers one sentence, the summary-level
    # LCS covers both.
    scores = rouge_scores(["c d e\na b"], ["a b\nc d e"])
    assert scores["rougeL"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_no_stemming_as_evaluate_defaults():
    assert rouge_scores(["cats running"], ["cat runs"])["rouge1"] == 0.0


def test_matches_rouge_score_scorer_and_bootstrap_under_seed_0():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    per_example = []
    for ref, pred in zip(REFERENCES, PREDICTIONS):
        score = scorer.score(ref, pred)
        aggregator.add_scores(score)
        per_example.append(score)
    np.random.seed(0)
    expected = aggregator.aggregate()
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    ours = rouge_scores(PREDICTIONS, REFERENCES)
    assert (np.random.get_state()[1] == before).all(), "the global numpy generator must be left as it was"
    for key in ROUGE_TYPES:
        assert ours[key] == pytest.approx(expected[key].mid.fmeasure * 100, abs=1e-12)
        mean = 100 * np.mean([s[key].fmeasure for s in per_example])
        assert abs(ours[key] - mean) < 5  # the bootstrap median of means sits near the plain mean
    assert 0 < ours["rouge2"] < ours["rouge1"] < 100


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge_scores([], [])
