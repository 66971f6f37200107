"""The TCP listeners of a process tree, sampled while it runs: what a run exposes to the network."""

from __future__ import annotations

import ipaddress
import threading
from contextlib import contextmanager, suppress
from typing import Callable, Iterable

import psutil


def listening(processes: Iterable[psutil.Process]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket the processes hold (read from
    /proc/net/tcp and tcp6 through each process's socket inodes, as `ss -ltnp` does)."""
    found = set()
    for process in processes:
        with suppress(psutil.Error):
            name = process.name()
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((connection.laddr.ip, connection.laddr.port, name))
    return found


def tree(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    processes = []
    for root in roots:
        with suppress(psutil.Error):
            processes += [root, *root.children(recursive=True)]
    return processes


@contextmanager
def watch_listeners(roots: Callable[[], Iterable[psutil.Process]], every: float = 0.2):
    """Collects, into the yielded set, the listeners of `roots()` and their descendants until the block ends."""
    seen: set[tuple[str, int, str]] = set()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.update(listening(tree(roots())))
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        seen.update(listening(tree(roots())))


def off_loopback(listeners: set[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Listeners reachable from outside the machine: on 0.0.0.0, ::, or an outward address."""
    return sorted(item for item in listeners if not _loopback(item[0]))


def _loopback(address: str) -> bool:
    address = ipaddress.ip_address(address.split("%")[0])
    # ::ffff:127.0.0.1 is an IPv6 socket bound to IPv4 loopback only.
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)
