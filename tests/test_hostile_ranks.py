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


def entry(host: str, address: str, route: str = "10.0.0.9") -> dict[str, str]:
    return {"host": host, "address": address, "via": "host name", "route": route, "route_if": "eth0"}


def test_loopback_address_across_hosts_refused_naming_each_rank():
    entries = {0: entry("hostA", "10.0.0.1", "10.0.0.1"), 1: entry("hostB", "127.0.1.1", "10.0.0.2")}
    with pytest.raises(ConfigError) as err:
        rc.check_reachable(entries, "gloo")
    assert str(err.value) == (
        "ranks [1] would listen on a loopback address that the other hosts cannot reach: rank 0 on hostA uses "
        "10.0.0.1 (host name; reaches the master by eth0 10.0.0.1), rank 1 on hostB uses 127.0.1.1 (host name; "
        "reaches the master by eth0 10.0.0.2); set GLOO_SOCKET_IFNAME to the network interface that links the "
        "hosts, on every host")
    rc.check_reachable({0: entry("hostA", "127.0.0.1"), 1: entry("hostA", "127.0.0.1")}, "gloo")  # one host: fine
    named = {"host": "b", "address": "interface veth1", "via": "GLOO_SOCKET_IFNAME", "route": "10.0.0.2"}
    rc.check_reachable({0: entry("a", "10.0.0.1"), 1: named}, "gloo")
    with pytest.raises(ConfigError, match=r"ranks \[0, 1\] would listen on a loopback"):  # one host name, two hosts
        rc.check_reachable({0: entry("vm", "127.0.0.1", "10.0.0.1"), 1: entry("vm", "127.0.0.1", "10.0.0.2")}, "gloo")


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
            "entries = {0: {'host': 'a', 'address': '10.0.0.1', 'via': 'host name', 'route': '10.0.0.1', "
            "'route_if': 'eth0'}, 1: {'host': 'b', 'address': '192.168.9.9', 'via': 'host name', 'route': "
            "'10.0.0.2', 'route_if': 'eth1'}}\n"
            "with stall_watchdog(0.5, 1, entries, 'gloo'):\n    time.sleep(30)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and time.monotonic() - start < 20
    assert proc.stderr.strip() == (
        "kiln: error: rank 1: the process group did not form within 0.5 s (KILN_DIST_INIT_TIMEOUT): rank 0 on a uses "
        "10.0.0.1 (host name; reaches the master by eth0 10.0.0.1), rank 1 on b uses 192.168.9.9 (host name; reaches "
        "the master by eth1 10.0.0.2); if the hosts cannot reach these addresses, set GLOO_SOCKET_IFNAME to the "
        "interface that links them, on every host")


def _ip(*args: str) -> bool:
    return subprocess.run(["ip", *args], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces linked by a veth pair (10.99.7.1 <-> 10.99.7.2): two hosts that share a host name
    which resolves to loopback, as the issue's setup. Needs root and `ip netns`; skipped otherwise."""
    tag = f"k{os.getpid() % 100000}"
    names = (f"{tag}a", f"{tag}b")
    if os.geteuid() != 0 or not _ip("netns", "add", names[0]):
        pytest.skip("needs root and `ip netns` to make two hosts")
    try:
        ok = (_ip("netns", "add", names[1]) and _ip("link", "add", f"{tag}v0", "type", "veth", "peer", "name",
                                                      f"{tag}v1"))
        for i, ns in enumerate(names):
            ok = ok and _ip("link", "set", f"{tag}v{i}", "netns", ns)
            ok = ok and _ip("-n", ns, "addr", "add", f"10.99.7.{i + 1}/24", "dev", f"{tag}v{i}")
            ok = ok and _ip("-n", ns, "link", "set", f"{tag}v{i}", "up") and _ip("-n", ns, "link", "set", "lo", "up")
        if not ok:
            pytest.skip("could not link two network namespaces")
        yield names, (f"{tag}v0", f"{tag}v1")
    finally:
        for ns in names:
            _ip("netns", "del", ns)


@pytest.fixture(scope="module")
def tp2_engine(tmp_path_factory) -> Path:
    from kiln.cli.main import main as kiln_main

    root = tmp_path_factory.mktemp("tp2")
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--dtype", "float32", "--tp_size", "2", "--output_dir",
                      str(root / "c")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(root / "c"), "--output_dir", str(root / "e"),
                      "--max_input_len", "16", "--max_seq_len", "32", "--no_tune"]) == 0
    (root / "p.csv").write_text("1,2,3\n")
    return root


def torchrun_two_hosts(two_hosts, root: Path, port: int, ifnames: tuple[str, str] | None) -> list[tuple[int, str]]:
    """`torchrun --nnodes 2 -m kiln run` with one node in each namespace; (exit code, output) per node."""
    procs = []
    for node, ns in enumerate(two_hosts[0]):
        env = {**os.environ, "PYTHONPATH": str(REPO), "KILN_DIST_INIT_TIMEOUT": "20"}
        env.pop("GLOO_SOCKET_IFNAME", None)
        if ifnames:
            env["GLOO_SOCKET_IFNAME"] = ifnames[node]
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "10.99.7.1", "--master_port",
               str(port), "-m", "kiln", "run", "--engine_dir", str(root / "e"), "--input_file", str(root / "p.csv"),
               "--max_output_len", "4", "--device", "cpu"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=root))
    return [(p.wait(timeout=120), p.stdout.read()) for p in procs]


def test_two_hosts_without_the_interface_variable_fail_at_once_naming_it(two_hosts, tp2_engine):
    start = time.monotonic()
    results = torchrun_two_hosts(two_hosts, tp2_engine, 29611, None)
    assert time.monotonic() - start < 60 and all(code != 0 for code, _ in results)
    lines = [line for line in results[0][1].splitlines() if line.startswith("kiln run: error:")]
    v0, v1 = two_hosts[1]
    assert len(lines) == 1 and "would listen on a loopback address that the other hosts cannot reach" in lines[0]
    assert f"reaches the master by {v0} 10.99.7.1" in lines[0] and f"reaches the master by {v1} 10.99.7.2" in lines[0]
    assert lines[0].endswith("set GLOO_SOCKET_IFNAME to the network interface that links the hosts, on every host")


def test_two_hosts_with_the_interface_variable_give_one_hosts_tokens(two_hosts, tp2_engine, capsys):
    from kiln.cli.main import main as kiln_main

    results = torchrun_two_hosts(two_hosts, tp2_engine, 29612, two_hosts[1])
    assert [code for code, _ in results] == [0, 0], results
    assert kiln_main(["run", "--engine_dir", str(tp2_engine / "e"), "--input_file", str(tp2_engine / "p.csv"),
                      "--max_output_len", "4", "--device", "cpu"]) == 0
    expected = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Output")]
    assert expected and [line for line in results[0][1].splitlines() if line.startswith("Output")] == expected
