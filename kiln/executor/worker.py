"""One rank of a multi-rank engine: its stage of the model (a ModelRunner that agrees on the KV cache size with the
other ranks and passes hidden states between pipeline stages) and the loop that runs the driver's steps.

A step on every rank: rebuild the batch from the driver's plan; the first stage embeds, later stages receive the
previous stage's hidden states from their tp counterpart; the last stage computes full-vocabulary logits (the
vocab-parallel gather happens inside the LM head) and its tp rank 0 sends them to the driver, which samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.checkpoint.kiln_format import ArtifactInfo, load_artifact
from kiln.config import Mapping
from kiln.distributed import launch
from kiln.distributed.control import ControlChannel
from kiln.engine.scheduler import SchedulerOutput, StepFeed
from kiln.executor.cuda_graphs import DecodeGraphs
from kiln.executor.model_runner import CacheConfig, ModelRunner, StepBatch, graphs_allowed
from kiln.executor.step_plan import PlanDecoder
from kiln.kernels import select_kernels
from kiln.layers.context import ForwardContext

STOP = "stop"
STEP = "step"
GRAPHS_ENV = "KILN_CUDA_GRAPHS"  # "0": multi-rank engines decode eagerly


class StageRunner(ModelRunner):
    """A ModelRunner for one rank of a world: the KV cache is allocated only once every rank has said how many
    blocks it can hold (the minimum is taken, so the driver's block manager is valid on every rank); decode CUDA
    graphs (NCCL, one pipeline stage) are captured after that, on every rank or on none; pipeline steps may run as
    micro-batches that keep the stages busy together."""

    def __init__(self, info: ArtifactInfo, world: launch.World, cache: CacheConfig, kernel_backend: str) -> None:
        self.world = world
        self._cache_agreed = False
        kernels = select_kernels(world.device, kernel_backend, info.raw)
        if not graphs_allowed(info, kernels):
            cache = dataclasses.replace(cache, use_cuda_graphs=False)
        self._want_graphs = graphs_possible(cache, world, kernels.name)
        # ModelRunner captures graphs for one rank only, before a cache exists here: this class captures them itself.
        super().__init__(info, world.mapping, world.device, dataclasses.replace(cache, use_cuda_graphs=False), kernels)
        blocks = torch.tensor([self.num_blocks], dtype=torch.int64)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=world.control)
        self.num_blocks = int(blocks.item())
        self._cache_agreed = True
        self._allocate_cache()
        if graphs_possible(cache, world, kernels.name):  # the same answer on every rank: all take part below
            self.graphs = self._capture_on_every_rank()

    def _num_blocks(self, cache: CacheConfig) -> int:
        """ModelRunner's count, less the memory the decode graphs will take (as ModelRunner reserves on one rank)."""
        blocks = super()._num_blocks(cache)
        if self._want_graphs:
            block_bytes = self.plan.kv_bytes_per_token * self.block_size
            reserve = -(-self._graph_reserve_bytes() // block_bytes)
            if blocks - reserve >= -(-self.build.max_seq_len // self.block_size):
                return blocks - reserve
            self._want_graphs = False  # too little memory: this rank says so and every rank decodes eagerly
        return blocks

    def _allocate_cache(self) -> None:
        if self._cache_agreed:
            super()._allocate_cache()

    def _capture_on_every_rank(self) -> DecodeGraphs | None:
        """Capture the decode graphs where every rank can (agreed first: a capture's warm-up runs the collectives,
        which a rank that stayed out would leave waiting), then keep them only if every rank's capture succeeded."""
        control = self.world.control
        if not _agree(self._want_graphs, control):
            _warn_eager("a rank has too little GPU memory left for them")
            return None
        graphs, error = None, ""
        try:
            graphs = DecodeGraphs(self.model, self.kernels, self._graph_limits(), self.device)
            graphs.capture()
        except Exception as err:  # noqa: BLE001 - out of memory, an operation that cannot be captured: go eager
            graphs, error = None, f"{type(err).__name__}: {err}".splitlines()[0]
        if not _agree(graphs is not None, control):
            _warn_eager(f"rank {self.world.rank}: {error}" if error else "another rank's capture failed")
            return None
        return graphs

    def drop_graphs(self) -> None:
        """Free the decode graphs (their captured collectives) before the world is left."""
        if self.graphs is not None:
            self.graphs.release()
        self.graphs = None

    @property
    def logits_rank(self) -> int:
        """The rank that hands the logits to the driver: tp rank 0 of the last stage."""
        return (self.world.mapping.pp_size - 1) * self.world.mapping.tp_size

    def run_step(self, output: SchedulerOutput, all_logits: bool, micro_batches: int = 1,
                 feed: StepFeed | None = None) -> torch.Tensor | None:
        """This rank's share of one step; returns the logits on the driver, None elsewhere. A pipeline step runs as
        `micro_batches` groups of sequences (every rank is told the same number). `feed` names the placeholder
        input tokens and the previous step's sampled ids (on this device) that replace them."""
        mapping = self.world.mapping
        if mapping.pp_size == 1:
            logits = ModelRunner.compute_logits(self, output, all_logits, feed)
            return logits if mapping.rank == 0 else None
        with torch.inference_mode():
            return self._pipeline_step(output, all_logits, micro_batches, feed)

    @torch.inference_mode()
    def share_sampled_ids(self, ids: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The driver's sampled ids of the step just run (int64 ``[rows]``, batch order), broadcast from rank 0 over
        the default group: the driver passes its tensor, every other rank None and gets a copy on its device, the
        source of the next step's feed. Every rank calls this after the same steps (the plan says which)."""
        if ids is None:
            ids = torch.empty(rows, dtype=torch.int64, device=self.device)
        elif ids.shape != (rows,) or ids.dtype != torch.int64:
            raise RuntimeError(f"sampled ids of shape {tuple(ids.shape)} ({ids.dtype}) where the plan says int64 "
                               f"[{rows}]")
        dist.broadcast(ids, src=0)
        return ids

    def _pipeline_step(self, output: SchedulerOutput, all_logits: bool, micro_batches: int,
                       feed: StepFeed | None = None) -> torch.Tensor | None:
        """Stage s runs micro-batch m while stage s+1 runs m-1: hidden states go on with isend (waited at the end
        of the step), and every transfer flows forward, so no two ranks wait on each other. The last stage sends
        the logits of all micro-batches to the driver together, after the last one. Only the first stage reads
        input ids, so only it applies the feed (each micro-batch its own share)."""
        mapping, cfg = self.world.mapping, self.info.model
        self.copy_blocks(output.block_copies)
        first, last = mapping.pp_rank == 0, mapping.pp_rank == mapping.pp_size - 1
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        logits_parts, rows = [], 0
        parts = split_output(output, micro_batches)
        for part, part_feed in zip(parts, split_feed(feed, parts) if first else [None] * len(parts)):
            # The upload reuses one staging buffer: each micro-batch is prepared just before it runs (stream order
            # keeps the previous one's kernels ahead of the next upload)
            batch: StepBatch = self.prepare(part, all_logits, part_feed)
            rows += batch.logits_indices.shape[0]
            hidden = None
            if not first:
                hidden = torch.empty(batch.input_ids.shape[0], cfg.hidden_size, dtype=cfg.torch_dtype,
                                     device=self.device)
                dist.recv(hidden, self.world.stage_peer(mapping.pp_rank - 1))  # [tokens, hidden_size]
            hidden = self.model(batch.input_ids, batch.positions, ForwardContext(self.kernels, batch.attn),
                                hidden=hidden)
            if not last:
                out = hidden.contiguous()
                sends.append((dist.isend(out, self.world.stage_peer(mapping.pp_rank + 1)), out))
            else:
                logits_parts.append(self.model.compute_logits(hidden[batch.logits_indices]))  # [rows, vocab]
        for work, _ in sends:
            work.wait()
        if last:
            if mapping.rank == self.logits_rank:
                dist.send(torch.cat(logits_parts).contiguous(), 0)
            return None
        if mapping.rank != 0:
            return None
        logits = torch.empty(rows, cfg.vocab_size, dtype=torch.float32, device=self.device)
        dist.recv(logits, self.logits_rank)  # [rows, vocab]
        return logits


def graphs_possible(cache: CacheConfig, world: launch.World, kernel_set: str) -> bool:
    """Whether this world's ranks try decode graphs: asked for, NCCL on CUDA with the triton kernels, one pipeline
    stage (a stage's graph would also have to hold its point-to-point transfers; pipelines decode eagerly), and not
    turned off with KILN_CUDA_GRAPHS=0 (inherited by spawned ranks; set it alike on every rank under torchrun)."""
    return (getattr(cache, "use_cuda_graphs", False) and os.environ.get(GRAPHS_ENV, "1").strip() != "0"
            and world.device.type == "cuda" and kernel_set == "triton" and world.mapping.pp_size == 1)


def _agree(ok: bool, group: dist.ProcessGroup) -> bool:
    """True when every rank says `ok` (a MIN all-reduce over the gloo control group)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _warn_eager(why: str) -> None:
    warnings.warn(f"multi-rank decode CUDA graphs are off, every rank decodes eagerly: {why}", RuntimeWarning,
                  stacklevel=3)


def split_output(output: SchedulerOutput, parts: int) -> list[SchedulerOutput]:
    """The step's sequences in at most `parts` contiguous groups of about equal new tokens (batch order kept, so the
    logits rows of the groups, one after another, are those of the whole step). Block copies stay with the step."""
    scheduled = output.scheduled
    parts = max(1, min(parts, len(scheduled)))
    if parts == 1:
        return [output]
    total = sum(item.num_new_tokens for item in scheduled)
    groups: list[list] = [[]]
    done = 0
    for i, item in enumerate(scheduled):
        left_items, left_groups = len(scheduled) - i, parts - len(groups) + 1
        # close a group once it has its share, or when each later group needs one of the sequences left
        if groups[-1] and len(groups) < parts and (done >= total * len(groups) / parts or left_items < left_groups):
            groups.append([])
        groups[-1].append(item)
        done += item.num_new_tokens
    return [SchedulerOutput(group, [], [], sum(item.num_new_tokens for item in group)) for group in groups]


def split_feed(feed: StepFeed | None, parts: list[SchedulerOutput]) -> list[StepFeed | None]:
    """A step's feed for each of its micro-batches (split_output's groups, in order): entries move to the group
    whose packed tokens hold their index, re-indexed from that group's first token; rows are unchanged."""
    if feed is None or len(parts) == 1:
        return [feed] * len(parts)
    out: list[StepFeed | None] = []
    begin = 0
    for part in parts:
        end = begin + part.num_batched_tokens
        out.append(StepFeed(feed.previous, [(i - begin, row) for i, row in feed.tokens if begin <= i < end]))
        begin = end
    return out


@dataclass
class SharedIds:
    """The previous step's sampled ids as the driver broadcast them, on this rank's device: what a worker's
    StepFeed reads (in place of the driver's StepInFlight)."""

    sampled_ids: torch.Tensor  # [rows] int64


def is_peer_failure(err: BaseException) -> bool:
    """Whether an error means another rank went away (its sockets closed) rather than a failure of this rank."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err)
    return any(s in text for s in ("Connection closed", "Connection reset", "Broken pipe", "Socket Timeout",
                                   "Timed out", "NCCL communicator was aborted"))


def serve(runner: StageRunner) -> None:
    """Run the driver's steps until it says stop. A step launched ahead takes its placeholder tokens from the ids
    the driver broadcast after the step before (its plan said `share_rows`)."""
    decoder = PlanDecoder()
    channel = ControlChannel(runner.world.control)
    shared: SharedIds | None = None
    while True:
        kind, plan = channel.recv()
        if kind == STOP:
            return
        for seq_id in plan.released:
            runner.release(seq_id)
        feed = None
        if plan.feed:
            if shared is None:
                raise RuntimeError("the driver's plan feeds tokens from a previous step whose ids it never shared")
            feed = StepFeed(shared, plan.feed)
        runner.run_step(decoder.decode(plan), plan.all_logits, plan.micro_batches, feed)
        if plan.share_rows:
            shared = SharedIds(runner.share_sampled_ids(None, plan.share_rows))


def run_rank(engine: ArtifactInfo | str, mapping: Mapping, device: torch.device, local_rank: int,
             store: dist.Store, cache: CacheConfig, kernel_backend: str) -> int:
    """A worker rank's whole life: join, load, serve, leave. Returns the process exit code; a failure is left in
    the store for the driver (one line), with the traceback on stderr when KILN_DEBUG is set. The world is joined
    first, so that any later failure closes this rank's connections and the driver notices at once."""
    joined = False
    try:
        world = launch.join_world(mapping, launch.rank_device(device, local_rank), store)
        joined = True
        info = load_artifact(engine, "engine") if isinstance(engine, str) else engine
        runner = StageRunner(info, world, cache, kernel_backend)
        serve(runner)
        runner.drop_graphs()  # captured collectives go before their communicator (leave_world below)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        return 0
    except BaseException as err:  # noqa: BLE001 - any failure must reach the driver, never hang it
        secondary = joined and is_peer_failure(err)
        launch.post_error(store, mapping.rank, f"{type(err).__name__}: {err}".splitlines()[0], secondary)
        if os.environ.get("KILN_DEBUG"):
            traceback.print_exc()
        return 1
    finally:
        try:
            launch.leave_world()
        except Exception:
            pass


def _exit_with_parent(parent_pid: int) -> None:
    """A spawned rank whose driver vanished (killed, crashed) ends itself instead of waiting forever."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def spawned_worker(argv: list[str]) -> int:
    """Entry point of a rank the driver spawned: `python -m kiln.executor.worker RANK SPEC_JSON`."""
    rank, spec = int(argv[0]), json.loads(argv[1])
    mapping = Mapping(**spec["mapping"])
    threading.Thread(target=_exit_with_parent, args=(spec["parent_pid"],), daemon=True).start()
    store = launch.create_store(rank, mapping.world_size, "127.0.0.1", spec["port"])
    store.set(launch.ALIVE_KEY.format(rank=rank), "1")
    return run_rank(spec["engine_dir"], mapping.for_rank(rank), torch.device(spec["device"]), rank, store,
                    CacheConfig(**spec["cache"]), spec["kernel_backend"])


def spawn_spec(info: ArtifactInfo, port: int, device: torch.device, cache: CacheConfig, kernel_backend: str) -> str:
    """What a spawned rank needs to know, as its command-line argument."""
    return json.dumps({"mapping": info.mapping.to_dict(), "port": port, "engine_dir": str(info.path),
                       "device": device.type, "cache": dataclasses.asdict(cache), "kernel_backend": kernel_backend,
                       "parent_pid": os.getpid()})


def exit_rank(code: int) -> None:
    """End a worker rank's process now: its work is done and its groups are left, so nothing at interpreter exit
    (a process group's destructor waiting on a peer that is gone) may hold it up."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_rank(spawned_worker(sys.argv[1:]))
