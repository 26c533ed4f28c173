"""LLM: the offline batch API, shaped as vLLM's (docs/api.md).
`kiln.LLM(engine_dir or hf_checkpoint).generate(prompts, kiln.SamplingParams(max_tokens=64))`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence as Seq

import torch

from kiln.checkpoint.kiln_format import load_artifact
from kiln.checkpoint.tokenizer_files import has_tokenizer
from kiln.runtime_checks import check_param_ids, check_prompt_ids, runtime_device
from kiln.engine.block_manager import BlockManager
from kiln.engine.llm_engine import BeamEvent, LLMEngine, TokenEvent
from kiln.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from kiln.engine.sequence import FinishReason, Sequence
from kiln.executor import create_executor
from kiln.executor.model_runner import CacheConfig
from kiln.outputs import CompletionOutput, Logprob, RequestOutput, StreamDelta, position_logprobs
from kiln.prompts import PromptError, parse_prompts
from kiln.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestError", "RequestOutput", "StreamDelta"]

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve, with the limit it breaks and how to fix it."""


class _Tracker:
    """Follows one output: incremental text and stop strings."""

    def __init__(self, llm: "LLM", out: CompletionOutput, prompt_ids: list[int], params: SamplingParams) -> None:
        self.out, self.params = out, params
        self.detok = llm._detokenizer(prompt_ids, params) if params.detokenize else None
        self.decode_one = llm._token_text
        if params.logprobs is not None:
            out.logprobs = []

    def add(self, event: TokenEvent) -> tuple[str, bool]:
        """Record a token; return the new text and whether a stop string ended the output."""
        self.out.token_ids.append(event.token_id)
        if event.logprob is not None:
            self.out.token_logprobs.append(event.logprob)
            if self.out.logprobs is not None:
                self.out.logprobs.append(position_logprobs(event.token_id, event.logprob, event.top_logprobs,
                                                           self.decode_one, event.rank))
        if event.top_logprobs:
            self.out.top_logprobs.append(event.top_logprobs)
        if event.logits is not None:
            self.out.logits.append(event.logits)
        if self.detok is None:
            return "", False
        piece = self.detok.add(event.token_id)
        if event.finished:
            piece += self.detok.flush()
        before = len(self.out.text)
        self.out.text += piece
        for stop in self.params.stop:
            at = self.out.text.find(stop, max(0, before - len(stop)))
            if at >= 0:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.out.text = self.out.text[:end]
                self.out.stop_reason = stop
                return self.out.text[before:], True
        return piece, False


class _BeamTracker:
    """Follows one beam-search request: nothing until the search ends, then every returned beam at once."""

    def __init__(self, llm: "LLM", request: "RequestOutput", params: SamplingParams) -> None:
        self.llm, self.request, self.params = llm, request, params

    def finish(self, event: BeamEvent) -> list[CompletionOutput]:
        outs = self.request.outputs
        for out, beam in zip(outs, event.beams):
            out.token_ids, out.token_logprobs, out.score = list(beam.token_ids), list(beam.logprobs), beam.score
            out.finish_reason = beam.finish_reason.value
            if self.params.logprobs is not None:  # the scored (processed) logprob of each beam token; rank unknown
                out.logprobs = [{t: Logprob(lp, None, self.llm._token_text(t))}
                                for t, lp in zip(beam.token_ids, beam.logprobs)]
            detok = self.llm._detokenizer(self.request.prompt_token_ids, self.params) if self.params.detokenize \
                else None
            if detok is not None:
                out.text = "".join(detok.add(t) for t in beam.token_ids) + detok.flush()
        for out in outs[len(event.beams):]:  # cannot happen when the search ran to its end; kept honest
            out.finish_reason = FinishReason.ABORT.value
        return outs


def engine_tokenizer(engine_dir: str | Path, tokenizer_dir: str | Path | None) -> Any:
    """The tokenizer of `tokenizer_dir` when given (its errors are the user's to see), else the one the engine
    carries (copied by convert and build), else None. A carried tokenizer kiln cannot load (one that only remote code
    provides) is skipped with a warning: the engine still serves token ids, as it did before engines carried one."""
    from kiln.tokenizer import TokenizerError, load_tokenizer

    if tokenizer_dir is not None:
        return load_tokenizer(tokenizer_dir)
    if not has_tokenizer(Path(engine_dir)):
        return None
    try:
        return load_tokenizer(engine_dir)
    except TokenizerError as err:
        logger.warning("the engine's tokenizer files cannot be loaded (%s); pass tokenizer_dir for text", err)
        return None


def request_stop_ids(params: SamplingParams, tokenizer: Any, eos_token_id: int | list[int] | None) -> frozenset[int]:
    """A request's stop ids: its own, its end_id, and the model's end tokens (the tokenizer's, else config.json's
    eos) unless an end_id overrides them. Shared by LLM and the server (which has the tokenizer, not the LLM)."""
    ids = set(params.stop_token_ids)
    if params.end_id is not None:
        ids.add(params.end_id)
        return frozenset(ids)
    if tokenizer is not None:
        ids.update(tokenizer.stop_token_ids)
    else:
        ids.update(eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id])
    return frozenset(ids)


class LLM:
    """A loaded engine with its runtime. `model` is a kiln engine directory, or a Hugging Face checkpoint directory
    that is converted and built once into kiln's engine cache (kiln.one_step) and reused from there.

    vLLM's argument names are accepted where kiln has the same concept (docs/api.md has the table): `tokenizer`
    (= tokenizer_dir), `dtype`, `tensor_parallel_size`, `pipeline_parallel_size`, `max_model_len`, `max_num_seqs`,
    `max_num_batched_tokens`, `block_size` (the one-step convert and build; with an engine they must agree with it), `gpu_memory_utilization`
    (= kv_cache_free_gpu_memory_fraction), `enforce_eager` (= not use_cuda_graphs) and `seed` (seeds torch's global
    RNG, which requests without their own seed draw from). `trust_remote_code` is accepted and changes nothing:
    kiln never runs a checkpoint's code."""

    def __init__(self, model: str | Path | None = None, tokenizer: str | Path | None = None, *,
                 engine_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                 device: str | None = None, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 kv_cache_bytes: int | None = None, enable_prefix_caching: bool = True, kernel_backend: str = "auto",
                 use_cuda_graphs: bool = True, async_scheduling: bool = True,
                 kv_cache_max_tokens: int | None = None, dtype: str | None = None,
                 tensor_parallel_size: int | None = None, pipeline_parallel_size: int | None = None,
                 max_model_len: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, block_size: int | None = None,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool | None = None,
                 seed: int | None = None, trust_remote_code: bool = False) -> None:
        from kiln.llm_args import OneStepArgs, resolve_engine

        one_step = OneStepArgs(dtype, tensor_parallel_size, pipeline_parallel_size, max_model_len, max_num_seqs,
                               max_num_batched_tokens, block_size)
        engine_dir = resolve_engine(model, engine_dir, one_step)
        tokenizer_dir = tokenizer if tokenizer is not None else tokenizer_dir
        if gpu_memory_utilization is not None:
            kv_cache_free_gpu_memory_fraction = gpu_memory_utilization
        if enforce_eager is not None:
            use_cuda_graphs = not enforce_eager
        if seed is not None:
            torch.manual_seed(seed)
        self.engine_dir = Path(engine_dir)
        self.info = load_artifact(engine_dir, "engine")
        self.build = self.info.build
        one_step.check_engine(self.info)
        dev = self.device = runtime_device(device)
        cache = CacheConfig(kv_cache_free_gpu_memory_fraction, kv_cache_bytes, use_cuda_graphs, kv_cache_max_tokens)
        runner = create_executor(self.info, dev, cache, kernel_backend)
        blocks = BlockManager(runner.num_blocks, self.build.kv_block_size, enable_prefix_caching)
        scheduler = Scheduler(blocks, self.build.max_batch_size, self.build.max_num_tokens, self.build.max_seq_len)
        # async_scheduling: launch each step before the previous one's tokens reach the host (single-rank engines;
        # a multi-rank engine only with KILN_MULTIRANK_ASYNC=1, else it runs its steps one at a time).
        self.runner, self.engine = runner, LLMEngine(scheduler, runner, async_scheduling)
        self.tokenizer = engine_tokenizer(engine_dir, tokenizer_dir)

    def get_tokenizer(self) -> Any:
        """vLLM's get_tokenizer(): the Hugging Face (transformers) tokenizer where the engine's tokenizer is one,
        else kiln's own tokenizer (Baichuan's SentencePiece, DBRX's tiktoken: encode/decode as transformers'), or
        None for an engine without a tokenizer."""
        return getattr(self.tokenizer, "hf", self.tokenizer)

    def close(self) -> None:
        """Stop the engine's worker processes (multi-rank engines); the LLM cannot generate afterwards."""
        self.runner.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Any:
        if self.tokenizer is None:
            return None
        from kiln.tokenizer import IncrementalDetokenizer

        skip = params.skip_special_tokens if params is not None else True
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=skip)

    def _token_text(self, token_id: int) -> str | None:
        """One token's text, for Logprob.decoded_token (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer and the engine carries none: pass tokenizer_dir "
                                   "(--tokenizer_dir)")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The request's stop ids: its own, its end_id, and the model's end tokens (tokenizer and
        generation_config.json, else config.json's eos) unless an end_id overrides them."""
        return request_stop_ids(params, self.tokenizer, self.info.model.eos_token_id)

    def _check(self, prompt_ids: list[int], params: SamplingParams, which: str = "a prompt") -> None:
        try:
            check_prompt_ids(prompt_ids, self.info.model.vocab_size, which)
            check_param_ids(params, self.info.model.vocab_size)
        except ValueError as err:
            raise RequestError(str(err)) from err
        limit = self.build.max_input_len
        if len(prompt_ids) > limit:
            raise RequestError(f"a prompt has {len(prompt_ids)} tokens, more than this engine's max_input_len {limit}; "
                               "rebuild with a larger --max_input_len or truncate the prompt (--max_input_length)")
        if len(prompt_ids) + params.max_tokens > self.build.max_seq_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this engine's "
                f"max_seq_len {self.build.max_seq_len}; lower max_tokens or rebuild with a larger --max_seq_len")
        if params.use_beam_search:
            self._check_beams(params)

    def _check_beams(self, params: SamplingParams) -> None:
        width = self.build.max_beam_width
        if params.num_beams > width:
            raise RequestError(f"num_beams {params.num_beams} exceeds this engine's max_beam_width {width}; rebuild "
                               f"with --max_beam_width {params.num_beams} or use fewer beams")
        if params.num_beams > self.build.max_batch_size:
            raise RequestError(
                f"num_beams {params.num_beams} exceeds this engine's max_batch_size {self.build.max_batch_size} (each "
                f"beam is one sequence of the batch); rebuild with --max_batch_size {params.num_beams} or use fewer "
                "beams")
        if params.stop:
            raise RequestError("stop strings are not supported with beam search (transformers has none either); "
                               "use stop_token_ids or end_id")

    def _encode_all(self, prompts: Any, params: list[SamplingParams]) -> tuple[list[str | None], list[list[int]]]:
        """Texts (None for token-id prompts) and token ids of every prompt, truncated as truncate_prompt_tokens says."""
        try:
            parsed = parse_prompts(prompts)
        except PromptError as err:
            raise RequestError(str(err)) from None
        if len(params) not in (1, len(parsed)) :
            raise RequestError(f"{len(params)} sampling params for {len(parsed)} prompts; give one or one each")
        texts = [p.text for p in parsed]
        ids = [self.encode(p.text) if p.token_ids is None else p.token_ids for p in parsed]
        params = params * len(parsed) if len(params) == 1 else params
        keep = [p.truncate_prompt_tokens for p in params]
        return texts, [i[-k:] if k is not None else i for i, k in zip(ids, keep)]

    def _prompt_logprobs(self, ids: list[int], k: int) -> list[dict[int, Logprob] | None]:
        """vLLM's prompt_logprobs: None for the first token, then each token's logprob given those before it, with
        the k most likely tokens at that position (raw model distribution)."""
        logprobs = torch.log_softmax(self.score(ids)[:-1].float().cpu(), dim=-1)  # [prompt tokens - 1, vocab]
        chosen = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1) if k else (None, None)
        chosen_column = torch.tensor(chosen).unsqueeze(1)
        ranks = ((logprobs > chosen_column).sum(dim=-1) + 1).tolist()  # 1 + tokens strictly more likely
        out: list[dict[int, Logprob] | None] = [None]
        for pos, token in enumerate(ids[1:]):
            top = list(zip(top_ids[pos].tolist(), top_values[pos].tolist())) if k else []
            out.append(position_logprobs(token, chosen[pos], top, self._token_text, ranks[pos]))
        return out

    def _add_requests(self, prompts: Any, params: list[SamplingParams]) -> tuple[
            list[RequestOutput], dict[int, tuple[int, _Tracker]]]:
        requests, trackers = [], {}
        texts, encoded = self._encode_all(prompts, params)
        params = params * len(encoded) if len(params) == 1 else params
        for i, (ids, p) in enumerate(zip(encoded, params)):
            self._check(ids, p, f"prompt {i}")
        prompt_logprobs = [self._prompt_logprobs(ids, p.prompt_logprobs) if p.prompt_logprobs is not None else None
                           for ids, p in zip(encoded, params)]  # before any request runs: score() needs it so
        for rid, (text, ids, p) in enumerate(zip(texts, encoded, params)):
            req = RequestOutput(rid, text, ids, [], prompt_logprobs[rid])
            stops = self.stop_ids(p)
            if p.use_beam_search:  # one sequence: the engine forks the beams from it
                req.outputs = [CompletionOutput(index) for index in range(p.n)]
                seq = Sequence(self.engine.new_seq_id(), ids, p.max_tokens, stops, p.ignore_eos, p.min_tokens, p)
                trackers[seq.seq_id] = (rid, _BeamTracker(self, req, p))
                self.engine.add(seq)
                requests.append(req)
                continue
            for index in range(p.n):
                out = CompletionOutput(index)
                req.outputs.append(out)
                # The n samples of a seeded request each get their own stream: seed, seed + 1, ...
                sp = p if p.seed is None or index == 0 else dataclasses.replace(p, seed=(p.seed + index) % 2**64)
                seq = Sequence(self.engine.new_seq_id(), ids, p.max_tokens, stops, p.ignore_eos, p.min_tokens, sp)
                trackers[seq.seq_id] = (rid, _Tracker(self, out, ids, p))
                self.engine.add(seq)
            requests.append(req)
        return requests, trackers

    def stream(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> Iterator[StreamDelta]:
        """Generate, yielding each output's new token and text as soon as it is made. Prompts take vLLM's shapes
        (kiln.prompts). A beam-search request yields nothing while it searches (a beam's tokens can still be
        replaced by another's) and, when it ends, one delta per returned beam holding the beam's whole text
        (token_id: its last token) and its finish reason."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()]
        else:
            params = list(sampling_params)
        requests, trackers = self._add_requests(prompts, params)
        self.last_results = requests
        try:
            while self.engine.has_unfinished():
                for event in self.engine.step():
                    if isinstance(event, BeamEvent):
                        yield from self._apply_beams(event, trackers)
                    else:
                        yield self._apply(event, requests, trackers)
        finally:
            for seq_id in list(trackers):  # a consumer that stops early leaves nothing running
                self.engine.abort(seq_id)

    def _apply(self, event: TokenEvent, requests: list[RequestOutput],
               trackers: dict[int, tuple[int, _Tracker]]) -> StreamDelta:
        rid, tracker = trackers[event.seq.seq_id]
        text, stopped = tracker.add(event)
        if stopped and not event.finished:
            self.engine.finish(event.seq.seq_id, FinishReason.STOP)
        reason = FinishReason.STOP.value if stopped else (
            event.seq.finish_reason.value if event.finished and event.seq.finish_reason else None)
        if reason is not None:
            tracker.out.finish_reason = reason
            if not stopped and reason == FinishReason.STOP.value and event.token_id in tracker.params.stop_token_ids:
                tracker.out.stop_reason = event.token_id  # vLLM: a stop_token_ids hit names the token; eos: None
            del trackers[event.seq.seq_id]
        return StreamDelta(rid, tracker.out.index, event.token_id, text, reason)

    def _apply_beams(self, event: BeamEvent, trackers: dict[int, tuple[int, Any]]) -> list[StreamDelta]:
        """A beam request ended: fill its outputs, best beam first; stream each whole beam once."""
        rid, tracker = trackers.pop(event.seq.seq_id)
        return [StreamDelta(rid, out.index, out.token_ids[-1] if out.token_ids else -1, out.text, out.finish_reason)
                for out in tracker.finish(event)]

    def score(self, prompt: str | list[int]) -> torch.Tensor:  # [prompt tokens, vocab] float32
        """The model's logits at every position of one prompt (for perplexity and checks against references).
        Runs only while nothing else is running; it borrows the first cache blocks and then clears the prefix
        cache, whose blocks it may have overwritten."""
        if self.engine.has_unfinished():
            raise RequestError("score() runs only while no generation is in flight")
        ids = self.encode(prompt)
        if not 0 < len(ids) <= self.build.max_seq_len:
            raise RequestError(f"score() takes 1 to max_seq_len ({self.build.max_seq_len}) tokens, got {len(ids)}")
        blocks = self.engine.scheduler.block_manager
        needed = -(-len(ids) // self.build.kv_block_size)
        if needed > self.runner.num_blocks:
            raise RequestError(f"the KV cache holds {self.runner.num_blocks} blocks, the prompt needs {needed}")
        seq = Sequence(-1, ids, 1)
        seq.block_table = list(range(needed))
        logits = self.runner.compute_logits(SchedulerOutput([ScheduledSeq(seq, len(ids))], [], [], len(ids)),
                                            all_logits=True)
        blocks.reset_prefix_cache()
        return logits

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a batch of them ([{"role": ..., "content": ...}, ...]), formatted
        with the family's chat format (the tokenizer's chat_template, or Baichuan's user/assistant tokens)."""
        if self.tokenizer is None:
            raise RequestError("chat needs a tokenizer: pass tokenizer_dir (--tokenizer_dir)")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (batched together) and return one RequestOutput per prompt, in order.
        `use_tqdm` shows a progress bar of finished prompts on stderr when stderr is a terminal (as vLLM)."""
        from tqdm import tqdm

        bar = None
        if use_tqdm:
            bar = tqdm(total=None, desc="Processed prompts", unit="prompt", disable=None, dynamic_ncols=True)
        try:
            for delta in self.stream(prompts, sampling_params):
                if bar is not None and delta.finish_reason is not None:
                    bar.total = len(self.last_results)
                    bar.update(int(self.last_results[delta.request_id].finished))
        finally:
            if bar is not None:
                bar.close()
        return self.last_results
