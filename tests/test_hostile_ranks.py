"""Ranks that cannot reach each other: a multi-host world where a rank would listen on a loopback address is refused
at once naming every rank's host and address and the variable to set; ranks missing from the rendezvous are named
within the init timeout; a process group that does not form ends the rank with one line instead of a silent wait.
(The issue's two-network-namespace run of `torchrun --nnodes 2` is not reproduced here: these tests drive the same
checks through a local store.)"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from kiln.config import ConfigError
from kiln.distributed import rendezvous_check as rc

REPO = Path(__file__).resolve().parents[1]


def entry(host: str, address: str) -> dict[str, str]:
    return {"host": host, "address": address, "via": "host name"}


def test_loopback_address_across_hosts_refused_naming_each_rank():
    entries = {0: entry("hostA", "10.0.0.1"), 1: entry("hostB", "127.0.1.1")}
    with pytest.raises(ConfigError) as err:
        rc.check_reachable(entries, "gloo")
    assert str(err.value) == (
        "ranks [1] would listen on a loopback address that the other hosts cannot reach: rank 0 on hostA uses "
        "10.0.0.1 (host name), rank 1 on hostB uses 127.0.1.1 (host name); set GLOO_SOCKET_IFNAME to the network "
        "interface that links the hosts, on every host")
    rc.check_reachable({0: entry("hostA", "127.0.0.1"), 1: entry("hostA", "127.0.0.1")}, "gloo")  # one host: fine
    rc.check_reachable({0: entry("a", "10.0.0.1"), 1: {"host": "b", "address": "interface veth1",
                                                      "via": "GLOO_SOCKET_IFNAME"}}, "gloo")


def test_chosen_address_follows_the_variable(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "veth1")
    assert rc.chosen_address("gloo")["address"] == "interface veth1"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    assert rc.chosen_address("gloo")["via"] == "host name"
    assert rc.interface_variable("nccl") == "NCCL_SOCKET_IFNAME"


def test_missing_ranks_named_within_the_timeout():
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=5))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"ranks \[1, 2\] did not reach the rendezvous within 1 s"):
        rc.exchange_addresses(store, 0, 3, "gloo", 1.0)
    assert time.monotonic() - start < 5
    store.set(rc.ADDRESS_KEY.format(rank=1), json.dumps(entry("h", "10.0.0.2")))
    store.set(rc.ADDRESS_KEY.format(rank=2), json.dumps(entry("h", "10.0.0.3")))
    assert rc.exchange_addresses(store, 0, 3, "gloo", 1.0)[2]["address"] == "10.0.0.3"


def test_stalled_group_ends_the_rank_with_one_line():
    code = ("import time; from kiln.distributed.rendezvous_check import stall_watchdog\n"
            "entries = {0: {'host': 'a', 'address': '10.0.0.1', 'via': 'host name'}, "
            "1: {'host': 'b', 'address': '192.168.9.9', 'via': 'host name'}}\n"
            "with stall_watchdog(0.5, 1, entries, 'gloo'):\n    time.sleep(30)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and time.monotonic() - start < 20
    assert proc.stderr.strip() == (
        "kiln: error: rank 1: the process group did not form within 0.5 s (KILN_DIST_INIT_TIMEOUT): rank 0 on a uses "
        "10.0.0.1 (host name), rank 1 on b uses 192.168.9.9 (host name); if the hosts cannot reach these addresses, "
        "set GLOO_SOCKET_IFNAME to the interface that links them, on every host")
