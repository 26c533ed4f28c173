"""The request bodies of the OpenAI endpoints, validated strictly (a string where a number belongs is a 400, not a
guess), and their mapping onto kiln's SamplingParams.

Fields OpenAI defines that kiln cannot honour are refused by name when set (best_of, suffix, tools, response_format
other than text); `user` and unknown fields are ignored, as OpenAI and vLLM do.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.sampling_params import SamplingParams
from kiln.serve.errors import APIError, bad_request

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_CHOICES = 256  # prompts x n in one request: more is a batch job, not a request
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """What both endpoints share: sampling, penalties, stopping, streaming. kiln's extras (top_k, min_p,
    repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are vLLM's names, sent by clients as extra_body."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool = False


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        value = "" if first["type"] == "missing" else f" (got {_short(first.get('input'))})"
        raise bad_request(f"{where}: {first['msg']}{value}", param=where) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refuse_unsupported(req: _SamplingFields) -> None:
    """Fields kiln does not honour, refused rather than silently ignored."""
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (kiln returns every one of the n samples); use n", "best_of")
    for token, bias in (req.logit_bias or {}).items():
        if not token.isdigit() or abs(bias) > MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias maps token ids (digit strings) to values in [-{MAX_LOGIT_BIAS:g}, "
                              f"{MAX_LOGIT_BIAS:g}]; got {token!r}: {bias!r}", "logit_bias")
    if req.use_beam_search:
        raise bad_request("beam search is not served over HTTP; use kiln run --num_beams or kiln.LLM",
                          "use_beam_search")
    if isinstance(req, CompletionRequest) and req.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported by these models", "suffix")
    if isinstance(req, ChatRequest):
        if req.tools or req.tool_choice not in (None, "none"):
            raise bad_request("tools and tool_choice are not supported", "tools")
        if req.response_format not in (None, {"type": "text"}):
            raise bad_request("response_format other than {\"type\": \"text\"} is not supported", "response_format")


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams; a value out of range is a 400 naming the field and its allowed range."""
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    fields = dict(max_tokens=max_tokens, n=req.n, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
                  seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                  include_stop_str_in_output=req.include_stop_str_in_output,
                  skip_special_tokens=req.skip_special_tokens, logit_bias=dict(req.logit_bias or {}) or None)
    optional = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty)
    fields.update({name: value for name, value in optional.items() if value is not None})
    try:
        return SamplingParams(**fields)
    except ValueError as err:
        text = str(err)
        found = re.search(r"SamplingParams\.(\w+)", text)
        raise bad_request(text.replace("SamplingParams.", ""), found.group(1) if found else None) from None


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """The completions endpoint's prompt forms as a list of prompts: a string, strings, token ids, lists of ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty; give a string, a list of strings or token ids", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat templates take them: role and text content (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":
            raise bad_request(f"messages[{i}].content is missing; every {m.role!r} message needs its text",
                              f"messages.{i}.content")
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
        out.append({"role": m.role, "content": content})
    return out


def check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise APIError(400, f"{prompts} prompts x n={n} makes {prompts * n} sequences, more than {MAX_CHOICES} in "
                            "one request; split it into several requests", "n")
