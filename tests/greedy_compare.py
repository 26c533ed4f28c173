"""Comparing two engines' greedy outputs where exact equality is not the contract: quantized activations (FP8, INT8)
are step functions of their inputs, and two devices or kernel sets that sum in different orders can put a value on
either side of a rounding midpoint, moving a tiny random model's near-tied logits by a few hundredths of a nat."""

from __future__ import annotations

NEAR = 0.05  # nats


def assert_same_greedy(want: list, got: list, near: float = NEAR) -> None:
    """`want`, `got`: RequestOutputs of the same prompts, generated greedily with logprobs >= 2 (and, where set,
    prompt_logprobs). Every prompt token's logprob within `near`; the same tokens with chosen logprobs within `near`
    up to a step where `want` has its top two within `near` of each other (a tie either may break), and no further."""
    for w, g in zip(want, got, strict=True):
        if w.prompt_logprobs is not None:
            for token, lw, lg in zip(w.prompt_token_ids[1:], w.prompt_logprobs[1:], g.prompt_logprobs[1:]):
                assert abs(lw[token].logprob - lg[token].logprob) <= near, ("prompt token", token, lw, lg)
        w_out, g_out = w.outputs[0], g.outputs[0]
        for step, (tw, tg) in enumerate(zip(w_out.token_ids, g_out.token_ids)):
            if tw != tg:
                top = sorted((v.logprob for v in w_out.logprobs[step].values()), reverse=True)
                assert top[0] - top[1] <= near, ("not a tie", step, w_out.token_ids, g_out.token_ids,
                                                 w_out.logprobs[step], g_out.logprobs[step])
                break
            assert abs(w_out.logprobs[step][tw].logprob - g_out.logprobs[step][tg].logprob) <= near, \
                ("logprob", step, w_out.logprobs[step], g_out.logprobs[step])
