"""Joining a multi-rank world: rank and world from torchrun or mpirun, or worker processes kiln spawns itself.

Every rank ends up with the same `World`: the default process group (NCCL on CUDA, gloo on the CPU) for tensors,
a gloo group for control messages (step plans, the KV block count), one tensor-parallel group per pipeline stage,
and the key-value store of the rendezvous, through which a failing rank leaves its error for the driver.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
import torch
import torch.distributed as dist

from kiln.config import ConfigError, Mapping
from kiln.distributed.collectives import set_tp_group
from kiln.distributed.rendezvous_check import check_reachable, exchange_addresses, several_hosts, stall_watchdog
from kiln.envvars import env_float, env_int

# How long ranks wait for each other to start (import torch, reach the rendezvous). Model loading comes after.
INIT_TIMEOUT_S = env_float("KILN_DIST_INIT_TIMEOUT", 120.0)
# Tensor collectives of a step; a dead peer is noticed at once (its sockets close), this bounds a live but stuck one.
STEP_TIMEOUT_S = env_float("KILN_DIST_STEP_TIMEOUT", 600.0)
# Workers wait for the driver's next step without limit: an idle LLM is not a failure.
IDLE_TIMEOUT = datetime.timedelta(days=3650)
ERROR_KEY = "kiln/error/{rank}"
ALIVE_KEY = "kiln/alive/{rank}"


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits when a launcher started it: `source` is "torchrun" or "mpirun"."""

    source: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int_env(*names: str) -> int | None:
    for name in names:
        value = env_int(name)
        if value is not None:
            return value
    return None


def launcher_env() -> LaunchEnv | None:
    """The launcher's rank and world: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or mpirun
    (OMPI_COMM_WORLD_* from Open MPI, PMI_RANK/PMI_SIZE from MPICH and Intel MPI); None when started by hand."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _int_env("MASTER_PORT") or 29500
    world = _int_env("WORLD_SIZE")
    rank = _int_env("RANK")
    if world is not None and rank is not None:
        return LaunchEnv("torchrun", rank, world, _int_env("LOCAL_RANK") or 0, addr, port)
    world = _int_env("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    rank = _int_env("OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if world is not None and rank is not None:
        local = _int_env("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
        return LaunchEnv("mpirun", rank, world, rank if local is None else local, addr, port)
    return None


class RankStartError(ValueError):
    """A spawned rank died or did not start: the message names it (one line at the command line, exit 2)."""


@dataclass
class World:
    """This rank's view of the world once joined."""

    mapping: Mapping
    device: torch.device
    store: dist.Store
    control: dist.ProcessGroup  # gloo: pickled messages, also when tensors go over NCCL
    tp_group: dist.ProcessGroup | None

    @property
    def rank(self) -> int:
        return self.mapping.rank

    def stage_peer(self, pp_rank: int) -> int:
        """The rank with this rank's tp coordinate in pipeline stage `pp_rank` (hidden states are replicated
        across a stage's tp ranks, so each sends to and receives from its own counterpart)."""
        return pp_rank * self.mapping.tp_size + self.mapping.tp_rank


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """cuda:local_rank on GPU machines (one GPU per rank); the CPU otherwise."""
    if device.type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; start "
                          "at most one rank per GPU")
    return torch.device("cuda", local_rank)


def create_store(rank: int, world_size: int, addr: str, port: int) -> dist.Store:
    """The rendezvous store: rank 0 hosts it (port 0: any free port, read back from `store.port`)."""
    return dist.TCPStore(addr, port, world_size, is_master=rank == 0,
                         timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S), wait_for_workers=False)


def launcher_store(env: LaunchEnv) -> dist.Store:
    """The store of a launcher-started world: torchrun's agent already hosts one at MASTER_PORT (every rank is a
    client), otherwise rank 0 hosts it there. Keys are prefixed per restart so that a restarted job starts clean."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0 and not agent,
                          timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S), wait_for_workers=False)
    return dist.PrefixStore(f"kiln{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def join_world(mapping: Mapping, device: torch.device, store: dist.Store) -> World:
    """Create the process groups over `store`. Every rank calls this with the same world, in any order."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Every rank says which address its backend will use; a multi-host world that cannot connect is named, not
    # left waiting (rendezvous_check.py).
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    entries = exchange_addresses(store, mapping.rank, mapping.world_size, backend, INIT_TIMEOUT_S, master)
    check_reachable(entries, backend)
    armed = several_hosts(entries)
    watchdog = stall_watchdog(INIT_TIMEOUT_S, mapping.rank, entries, backend) if armed else nullcontext()
    with watchdog:
        dist.init_process_group(backend, store=store, rank=mapping.rank, world_size=mapping.world_size,
                                timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S))
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    tp_group = None
    for stage in range(mapping.pp_size):  # every rank creates every group, in the same order
        ranks = list(range(stage * mapping.tp_size, (stage + 1) * mapping.tp_size))
        group = dist.new_group(ranks) if mapping.tp_size > 1 else None
        if stage == mapping.pp_rank:
            tp_group = group
    set_tp_group(tp_group, mapping.tp_size)
    return World(mapping, device, store, control, tp_group)


# Set when a teardown did not finish: the command line then ends its process at once rather than let a process
# group's destructor wait at interpreter exit on a peer that is gone.
TEARDOWN_ABANDONED = False


def leave_world(timeout_s: float = 20.0) -> bool:
    """Forget the groups (also the tensor-parallel group the layers use), so that a later engine can start over.
    Every rank calls this at the same time (NCCL tears a communicator down with its peers present). The teardown
    runs in a helper thread bounded by `timeout_s`, so that a peer that is already gone can never hang shutdown;
    returns False (with a warning) when it did not finish, leaving the groups to the process's exit."""
    set_tp_group(None, 1)
    if not dist.is_initialized():
        return True
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        finally:
            done.set()

    threading.Thread(target=destroy, daemon=True).start()
    if done.wait(timeout_s):
        return True
    print(f"kiln: warning: the process groups did not shut down within {timeout_s:.0f} s; left to process exit",
          file=sys.stderr, flush=True)
    global TEARDOWN_ABANDONED
    TEARDOWN_ABANDONED = True
    return False


def post_error(store: dist.Store, rank: int, text: str, secondary: bool) -> None:
    """Leave this rank's failure for the driver. `secondary`: the rank failed because a peer went away."""
    try:
        store.set(ERROR_KEY.format(rank=rank), ("peer:" if secondary else "self:") + text)
    except Exception:  # the store's host is gone too: nobody is left to tell
        pass


def read_errors(store: dist.Store, world_size: int, wait_s: float = 2.0) -> dict[int, tuple[str, bool]]:
    """{rank: (error text, secondary)} of the ranks that posted one, waiting up to `wait_s` for a first-hand one
    (a rank that saw its peer vanish may post before the rank that failed)."""
    deadline = time.monotonic() + wait_s
    while True:
        found: dict[int, tuple[str, bool]] = {}
        for rank in range(world_size):
            key = ERROR_KEY.format(rank=rank)
            try:
                if store.check([key]):
                    raw = store.get(key).decode(errors="replace")
                    found[rank] = (raw.split(":", 1)[1], raw.startswith("peer:"))
            except Exception:
                return found
        if any(not secondary for _, secondary in found.values()) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


class RankProcess:
    """A rank kiln started itself: a fresh interpreter running `python -m <module> <args>`. A plain subprocess,
    not multiprocessing, so that the caller's __main__ (a script without a main guard, stdin, a notebook) is never
    imported again in the children. The interface follows multiprocessing.Process where kiln uses it."""

    def __init__(self, rank: int, module: str, args: list[str]) -> None:
        self.rank = rank
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # kiln importable as it is here
        self.popen = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdin=subprocess.DEVNULL)

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


def spawn_ranks(world_size: int, module: str, args: list[str]) -> list[RankProcess]:
    """Start ranks 1..world_size-1 as `python -m module <rank> *args`; each ends itself when this process goes."""
    return [RankProcess(rank, module, [str(rank), *args]) for rank in range(1, world_size)]


def wait_alive(store: dist.Store, procs: list[RankProcess], timeout_s: float = INIT_TIMEOUT_S) -> None:
    """Wait until every spawned rank has reached the store; a rank that dies first is an error naming it."""
    deadline = time.monotonic() + timeout_s
    pending = {rank: proc for rank, proc in enumerate(procs, start=1)}
    while pending:
        for rank, proc in list(pending.items()):
            if store.check([ALIVE_KEY.format(rank=rank)]):
                del pending[rank]
            elif proc.exitcode is not None:
                errors = read_errors(store, len(procs) + 1, wait_s=0)
                text = errors.get(rank, (f"exited with code {proc.exitcode} before joining", False))[0]
                raise RankStartError(f"rank {rank} failed: {text}")
        if pending and time.monotonic() > deadline:
            raise RankStartError(f"ranks {sorted(pending)} did not start within {timeout_s:.0f} s "
                               "(KILN_DIST_INIT_TIMEOUT sets the limit)")
        time.sleep(0.02)


def stop_processes(procs: list[RankProcess], grace_s: float = 5.0) -> None:
    """Let spawned ranks finish for `grace_s`, then terminate, then kill what is left."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
