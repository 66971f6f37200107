"""`vitrail cluster up`, `submit` and `jobs` end to end, on a real head node's Jobs API."""

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml

from vitrail import checkpoints
from vitrail.launch import submit
from vitrail.launch.cli import main
from vitrail.launch.lock import run_dir_lock

from conftest import tiny_config_tree
from listeners import off_loopback, watch_listeners


def _printed(capsys, *argv) -> str:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture
def head_node(capsys):
    """A `vitrail cluster up` head node on a free, non-default dashboard port; `cluster down` after."""
    port = submit._free_port()
    printed = _printed(capsys, "cluster", "up", "--num-cpus", "2", "--dashboard-port", str(port))
    address = f"http://127.0.0.1:{port}"
    assert address in printed
    try:
        yield port, address
    finally:
        main(["cluster", "down", "--dashboard-port", str(port)])
        shutil.rmtree(submit.cluster_dir(port), ignore_errors=True)


def _wait_for_end(capsys, job_id, address, timeout=420) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _printed(capsys, "jobs", "status", job_id, "--address", address).strip()
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def test_submitted_job_trains_evaluates_and_cluster_down_stops_only_its_node(
        ray_cluster, head_node, fashion_shards, tmp_path, capsys):
    port, address = head_node
    run_dir = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_tree(fashion_shards, run_dir, optim={"max_steps": 4}, run={"precision": "fp32"})))

    # A run dir another run holds is refused at submission, naming the holder.
    with run_dir_lock(run_dir):
        assert main(["submit", str(recipe), "--address", address]) == 2
        assert f"run dir {run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()}" in capsys.readouterr().err

    printed = _printed(capsys, "submit", str(recipe), "run.log_every=1", "--address", address)
    job_id = re.search(r"submitted job (\S+)", printed).group(1)
    assert f"run dir: {run_dir}" in printed
    # The head's processes and their descendants (the job's driver, its Ray Train worker): every
    # listener stays on 127.0.0.1, the worker's torch.distributed store included.
    with watch_listeners(lambda: submit._recorded_processes(port)) as listeners:
        state = _wait_for_end(capsys, job_id, address)
    assert any("RayTrainWorker" in name for _, _, name in listeners), listeners
    assert not off_loopback(listeners), off_loopback(listeners)
    logs = _printed(capsys, "jobs", "logs", job_id, "--address", address)
    assert state == "SUCCEEDED", logs
    # The job pretrained, then ran the k-NN eval on the config's eval shards, with baselines.
    assert f"run dir: {run_dir}" in logs and "weighted k-NN (k=" in logs and "| raw pixels | 784 |" in logs
    # A head on this machine runs the job with the submitter's interpreter, not whatever `python` is on PATH.
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED\s+{re.escape(sys.executable)} -m vitrail.launch.cli pretrain",
                     _printed(capsys, "jobs", "list", "--address", address), re.MULTILINE)

    # Its results are in the run dir the config names, not in the job's scratch working dir.
    assert checkpoints.latest_step(run_dir) == 4
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    knn = json.loads((run_dir / "results.json").read_text())["knn"]
    assert {row["features"] for row in knn} == {"raw pixels", "random init", "pretrained (step 4)"}

    head = submit._recorded_processes(port)
    assert head and all(process.is_running() for process in head)
    assert "stopped the Ray head node" in _printed(capsys, "cluster", "down", "--dashboard-port", str(port))
    assert not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE for process in head)
    assert not submit._state_file(port).exists()
    assert "was running" in _printed(capsys, "cluster", "down", "--dashboard-port", str(port))
    # The other Ray cluster on this machine (this test process's) did not go down with it.
    assert ray_cluster.get(ray_cluster.remote(lambda: 41 + 1).remote()) == 42


class _JobsAPI(http.server.BaseHTTPRequestHandler):
    """Just enough of a Jobs API for `jobs list`: the version check and an empty job list."""
    authorizations: list = []

    def do_GET(self):
        _JobsAPI.authorizations.append(self.headers.get("Authorization"))
        body = json.dumps({"ray_version": "2.60.0", "version": "4"} if self.path == "/api/version" else []).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def jobs_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JobsAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_jobs_client_sends_the_ray_token_from_where_ray_keeps_it(jobs_api, tmp_path):
    """Ray's token-auth docs: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token;
    an explicit RAY_AUTH_MODE is left to Ray's own client. Each `jobs list` runs in a fresh process: once
    a process's Ray runs in token mode (a test's cluster), Ray's client adds the token itself."""
    base = {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH_")}

    def sent(**variables) -> tuple[set, str]:
        _JobsAPI.authorizations.clear()
        listed = subprocess.run([sys.executable, "-c", f"from vitrail.launch import submit; print(submit.list_jobs({jobs_api!r}))"],
                                env={**base, "HOME": str(tmp_path), **variables}, capture_output=True, text=True)
        return set(_JobsAPI.authorizations), listed.stderr

    assert sent()[0] == {None}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert sent()[0] == {"Bearer from-home"}
    (tmp_path / "named").write_text("from-path")
    assert sent(RAY_AUTH_TOKEN_PATH=str(tmp_path / "named"))[0] == {"Bearer from-path"}
    assert sent(RAY_AUTH_TOKEN_PATH=str(tmp_path / "named"), RAY_AUTH_TOKEN="from-variable")[0] == {"Bearer from-variable"}
    assert sent(RAY_AUTH_TOKEN="from-variable", RAY_AUTH_MODE="disabled")[0] == {None}
    authorizations, errors = sent(RAY_AUTH_TOKEN_PATH=str(tmp_path / "absent"))
    assert not authorizations and f"RAY_AUTH_TOKEN_PATH names {tmp_path / 'absent'}, which does not exist" in errors
