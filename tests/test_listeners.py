"""The listener sampler the loopback tests rely on: it must see a socket reachable from outside,
in both address families, or their `not off_loopback(...)` could not fail."""

import socket
import subprocess
import sys
from contextlib import ExitStack

import psutil

from listeners import listening, off_loopback, watch_listeners


def test_listeners_on_every_address_are_found_and_only_loopback_ones_pass():
    with ExitStack() as stack:
        ports = {}
        for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1"),
                                (socket.AF_INET6, "::"), (socket.AF_INET6, "::1")):
            server = stack.enter_context(socket.socket(family))
            server.bind((address, 0))
            server.listen()
            ports[address] = server.getsockname()[1]
        client_port = stack.enter_context(socket.create_connection(("127.0.0.1", ports["127.0.0.1"]))).getsockname()[1]
        found = listening([psutil.Process()])
    name = psutil.Process().name()
    assert {(address, port, name) for address, port in ports.items()} <= found
    assert client_port not in {port for _, port, _ in found}  # a connected socket is no listener
    assert off_loopback(found) == sorted([("0.0.0.0", ports["0.0.0.0"], name), ("::", ports["::"], name)])


def test_watch_follows_children_started_after_it():
    code = "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(2)"
    with watch_listeners(lambda: [psutil.Process()], every=0.1) as seen:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        port = int(child.stdout.readline())
        child.wait()
    assert ("0.0.0.0", port) in {(address, found) for address, found, _ in seen}
