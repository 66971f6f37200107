"""Ray Jobs: start a local head node, submit a pretraining run, list, follow and stop jobs.

The Jobs API runs arbitrary code unauthenticated, so the local head binds its dashboard and
Jobs API to 127.0.0.1; reaching another cluster takes an explicit `--address`. A job gets
only the variables named here: secrets such as WANDB_API_KEY come from the cluster's own
environment, never from the submitter's config or logs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import vitrail
from vitrail.errors import VitrailError
from vitrail.launch.config import Config
from vitrail.launch.train import LOOPBACK_ENV

LOCAL_ADDRESS = "http://127.0.0.1:8265"


def _ray_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def cluster_up(num_cpus: int | None = None, dashboard_port: int = 8265) -> str:
    """Start a Ray head node on 127.0.0.1 (dashboard and Jobs API on 127.0.0.1); returns its Jobs address."""
    env = {**os.environ, **LOOPBACK_ENV}
    command = _ray_command("start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard_port}", f"--num-cpus={num_cpus or os.cpu_count()}",
                           "--disable-usage-stats")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise VitrailError(f"`{shlex.join(command)}` failed:\n{done.stdout}{done.stderr}")
    return f"http://127.0.0.1:{dashboard_port}"


def cluster_down() -> None:
    subprocess.run(_ray_command("stop"), capture_output=True, text=True, check=False)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as error:  # connection errors come in several types
        raise VitrailError(f"cannot reach the Ray Jobs API at {address}: {error}; start one with `vitrail cluster up`") from None


def submit(config: Config, address: str = LOCAL_ADDRESS, evaluate: bool = True) -> str:
    """Submit `config` as a Ray Job that pretrains (then runs the k-NN eval when eval shards are set)."""
    # The job runs in a scratch working dir: every path it is given must be absolute.
    config.run.dir = str(Path(config.run.dir).resolve())
    for field in ("shards", "eval_train_shards", "eval_test_shards"):
        if getattr(config.data, field):
            setattr(config.data, field, str(Path(getattr(config.data, field)).resolve()))
    staging = Path(tempfile.mkdtemp(prefix="vitrail-job-"))
    (staging / "config.yaml").write_text(config.to_yaml())
    python = "python -m vitrail.launch.cli"
    entrypoint = f"{python} pretrain config.yaml --address auto"
    if evaluate and config.data.eval_train_shards and config.data.eval_test_shards:
        entrypoint += f" && {python} eval knn {shlex.quote(config.run.dir)} --baselines"
    on_this_machine = any(host in address for host in ("127.0.0.1", "localhost"))
    env_vars = {**(LOOPBACK_ENV if on_this_machine else {}), "PYTHONUNBUFFERED": "1"}
    runtime_env = {"working_dir": str(staging), "py_modules": [str(Path(vitrail.__file__).parent)], "env_vars": env_vars}
    return _client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env)


def list_jobs(address: str = LOCAL_ADDRESS) -> list[dict]:
    return [{"id": job.submission_id, "status": str(job.status.value), "entrypoint": job.entrypoint}
            for job in _client(address).list_jobs() if job.submission_id]


def logs(job_id: str, address: str = LOCAL_ADDRESS, follow: bool = False) -> None:
    client = _client(address)
    if not follow:
        print(client.get_job_logs(job_id), end="")
        return
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def status(job_id: str, address: str = LOCAL_ADDRESS) -> str:
    return str(_client(address).get_job_status(job_id).value)


def stop(job_id: str, address: str = LOCAL_ADDRESS) -> bool:
    return _client(address).stop_job(job_id)
