"""Ranks on several hosts must reach each other over the addresses their process-group backends pick. gloo (and
NCCL's bootstrap) pick the address the host name resolves to unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name an
interface; when that address is one the other hosts cannot reach (a loopback alias from /etc/hosts, an interface
on another network), the ranks used to wait silently until killed.

Before the process group forms, each rank publishes what it will use in the rendezvous store; a world spanning
several hosts in which a rank would use a loopback address is refused at once, and a group that still does not form
within KILN_DIST_INIT_TIMEOUT ends the rank with one line naming every rank's host, address and the variable to set.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import sys
import threading
from typing import Iterator

from kiln.config import ConfigError

ADDRESS_KEY = "kiln/address/{rank}"


def interface_variable(backend: str) -> str:
    return "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"


def chosen_address(backend: str, master_addr: str = "127.0.0.1") -> dict[str, str]:
    """What this rank's backend will use (the interface named by the variable, else the host name's address when it
    can be bound here, else loopback, as gloo decides), and the address and interface this host reaches the
    rendezvous master by: the one to suggest."""
    host = socket.gethostname()
    variable = interface_variable(backend)
    route = route_address(master_addr)
    route_if = interface_of(route) if route else None
    entry = {"host": host, "route": route or "?", "route_if": route_if or "?"}
    ifname = os.environ.get(variable, "").strip()
    if ifname:
        return {**entry, "address": f"interface {ifname}", "via": variable}
    try:
        address = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.bind((address, 0))
    except (OSError, IndexError):
        address = "127.0.0.1"  # gloo's own fallback when the host name's address is not usable here
    return {**entry, "address": address, "via": "host name"}


def route_address(master_addr: str) -> str | None:
    """The local address this host uses to reach `master_addr` (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(address: str) -> str | None:
    """The name of the local network interface holding the IPv4 `address` (Linux), or None."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(raw[20:24]) == address:
                    return name
    except (ImportError, OSError):
        return None
    return None


def several_hosts(entries: dict[int, dict[str, str]]) -> bool:
    """Ranks on more than one host: different host names, or different addresses toward the master (two network
    namespaces, or containers, may share a host name)."""
    return len({e["host"] for e in entries.values()}) > 1 or len({e.get("route") for e in entries.values()}) > 1


def _is_loopback(address: str) -> bool:
    if address == "interface lo":  # the variable naming the loopback interface itself
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # another interface name


def describe_ranks(entries: dict[int, dict[str, str]]) -> str:
    """Each rank's host, the address its backend uses, and the interface that reaches the master."""
    return ", ".join(f"rank {r} on {e['host']} uses {e['address']} ({e['via']}; reaches the master by "
                     f"{e.get('route_if', '?')} {e.get('route', '?')})" for r, e in sorted(entries.items()))


def check_reachable(entries: dict[int, dict[str, str]], backend: str) -> None:
    """Refuse a world spanning several hosts where a rank would use a loopback address no other host can reach."""
    if not several_hosts(entries):
        return
    loopback = sorted(r for r, e in entries.items() if _is_loopback(e["address"]))
    if loopback:
        raise ConfigError(f"ranks {loopback} would listen on a loopback address that the other hosts cannot reach: "
                          f"{describe_ranks(entries)}; set {interface_variable(backend)} to the network interface "
                          "that links the hosts, on every host")


def exchange_addresses(store, rank: int, world_size: int, backend: str, timeout_s: float,
                       master_addr: str = "127.0.0.1") -> dict[int, dict[str, str]]:
    """Publish this rank's address and read every rank's (waiting up to `timeout_s` for all to arrive)."""
    store.set(ADDRESS_KEY.format(rank=rank), json.dumps(chosen_address(backend, master_addr)))
    keys = [ADDRESS_KEY.format(rank=r) for r in range(world_size)]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except Exception as err:  # torch raises a DistStoreError (a RuntimeError) on timeout
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise ConfigError(f"ranks {missing} did not reach the rendezvous within {timeout_s:g} s "
                          "(KILN_DIST_INIT_TIMEOUT sets the limit); check that every host runs the same command "
                          "with the same MASTER_ADDR/MASTER_PORT") from err
    return {r: json.loads(store.get(key)) for r, key in enumerate(keys)}


@contextlib.contextmanager
def stall_watchdog(timeout_s: float, rank: int, entries: dict[int, dict[str, str]], backend: str) -> Iterator[None]:
    """End this rank with one line if the process group has not formed within `timeout_s` (the backend's own
    connect waits far longer, and cannot be interrupted from Python)."""
    done = threading.Event()

    def expire() -> None:
        if done.wait(timeout_s):
            return
        print(f"kiln: error: rank {rank}: the process group did not form within {timeout_s:g} s "
              f"(KILN_DIST_INIT_TIMEOUT): {describe_ranks(entries)}; if the hosts cannot reach these addresses, set "
              f"{interface_variable(backend)} to the interface that links them, on every host", file=sys.stderr,
              flush=True)
        os._exit(1)

    thread = threading.Thread(target=expire, name="kiln-init-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
