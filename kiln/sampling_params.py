"""Sampling parameters of one request: what to generate and how to choose each token.

Plain Python (no torch import) so that the engine, scheduler and server can use it without loading torch.
Field names follow vLLM and transformers; TensorRT-LLM's run.py flags map onto them (``--max_output_len`` ->
``max_tokens``, ``--end_id`` -> ``end_id``, ``--num_beams`` -> ``num_beams``). The mapping of run.py's default
``top_k=1`` (greedy) is the command line's job, not this class's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# torch.Generator.manual_seed accepts seeds up to 2**64 - 1.
_MAX_SEED = 2**64 - 1
# OpenAI's documented range for presence_penalty and frequency_penalty.
_MAX_OPENAI_PENALTY = 2.0


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None, hint: str = "") -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f">= {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        allowed = f"an integer {' and '.join(bounds)}" if bounds else "an integer"
        raise ValueError(f"SamplingParams.{name} must be {allowed}{hint}, got {value!r}")


def _check_float(name: str, value: object, allowed: str, ok: bool) -> None:
    """Raise ValueError unless ``value`` is a finite real number for which ``ok`` holds."""
    if not (_is_real(value) and ok):
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_token_ids(name: str, ids: object) -> None:
    """Raise ValueError unless ``ids`` is a list of non-negative ints."""
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"SamplingParams.{name} must be a list of token ids, got {type(ids).__name__}: {ids!r}")
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise ValueError(f"SamplingParams.{name} must hold non-negative integer token ids, got {tok!r} in {ids!r}")


@dataclass
class SamplingParams:
    """How one request is generated: length, randomness, penalties, stopping, logprobs and beam search.

    ``temperature == 0`` (or ``top_k == 1``) means greedy decoding. ``top_k`` 0 or -1 disables top-k.
    ``repetition_penalty`` follows transformers (a seen token's positive logit is divided by it, a negative one
    multiplied; "seen" covers prompt and output); ``presence_penalty`` and ``frequency_penalty`` follow OpenAI and
    vLLM (subtracted from the logits of tokens in the output, once and per occurrence). ``logprobs=k`` also returns
    the k most likely tokens' logprobs at each step (0: only the chosen token's). ``bad_word_ids`` lists token
    sequences that must never be produced; ``bad_words`` are strings the engine tokenizes into such sequences.
    ``end_id`` is TensorRT-LLM's end-of-sequence id, added to the stop ids by the engine. Values are checked on
    construction and a ValueError names the wrong one and its allowed range.

    Beam search (``num_beams > 1``, which sets ``use_beam_search``) follows transformers' ``generate``:
    ``length_penalty`` is the exponent of the generated length that finished scores are divided by,
    ``early_stopping`` is True (stop once ``num_beams`` beams have finished), False (stop when no running beam is
    likely to beat them) or ``"never"`` (stop only when none can), and ``n`` (<= num_beams) beams are returned, best
    first. Sampling settings (temperature, top-k/p, min-p, seed) do not apply to beam search; penalties, bad words
    and min_tokens do.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    end_id: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    bad_words: list[str] = field(default_factory=list)
    bad_word_ids: list[list[int]] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # The raw model logits of every step that made a token (float32 [vocab] each, vocab x 4 bytes per token), as
    # run.py's --output_logits_npy; not with beam search.
    return_logits: bool = False
    # transformers' / TensorRT-LLM's no_repeat_ngram_size: no n-gram of prompt + output occurs twice (0: off).
    no_repeat_ngram_size: int = 0
    # vLLM's names, same meaning and defaults: prompt_logprobs=k returns, for every prompt token after the first,
    # its logprob and the k most likely tokens' (RequestOutput.prompt_logprobs); skip_special_tokens drops special
    # tokens from the output text; logit_bias {token_id: bias} is added to the logits before sampling;
    # truncate_prompt_tokens=k keeps only the last k prompt tokens; detokenize=False leaves output text empty.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    truncate_prompt_tokens: int | None = None
    detokenize: bool = True

    def __post_init__(self) -> None:
        # A single stop string is a common way to write it (OpenAI accepts both); keep the field a list. vLLM's
        # default for stop, stop_token_ids and bad_words is None: the same as empty here.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids", "bad_words", "bad_word_ids"):
            if getattr(self, name) is None:
                setattr(self, name, [])
        self._check_vllm_fields()
        self._check_lengths()
        self._check_sampling()
        self._check_penalties()
        self._check_stopping()
        # num_beams > 1 means beam search, as in transformers' generate(num_beams=...) and TensorRT-LLM's run.py.
        if isinstance(self.num_beams, int) and not isinstance(self.num_beams, bool) and self.num_beams > 1:
            if self.use_beam_search is False:
                self.use_beam_search = True
        self._check_beam_search()

    @property
    def has_penalty(self) -> bool:
        """A repetition, presence or frequency penalty applies (the sampler then reads the previous tokens)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """True when each token is the most likely one: temperature 0 or top_k 1, and no beam search."""
        return (self.temperature == 0 or self.top_k == 1) and not self.use_beam_search

    def _check_lengths(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1, hint=" (the number of tokens to generate)")
        _check_int("n", self.n, low=1, hint=" (the number of sequences to return per prompt)")
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}); "
                "lower min_tokens or raise max_tokens"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, hint=" or None (0 returns only the chosen token's)")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=_MAX_SEED, hint=" or None")

    def _check_sampling(self) -> None:
        _check_float("temperature", self.temperature, ">= 0 (0 means greedy)",
                     _is_real(self.temperature) and self.temperature >= 0)
        _check_int("top_k", self.top_k, low=-1, hint=" (0 or -1 disables top-k)")
        _check_float("top_p", self.top_p, "in (0, 1] (1 disables top-p)",
                     _is_real(self.top_p) and 0 < self.top_p <= 1)
        _check_float("min_p", self.min_p, "in [0, 1] (0 disables min-p)",
                     _is_real(self.min_p) and 0 <= self.min_p <= 1)

    def _check_penalties(self) -> None:
        _check_float("repetition_penalty", self.repetition_penalty, "> 0 (1 disables it)",
                     _is_real(self.repetition_penalty) and self.repetition_penalty > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(name, value, f"in [-{_MAX_OPENAI_PENALTY}, {_MAX_OPENAI_PENALTY}] (0 disables it)",
                         _is_real(value) and abs(value) <= _MAX_OPENAI_PENALTY)

    def _check_stopping(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a list of non-empty strings, got {self.stop!r}")
        _check_token_ids("stop_token_ids", self.stop_token_ids)
        if self.end_id is not None:
            _check_int("end_id", self.end_id, low=0, hint=" or None")
        if not isinstance(self.bad_words, list) or not all(isinstance(w, str) and w for w in self.bad_words):
            raise ValueError(f"SamplingParams.bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        if not isinstance(self.bad_word_ids, (list, tuple)):
            raise ValueError(
                f"SamplingParams.bad_word_ids must be a list of token-id lists, got {self.bad_word_ids!r}")
        for seq in self.bad_word_ids:
            _check_token_ids("bad_word_ids entry", seq)
            if len(seq) == 0:
                raise ValueError("SamplingParams.bad_word_ids must not contain an empty sequence; remove it")
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, low=0, hint=" (0: off)")
        for name in ("ignore_eos", "include_stop_str_in_output", "use_beam_search", "return_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be True or False, got {getattr(self, name)!r}")

    def _check_vllm_fields(self) -> None:
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, hint=" or None (0: only the prompt token's)")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, low=1, hint=" or None")
        for name in ("skip_special_tokens", "spaces_between_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be True or False, got {getattr(self, name)!r}")
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"SamplingParams.logit_bias must be a dict {{token_id: bias}}, got {self.logit_bias!r}")
        # JSON objects (the OpenAI API) carry token ids as strings: accept "42" as 42.
        bias = {}
        for tok, value in self.logit_bias.items():
            tid = int(tok) if isinstance(tok, str) and tok.strip().isdigit() else tok
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"SamplingParams.logit_bias keys must be token ids (integers >= 0), got {tok!r}")
            _check_float("logit_bias value", value, "a finite number", _is_real(value))
            bias[tid] = float(value)
        self.logit_bias = bias

    def _check_beam_search(self) -> None:
        _check_int("num_beams", self.num_beams, low=1)
        _check_float("length_penalty", self.length_penalty, "a finite number", _is_real(self.length_penalty))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(
                f"SamplingParams.early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.use_beam_search and self.num_beams < 2:
            raise ValueError(
                f"SamplingParams.num_beams must be >= 2 with use_beam_search=True, got {self.num_beams}; "
                "set num_beams to the beam width")
        if self.use_beam_search and self.return_logits:
            raise ValueError("SamplingParams.return_logits is not available with beam search (a beam's steps come "
                             "from several parents); drop one of them")
        if self.use_beam_search and self.n > self.num_beams:
            raise ValueError(
                f"SamplingParams.n ({self.n}) must not exceed num_beams ({self.num_beams}) in beam search: "
                "only num_beams finished beams exist to return")
