"""The TCP listeners of a process tree, sampled while it runs: what a run exposes to the network."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterable

import psutil


def listening(processes: Iterable[psutil.Process]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket the processes hold, as `ss -ltnp`
    finds them: the socket inodes among each process's open files, looked up in the kernel's TCP
    tables of the process's network namespace. Each table is read once per call (psutil's
    `net_connections` reads both per process: 0.2 s of CPU per sample of a Ray node's 21 processes,
    half a core at 5 samples a second, taken from the run being watched)."""
    found, tables = set(), {}
    for process in processes:
        with suppress(psutil.Error, OSError):
            name = process.name()
            namespace = os.readlink(f"/proc/{process.pid}/ns/net")
            if namespace not in tables:
                tables[namespace] = _listening_sockets(process.pid)
            for fd in os.listdir(f"/proc/{process.pid}/fd"):
                with suppress(OSError):
                    target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
                    if target.startswith("socket:[") and (address := tables[namespace].get(int(target[8:-1]))):
                        found.add((*address, name))
    return found


def _listening_sockets(pid: int) -> dict[int, tuple[str, int]]:
    """{socket inode: (address, port)} of the LISTEN rows in /proc/PID/net/tcp and tcp6."""
    sockets = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with suppress(FileNotFoundError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    address, port = fields[1].split(":")
                    # The kernel prints the address as native-endian 32-bit words.
                    packed = b"".join(int(address[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(address), 8))
                    sockets[int(fields[9])] = (socket.inet_ntop(family, packed), int(port, 16))
    return sockets


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
