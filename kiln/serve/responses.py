"""OpenAI response bodies: completions and chat, whole and as stream chunks, with usage and logprobs.

A Choice gathers one output's deltas; the functions here turn choices into the JSON the official clients parse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.serve.step_loop import Delta

TokenText = Callable[[int], str]  # a token id's text (for logprobs)


@dataclass
class Choice:
    """One returned sequence: `index` in the response (prompt index * n + output index)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.top_logprobs += delta.top_logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(token_ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]],
                        text_of: TokenText, offset: int) -> dict[str, Any]:
    """The completions endpoint's logprobs object: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens = [text_of(t) for t in token_ids]
    offsets, at = [], offset
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    top = [{text_of(t): lp for t, lp in row} for row in tops] if tops else None
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], logprobs: list[float], tops: list[list[tuple[int, float]]],
                  text_of: TokenText, top_k: int) -> dict[str, Any]:
    """The chat endpoint's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
        row = tops[i][:top_k] if i < len(tops) else []
        content.append({**entry(token_id, logprob), "top_logprobs": [entry(t, lp) for t, lp in row]})
    return {"content": content}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


SSE_DONE = sse("[DONE]")
