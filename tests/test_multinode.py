"""A real three-node Ray cluster whose worker nodes cannot see the head's files (tests/netns_cluster.py),
with shards and run dir in a real S3 server on the head's address: the preflight refuses head-local
paths naming node and path, and `vitrail submit` of an s3:// config pretrains, survives losing the
node that hosts rank 0, then evaluates into the bucket."""

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from vitrail import checkpoints, storage
from vitrail.launch.cli import main

from conftest import tiny_config_tree
from netns_cluster import HEAD_IP, INTERFACE, SUBNET, network, ray_cluster
from object_storage import s3_server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with network(workers=2) as namespaces, s3_server(host=HEAD_IP) as server:
        server.client().create_bucket(Bucket="vitrail")
        with ray_cluster(namespaces, server.environment(), hidden=str(tmp_path_factory.getbasetemp())) as (nodes, env):
            yield nodes, env, server


@pytest.fixture
def s3_env(cluster, monkeypatch):
    """This process reads the bucket as the nodes do."""
    _, _, server = cluster
    for key, value in server.environment().items():
        monkeypatch.setenv(key, value)


def _driver(cluster, tree, tmp_path) -> subprocess.Popen:
    nodes, env, _ = cluster
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    return subprocess.Popen([sys.executable, "-m", "vitrail.launch.cli", "pretrain", str(recipe), "--address", nodes.address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(shards, run_dir, **sections):
    tree = tiny_config_tree(shards, run_dir, run={"checkpoint_every": 4, "log_every": 1},
                            optim={"epochs": 3, "batch_size": 16, "max_steps": 12, "lr": 0.01},
                            ray={"workers": 1, "cpus_per_worker": 1, "max_failures": 1, "interface": INTERFACE})
    for section, values in sections.items():
        tree[section].update(values)
    return tree


def test_head_local_paths_fail_the_preflight_naming_each_node_and_path(cluster, fashion_shards, tmp_path):
    run_dir = tmp_path / "run"
    driver = _driver(cluster, _tree(fashion_shards, run_dir), tmp_path)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 2, err[-3000:]
    # Raylets of the nodes log to this stderr too (a full disk, on CI), so the error is found by its prefix.
    errors = [line for line in err.splitlines() if line.startswith("vitrail: error: ")]
    assert len(errors) == 1, err[-3000:]
    error = errors[0]
    for node in (f"{SUBNET}.2", f"{SUBNET}.3"):
        assert f"node {node} cannot read the shard index {fashion_shards / 'train' / 'index.json'}" in error, error
        assert f"node {node} cannot see the run dir {run_dir}" in error, error
    assert f"node {HEAD_IP}" not in error  # the head has no CPUs: no task runs there, none was checked
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def _printed(capsys, *argv) -> str:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_submitted_s3_run_survives_losing_the_node_of_rank_0_then_evaluates_into_the_bucket(
        cluster, s3_env, fashion_shards, tmp_path, capsys):
    nodes, _, _ = cluster
    data, run = "s3://vitrail/fashion", "s3://vitrail/runs/node-loss"
    storage.upload_tree(fashion_shards, data)
    tree = _tree(fashion_shards, run)
    tree["data"].update(shards=f"{data}/train", eval_train_shards=f"{data}/train", eval_test_shards=f"{data}/test")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))

    printed = _printed(capsys, "submit", str(recipe), "--address", nodes.dashboard)
    job_id = re.search(r"submitted job (\S+)", printed).group(1)
    assert f"run dir: {run}" in printed

    def status() -> str:
        return _printed(capsys, "jobs", "status", job_id, "--address", nodes.dashboard).strip()

    deadline = time.monotonic() + 300
    while checkpoints.latest_step(run) < 4:
        assert status() in ("PENDING", "RUNNING"), _printed(capsys, "jobs", "logs", job_id, "--address", nodes.dashboard)
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    [rank_0_node] = [node for node in nodes.workers if node.hosts("ray::RayTrainWorker")]
    rank_0_node.kill()
    deadline, state = time.monotonic() + 420, status()
    while state not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {state} after 420 s"
        time.sleep(1)
        state = status()
    logs = _printed(capsys, "jobs", "logs", job_id, "--address", nodes.dashboard)
    assert state == "SUCCEEDED", logs[-5000:]
    # The job's driver ran on the head: it pretrained on the worker nodes, then ran the k-NN eval.
    assert f"run dir: {run}" in logs and "weighted k-NN (k=" in logs and "| raw pixels | 784 |" in logs
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED\s+python -m vitrail.launch.cli pretrain",
                     _printed(capsys, "jobs", "list", "--address", nodes.dashboard), re.MULTILINE)

    assert checkpoints.latest_step(run) == 12  # the configured step count, reached on the other node
    rows = [json.loads(line) for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    steps = [row["step"] for row in rows]
    [restart] = [number for number, row in enumerate(rows) if "resumed_from" in row]
    resumed_from = rows[restart]["resumed_from"]
    # The new worker group started at the newest checkpoint's step: it trained the steps after it, and
    # nothing before it again. Before the restart, the rows the lost node logged up to its last
    # checkpoint or beyond; none is missing.
    assert resumed_from % 4 == 0 and resumed_from >= 4
    assert steps[restart:] == list(range(resumed_from + 1, 13)), steps
    assert steps[:restart] == list(range(1, restart + 1)) and restart >= resumed_from, steps
    assert rows[-1]["data/skipped"] == 0  # every shard was read from the bucket, on both nodes
    # Everything it made is in the bucket the config names, nothing on any node's disk.
    knn = json.loads(storage.read_text(f"{run}/results.json"))["knn"]
    assert {row["features"] for row in knn} == {"raw pixels", "random init", "pretrained (step 12)"}
