"""Pipeline micro-batches without spawning ranks: how a step's sequences are split (order kept, no empty group, about
equal tokens), and the KILN_PP_MICROBATCH_MIN_TOKENS setting."""

from __future__ import annotations

import pytest

from kiln.config import ConfigError
from kiln.engine.scheduler import ScheduledSeq, SchedulerOutput
from kiln.engine.sequence import Sequence
from kiln.executor.multirank import PP_MICROBATCH_DEFAULT, PP_MICROBATCH_ENV, microbatch_min_tokens
from kiln.executor.worker import split_output


def step(new_tokens: list[int]) -> SchedulerOutput:
    scheduled = [ScheduledSeq(Sequence(i, list(range(1, n + 1)), max_tokens=4), n) for i, n in enumerate(new_tokens)]
    return SchedulerOutput(scheduled, [], [(1, 2)], sum(new_tokens))


@pytest.mark.parametrize("tokens,parts,expected", [
    ([1, 1, 1, 1], 2, [[1, 1], [1, 1]]),
    ([100, 1, 1, 1], 2, [[100], [1, 1, 1]]),
    ([1, 1, 1, 100], 2, [[1, 1, 1], [100]]),
    ([5, 5, 5], 4, [[5], [5], [5]]),  # never more groups than sequences
    ([1, 1, 1, 1, 1, 1], 3, [[1, 1], [1, 1], [1, 1]]),
    ([64, 1, 1], 3, [[64], [1], [1]]),  # the last groups still get a sequence each
    ([7], 2, [[7]]),
])
def test_split_keeps_order_and_balances(tokens, parts, expected):
    output = step(tokens)
    groups = split_output(output, parts)
    assert [[item.num_new_tokens for item in g.scheduled] for g in groups] == expected
    assert [item.seq.seq_id for g in groups for item in g.scheduled] == list(range(len(tokens)))  # batch order
    assert all(g.num_batched_tokens == sum(i.num_new_tokens for i in g.scheduled) for g in groups)
    if len(groups) > 1:  # block copies are made once for the whole step, before its first micro-batch
        assert all(g.block_copies == [] for g in groups)
    else:
        assert groups[0] is output


def test_microbatch_setting(monkeypatch):
    monkeypatch.delenv(PP_MICROBATCH_ENV, raising=False)
    assert microbatch_min_tokens() == PP_MICROBATCH_DEFAULT
    monkeypatch.setenv(PP_MICROBATCH_ENV, "0")
    assert microbatch_min_tokens() == 0
    for bad in ("-1", "many"):
        monkeypatch.setenv(PP_MICROBATCH_ENV, bad)
        with pytest.raises(ConfigError, match="KILN_PP_MICROBATCH_MIN_TOKENS must be a number of tokens >= 0"):
            microbatch_min_tokens()
