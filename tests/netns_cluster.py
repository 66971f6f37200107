"""A real multi-node Ray cluster on this machine whose worker nodes share no files with the head.

The head runs in this network namespace on a bridge of its own (10.213.0.1); each worker node runs
in its own network namespace (a veth on the bridge, 10.213.0.2, .3, ...) and its own mount
namespace with a fresh tmpfs over the folder the caller hides (pytest's base temp folder, where
every tmp_path lives), so the head's data and run dirs do not exist there. Only that folder: the
python and the checkout a node runs may themselves live under /tmp (a CI clone). Ray sees three
machines: it gives every node its own address, and traffic goes only to these test hosts. Everything is removed afterwards, also when a step fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SUBNET = "10.213.0"
HEAD_IP = f"{SUBNET}.1"
# Every worker namespace names its veth the same, so one `ray.interface` serves every node.
INTERFACE = "vteth0"
# Dead nodes are noticed in seconds, not Ray's default half minute.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                      "RAY_health_check_timeout_ms": "1000"}
RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 256 * 2**20


def _ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)


@dataclass
class Node:
    ip: str
    namespace: str | None
    process: subprocess.Popen

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def hosts(self, title: str) -> bool:
        """Whether a process of this node runs under the Ray process title `title` (e.g. ray::RayTrainWorker)."""
        for process in self.processes():
            try:
                if " ".join(process.cmdline()).startswith(title):
                    return True
            except psutil.NoSuchProcess:
                continue
        return False

    def kill(self) -> None:
        """The whole node at once, as when a machine goes away: every process Ray started on it."""
        for process in self.processes():
            with _suppress():
                process.kill()
        with _suppress():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class Cluster:
    address: str          # GCS address for `--address`
    dashboard: str        # Jobs API
    head: Node
    workers: list[Node] = field(default_factory=list)


@contextmanager
def _suppress():
    try:
        yield
    except (ProcessLookupError, psutil.NoSuchProcess, subprocess.CalledProcessError):
        pass


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind((HEAD_IP, 0))
        return probe.getsockname()[1]


def _wait_for_nodes(address: str, count: int, env: dict, timeout: float = 180) -> None:
    """Until `count` nodes are alive in the cluster (asked in a subprocess: this process may hold another Ray)."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(node['Alive'] for node in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster at {address} has not {count} nodes: {done.stdout[-500:]}{done.stderr[-2000:]}")
        time.sleep(1)


@contextmanager
def network(workers: int = 2):
    """A bridge holding HEAD_IP in this namespace, and `workers` network namespaces on it; yields their names."""
    tag = f"vt{os.getpid() % 100000}"
    bridge = f"{tag}br"
    with ExitStack() as cleanup:
        _ip("link", "add", bridge, "type", "bridge")
        cleanup.callback(lambda: subprocess.run(["ip", "link", "del", bridge], capture_output=True))
        _ip("addr", "add", f"{HEAD_IP}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        namespaces = []
        for number in range(1, workers + 1):
            namespace, outside = f"{tag}n{number}", f"{tag}v{number}"
            subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
            cleanup.callback(lambda namespace=namespace: subprocess.run(["ip", "netns", "del", namespace], capture_output=True))
            _ip("link", "add", outside, "type", "veth", "peer", "name", INTERFACE, "netns", namespace)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("addr", "add", f"{SUBNET}.{number + 1}/24", "dev", INTERFACE, namespace=namespace)
            _ip("link", "set", INTERFACE, "up", namespace=namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
            namespaces.append(namespace)
        yield namespaces


@contextmanager
def ray_cluster(namespaces: list[str], environment: dict[str, str], hidden: str, cpus_per_worker: int = 2):
    """A head on HEAD_IP (no CPUs: it runs drivers, not tasks) and a worker node in each namespace,
    each in a mount namespace of its own with a tmpfs over `hidden`; `environment` goes to every node
    (the storage credentials a real node has in its own environment). Yields (cluster, the env a
    driver needs)."""
    # `ray start --head` turns token authentication on; nodes and drivers then send ~/.ray/auth_token.
    env = {**os.environ, **environment, **FAST_HEALTH_CHECKS, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
           "RAY_AUTH_MODE": "token",
           # A cluster's nodes run the python vitrail is installed in as `python` (what a submitted job calls).
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    env.pop("RAY_ADDRESS", None)
    with ExitStack() as cleanup:
        port, dashboard = _free_port(), _free_port()
        head_dir = Path(f"/tmp/vt{os.getpid() % 100000}-head")
        cleanup.callback(lambda: subprocess.run(["rm", "-rf", str(head_dir)]))
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--num-cpus=0",
             f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dashboard}", f"--temp-dir={head_dir}",
             f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
             f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster = Cluster(f"{HEAD_IP}:{port}", f"http://{HEAD_IP}:{dashboard}", Node(HEAD_IP, None, head))
        cleanup.callback(cluster.head.kill)
        _wait_for_nodes(cluster.address, 1, env)
        for number, namespace in enumerate(namespaces, start=2):
            ip = f"{SUBNET}.{number}"
            # A private mount namespace: the tmpfs over `hidden` exists for this node only. Its Ray
            # session files go to a folder of its own, outside `hidden`.
            node_dir = Path(f"/tmp/vt{os.getpid() % 100000}-{namespace}")
            cleanup.callback(lambda folder=node_dir: subprocess.run(["rm", "-rf", str(folder)]))
            script = (f"mount --make-rprivate / && mount -t tmpfs tmpfs {hidden} && exec {RAY} start --block "
                      f"--address={cluster.address} --node-ip-address={ip} --num-cpus={cpus_per_worker} "
                      f"--temp-dir={node_dir} --object-store-memory={OBJECT_STORE_BYTES} --disable-usage-stats")
            process = subprocess.Popen(["ip", "netns", "exec", namespace, "unshare", "-m", "sh", "-c", script],
                                       env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            node = Node(ip, namespace, process)
            cleanup.callback(node.kill)
            cluster.workers.append(node)
        _wait_for_nodes(cluster.address, 1 + len(namespaces), env)
        yield cluster, env
