"""The driver of a multi-rank engine: rank 0 runs the scheduler and the sampler in the caller's process, its own
share of the model, and drives the other ranks (spawned here, or started by torchrun/mpirun) step by step.

Each step it broadcasts a StepPlan over the gloo control group; every rank rebuilds the same batch and runs its
stage; the logits come back to rank 0, which samples with ModelRunner's own code (beams, seeds and logprobs behave
as on one rank). Any rank's failure ends every rank and is raised here as one WorkerError naming the rank.

With KILN_MULTIRANK_ASYNC=1 the engine may launch step N+1 before N's tokens reach the host (async scheduling, as
on one rank): after sampling a launched step the driver broadcasts its sampled ids (int64 [rows]) over the default
group, and N+1's plan carries the feed that puts them in place of its placeholder tokens on every rank's device.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
import torch
import torch.distributed as dist

from kiln.checkpoint.kiln_format import ArtifactInfo
from kiln.config import ConfigError
from kiln.distributed import launch
from kiln.distributed.control import ControlChannel
from kiln.engine.scheduler import SchedulerOutput, StepFeed
from kiln.executor.model_runner import CacheConfig, StepInFlight
from kiln.sampling import SamplerOutput
from kiln.executor.step_plan import PlanEncoder, StepPlan, WorkerError
from kiln.envvars import env_float
from kiln.executor.worker import STEP, STOP, StageRunner, is_peer_failure, spawn_spec

# A NCCL collective does not notice a dead peer; after this long the watchdog ends the driver itself.
WATCHDOG_GRACE_S = env_float("KILN_WATCHDOG_GRACE", 15.0)
# Pipeline engines split a step of at least this many new tokens (prefill: compute-bound, where stages working on
# different micro-batches at once pay) into pp micro-batches. Decode steps are bound by reading the weights, which
# each micro-batch would read again, so they stay whole by default. 0: every step of several sequences is split.
PP_MICROBATCH_ENV = "KILN_PP_MICROBATCH_MIN_TOKENS"
PP_MICROBATCH_DEFAULT = 256
# "1": the driver can launch a step ahead of the previous one's tokens (async scheduling over several ranks). Off by
# default until the NCCL path has run on GPUs; only the driver reads it (each plan tells the other ranks what to do).
MULTIRANK_ASYNC_ENV = "KILN_MULTIRANK_ASYNC"


def multirank_async() -> bool:
    """The KILN_MULTIRANK_ASYNC setting: "1" on, "0" or unset off."""
    raw = os.environ.get(MULTIRANK_ASYNC_ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ConfigError(f"{MULTIRANK_ASYNC_ENV} must be 1 (launch multi-rank steps ahead) or 0, got {raw!r}")
    return raw == "1"


def microbatch_min_tokens() -> int:
    """The threshold from KILN_PP_MICROBATCH_MIN_TOKENS (default 256)."""
    raw = os.environ.get(PP_MICROBATCH_ENV, "").strip()
    if not raw:
        return PP_MICROBATCH_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{PP_MICROBATCH_ENV} must be a number of tokens >= 0, got {raw!r}")
    return value


class MultiRankDriver(StageRunner):
    """Rank 0 of a multi-rank engine. It is an executor like ModelRunner (`num_blocks`, `launch`, `execute`,
    `compute_logits`, `release`, `shutdown`), sampling the logits gathered here. `can_launch_ahead` is False (steps
    run one at a time) unless KILN_MULTIRANK_ASYNC=1: then `launch` shares each step's sampled ids with every rank,
    so that the engine can launch the next step with a feed before this one's tokens are on the host."""

    can_launch_ahead = False  # the default; an instance turns it on from KILN_MULTIRANK_ASYNC

    def __init__(self, info: ArtifactInfo, device: torch.device, cache: CacheConfig, kernel_backend: str = "auto",
                 store: dist.Store | None = None, local_rank: int = 0) -> None:
        self.procs: list[launch.RankProcess] = []
        self.encoder = PlanEncoder()
        self._closed, self._failed = False, False
        self._store = store
        self.microbatch_min_tokens = microbatch_min_tokens()
        self.micro_batched_steps = 0  # pipeline steps run as micro-batches so far
        self.can_launch_ahead = multirank_async()
        self.fed_steps = 0  # steps whose plan carried a feed (launched ahead of the previous step's tokens)
        self.shared_steps = 0  # steps whose sampled ids were broadcast to every rank
        self._shared: StepInFlight | None = None  # the step whose sampled ids every rank holds now
        try:
            if store is None:  # one command: spawn ranks 1.. here
                self._store = launch.create_store(0, info.mapping.world_size, "127.0.0.1", 0)
                spec = spawn_spec(info, self._store.port, device, cache, kernel_backend)
                self.procs = launch.spawn_ranks(info.mapping.world_size, "kiln.executor.worker", [spec])
                launch.wait_alive(self._store, self.procs)
            world = launch.join_world(info.mapping.for_rank(0), launch.rank_device(device, local_rank), self._store)
            self.channel = ControlChannel(world.control)
            if self.procs and world.device.type == "cuda":
                threading.Thread(target=self._watchdog, daemon=True).start()
            super().__init__(info, world, cache, kernel_backend)
        except BaseException as err:
            raise self._fail(err) from None
        # A script that never calls LLM.close() still stops its ranks cleanly (exit 0 under torchrun) at exit.
        ref = weakref.ref(self)
        atexit.register(lambda: (lambda driver: driver is not None and driver.shutdown())(ref()))

    # ---- failures ------------------------------------------------------------------------------------------------

    def _fail(self, err: BaseException) -> BaseException:
        """Stop every rank and turn the first-hand failure (a worker's, else this rank's) into one WorkerError."""
        if isinstance(err, WorkerError) or isinstance(err, KeyboardInterrupt):
            self._abort()
            return err
        errors = launch.read_errors(self._store, len(self.procs) + 1 if self.procs else self._world_size()) \
            if self._store is not None else {}
        first_hand = sorted(r for r, (_, secondary) in errors.items() if not secondary)
        mine = f"{type(err).__name__}: {err}".splitlines()[0]
        dead = self._dead_ranks() if is_peer_failure(err) else []
        if dead and not first_hand:  # killed (out of host memory, a signal) before it could say anything
            rank, code = dead[0]
            text = f"its process ended with exit code {code}" + (f" (signal {-code})" if code < 0 else "")
        elif first_hand:
            rank, text = first_hand[0], errors[first_hand[0]][0]
        elif not is_peer_failure(err) or not errors:
            rank, text = 0, mine
        else:
            rank, text = min(errors), errors[min(errors)][0]
        self._abort()
        return WorkerError(f"rank {rank} failed: {text}")

    def _dead_ranks(self, wait_s: float = 1.0) -> list[tuple[int, int]]:
        """(rank, exit code) of spawned ranks that ended with an error, waiting briefly for a dying one to end."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _world_size(self) -> int:
        world = getattr(self, "world", None)
        return world.mapping.world_size if world is not None else 1

    def _abort(self) -> None:
        self._failed = self._closed = True
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        launch.stop_processes(self.procs, grace_s=0)
        try:
            launch.leave_world()
        except Exception:
            pass

    def _watchdog(self) -> None:
        """NCCL only: a spawned rank that died while this process waits inside a collective would hang it."""
        while not self._closed:
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if p.exitcode not in (None, 0)]
            if dead:
                time.sleep(WATCHDOG_GRACE_S)
                if not self._closed:
                    errors = launch.read_errors(self._store, len(self.procs) + 1, wait_s=0)
                    rank = dead[0][0]
                    text = errors.get(rank, (f"exited with code {dead[0][1]}", False))[0]
                    print(f"kiln: error: rank {rank} failed: {text}", file=sys.stderr, flush=True)
                    for proc in self.procs:
                        proc.kill()
                    os._exit(2)
                return
            time.sleep(0.2)

    def _check_usable(self) -> None:
        if self._failed:
            raise WorkerError("this multi-rank engine stopped after a rank failed; load it again")
        if self._closed:
            raise WorkerError("this multi-rank engine was shut down; load it again")

    # ---- the executor --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def compute_logits(self, output: SchedulerOutput, all_logits: bool = False) -> torch.Tensor:
        # -> [rows, vocab] float32, gathered from the last stage: the same rows ModelRunner.compute_logits gives
        self._check_usable()
        try:
            return self._run(self._plan(output, all_logits, None, 0), output, None)
        except BaseException as err:
            raise self._fail(err) from None

    def launch(self, output: SchedulerOutput, feed: StepFeed | None = None) -> StepInFlight:
        """ModelRunner.launch over every rank. With KILN_MULTIRANK_ASYNC=1 the step's sampled ids are broadcast to
        every rank, and `feed` (placeholder tokens taking the previous launched step's ids) is allowed."""
        if feed is not None and not self.can_launch_ahead:
            raise ValueError("this multi-rank engine does not launch a step ahead of the previous step's tokens; set "
                             f"{MULTIRANK_ASYNC_ENV}=1 before loading it, or run with async scheduling off")
        return self._launch(output, feed, share=self.can_launch_ahead)

    def execute(self, output: SchedulerOutput) -> tuple[dict[int, int], SamplerOutput]:
        """One step, waited for (the synchronous engine): nothing is shared with the ranks beyond the plan."""
        return self._launch(output, None, share=False).result()

    @torch.inference_mode()
    def _launch(self, output: SchedulerOutput, feed: StepFeed | None, share: bool) -> StepInFlight:
        self._check_usable()
        if feed is not None and feed.tokens and feed.previous is not self._shared:
            raise ValueError("a multi-rank step can only be fed from the step launched just before it, whose "
                             "sampled ids every rank holds")
        try:
            items = [item for item in output.scheduled if item.needs_sample]
            plan = self._plan(output, False, feed, len(items) if share else 0)
            logits = self._run(plan, output, feed)
            sample = self.sampler.launch(logits, [self._row(item.seq) for item in items])
            handle = StepInFlight(items, sample)
            self._shared = None
            if plan.share_rows:
                self.share_sampled_ids(sample.token_ids.contiguous(), plan.share_rows)
                self._shared, self.shared_steps = handle, self.shared_steps + 1
            return handle
        except BaseException as err:
            raise self._fail(err) from None

    def _plan(self, output: SchedulerOutput, all_logits: bool, feed: StepFeed | None, share_rows: int) -> StepPlan:
        """The step's plan: a fed step's placeholders (the tokens the previous step sampled, each at the index
        after that step's last computed token) are sent, and sent again once real."""
        placeholders = None
        if feed is not None:  # also those this step does not compute (a sequence recomputed from its start)
            previous = feed.previous.items if isinstance(feed.previous, StepInFlight) else []
            placeholders = {item.seq.seq_id: item.start + item.num_new_tokens for item in previous}
        plan = self.encoder.encode(output, all_logits, placeholders)
        plan.micro_batches = self._micro_batches(output)
        plan.feed = list(feed.tokens) if feed is not None else []
        plan.share_rows = share_rows
        return plan

    def _run(self, plan: StepPlan, output: SchedulerOutput, feed: StepFeed | None) -> torch.Tensor:
        """Send the plan, run rank 0's share; -> [rows, vocab] float32 logits from the last stage."""
        self.channel.send((STEP, plan))
        logits = self.run_step(output, plan.all_logits, plan.micro_batches, feed if plan.feed else None)
        if logits is None:
            raise RuntimeError("rank 0 received no logits; the pipeline's last stage did not send them")
        self.fed_steps += bool(plan.feed)
        return logits

    def _micro_batches(self, output: SchedulerOutput) -> int:
        """pp micro-batches for a step that computes enough tokens and has at least two sequences, else 1."""
        pp, seqs = self.world.mapping.pp_size, len(output.scheduled)
        if pp == 1 or seqs < 2 or output.num_batched_tokens < self.microbatch_min_tokens:
            return 1
        self.micro_batched_steps += 1
        return min(pp, seqs)

    def release(self, seq_id: int) -> None:
        """Forget a finished request here and, with the next step, on every rank."""
        super().release(seq_id)
        self.encoder.release(seq_id)

    def shutdown(self) -> None:
        """Tell every rank to stop, wait for them (killing any that do not end) and leave the world. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.channel.send((STOP, None))
        except Exception:
            pass
        # Every rank now drops its graphs and leaves the world at the same time; the processes are waited for
        # after that (waiting first would leave the workers' NCCL teardown without its peer).
        self.drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        try:
            launch.leave_world()
        except Exception:
            pass
        launch.stop_processes(self.procs)

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.shutdown()
        except Exception:
            pass
