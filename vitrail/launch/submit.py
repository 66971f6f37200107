"""Ray Jobs: start a local head node, submit a pretraining run, list, follow and stop jobs.

The Jobs API runs arbitrary code unauthenticated, so the local head binds its dashboard and
Jobs API to 127.0.0.1; reaching another cluster takes an explicit `--address`. A job gets
only the variables named here: secrets such as WANDB_API_KEY come from the cluster's own
environment, never from the submitter's config or logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

import vitrail
from vitrail.cluster import LOOPBACK_ENV
from vitrail.errors import VitrailError
from vitrail.launch.lock import check_free

if TYPE_CHECKING:  # the training modules pull in torch: `vitrail shard` and `jobs` start faster without them
    from vitrail.config import Config

LOCAL_ADDRESS = "http://127.0.0.1:8265"


def _ray_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_dir(dashboard_port: int) -> Path:
    """The head node's own Ray temp dir (sessions, logs, sockets) and the state `cluster down` reads;
    the dashboard port names the cluster, as it is the one port a user must know."""
    return Path(tempfile.gettempdir()) / f"vitrail-cluster-{dashboard_port}"


def _state_file(dashboard_port: int) -> Path:
    return cluster_dir(dashboard_port) / "vitrail-cluster.json"


def _recorded_processes(dashboard_port: int) -> list:
    """The head's processes recorded at `cluster up` that still run (a reused pid has another start time)."""
    path = _state_file(dashboard_port)
    if not path.exists():
        return []
    alive = []
    for pid, started in json.loads(path.read_text())["processes"]:
        with suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() == started:
                alive.append(process)
    return alive


def cluster_up(num_cpus: int | None = None, dashboard_port: int = 8265) -> str:
    """Start a Ray head node on 127.0.0.1 (dashboard and Jobs API on 127.0.0.1); returns its Jobs address.

    The node gets its own temp dir and free ports (not Ray's fixed 6379, 10001 and 52365), so it runs beside
    any other Ray cluster on the machine, and its processes are recorded for `cluster_down`.
    """
    if _recorded_processes(dashboard_port):
        raise VitrailError(f"a vitrail cluster already runs with its dashboard on port {dashboard_port}; "
                           f"stop it with `vitrail cluster down --dashboard-port {dashboard_port}`")
    folder = cluster_dir(dashboard_port)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **LOOPBACK_ENV}
    command = _ray_command("start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus or os.cpu_count()}",
                           f"--temp-dir={folder}", "--port=0", f"--ray-client-server-port={_free_port()}",
                           f"--dashboard-agent-listen-port={_free_port()}",
                           "--disable-usage-stats")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise VitrailError(f"`{shlex.join(command)}` failed:\n{done.stdout}{done.stderr}")
    gcs_address = (folder / "ray_current_cluster").read_text().strip()
    # Every head process names this node's temp dir or GCS address on its command line (whole: the
    # temp dir of port 84 is a prefix of port 8400's); workers, agents and job drivers started later
    # are their descendants.
    ours = re.compile(rf"({re.escape(str(folder))}(?![^/\s])|{re.escape(gcs_address)}(?!\d))")
    own = [[process.pid, process.info["create_time"]] for process in psutil.process_iter(["cmdline", "create_time"])
           if ours.search(" ".join(process.info["cmdline"] or ()))]
    _state_file(dashboard_port).write_text(json.dumps({"gcs_address": gcs_address, "processes": own}))
    return f"http://127.0.0.1:{dashboard_port}"


def cluster_down(dashboard_port: int = 8265, grace_seconds: float = 10) -> int:
    """Stop the head node `cluster_up` started on `dashboard_port`, and only it: its recorded
    processes and their descendants (workers, job drivers), never another Ray cluster the way a
    bare `ray stop` would. Returns how many processes were stopped."""
    heads = _recorded_processes(dashboard_port)
    processes = {process.pid: process for process in heads}
    for head in heads:
        with suppress(psutil.NoSuchProcess):
            processes.update({child.pid: child for child in head.children(recursive=True)})
    for process in processes.values():
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, stubborn = psutil.wait_procs(list(processes.values()), timeout=grace_seconds)
    for process in stubborn:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(stubborn, timeout=grace_seconds)
    _state_file(dashboard_port).unlink(missing_ok=True)
    return len(processes)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    headers = _auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as error:  # connection errors come in several types
        raise VitrailError(f"cannot reach the Ray Jobs API at {address}: {error}; start one with `vitrail cluster up`") from None


def _auth_headers() -> dict[str, str]:
    """The Ray token as a bearer header, from where Ray's token-auth docs say a client finds it:
    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token. `ray start`
    turns token auth on when that file exists, but Ray's Jobs client sends the token only when
    RAY_AUTH_MODE=token; where RAY_AUTH_MODE is set at all, Ray's client follows it alone."""
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        named = os.environ.get("RAY_AUTH_TOKEN_PATH")
        path = Path(named) if named else Path.home() / ".ray" / "auth_token"
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            if named:
                raise VitrailError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(config: Config, address: str = LOCAL_ADDRESS, evaluate: bool = True) -> str:
    """Submit `config` as a Ray Job that pretrains (then runs the k-NN eval when eval shards are set)."""
    config.make_paths_absolute()  # the job runs in a scratch working dir
    check_free(config.run.dir)  # the job's `pretrain` takes the lock; a run holding it fails the submission now
    on_this_machine = any(host in address for host in ("127.0.0.1", "localhost"))
    # A head on this machine is `vitrail cluster up`'s, started from this interpreter's environment;
    # on another cluster, its own `python` (whatever a bare `python` on this machine's PATH may be).
    python = f"{shlex.quote(sys.executable) if on_this_machine else 'python'} -m vitrail.launch.cli"
    entrypoint = f"{python} pretrain config.yaml --address auto"
    if evaluate and config.data.eval_train_shards and config.data.eval_test_shards:
        entrypoint += f" && {python} eval knn {shlex.quote(config.run.dir)} --baselines"
    env_vars = {**(LOOPBACK_ENV if on_this_machine else {}), "PYTHONUNBUFFERED": "1"}
    client = _client(address)
    # The working dir is uploaded at submission, so the local copy is needed only until then.
    with tempfile.TemporaryDirectory(prefix="vitrail-job-") as staging:
        (Path(staging) / "config.yaml").write_text(config.to_yaml())
        runtime_env = {"working_dir": staging, "py_modules": [str(Path(vitrail.__file__).parent)], "env_vars": env_vars}
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def list_jobs(address: str = LOCAL_ADDRESS) -> list[dict]:
    return [{"id": job.submission_id, "status": str(job.status.value), "entrypoint": job.entrypoint}
            for job in _client(address).list_jobs() if job.submission_id]


def logs(job_id: str, address: str = LOCAL_ADDRESS, follow: bool = False) -> None:
    client = _client(address)
    if not follow:
        print(client.get_job_logs(job_id), end="")
        return

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def status(job_id: str, address: str = LOCAL_ADDRESS) -> str:
    return str(_client(address).get_job_status(job_id).value)


def stop(job_id: str, address: str = LOCAL_ADDRESS) -> bool:
    return _client(address).stop_job(job_id)
