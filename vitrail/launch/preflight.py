"""Before any training worker starts: every node that can run tasks must read the shard index and
read and write the run dir, checked by one small task per node.

A path only the driver's node sees (a local folder on a cluster without a shared filesystem) would
otherwise turn into view tasks counting "missing shards" as skipped samples on the other nodes, and
into checkpoints that a worker group restarted elsewhere cannot find.
"""

from __future__ import annotations

import os
import socket

from vitrail import storage
from vitrail.errors import VitrailError


def _probe(index_url: str, run_dir: str, node: str) -> list[str]:
    """Why this node cannot use the data or the run dir; [] when it can."""
    problems = []
    try:
        storage.read_bytes(index_url)
    except (OSError, VitrailError) as error:
        problems.append(f"node {node} cannot read the shard index {index_url} ({storage.one_line(error)})")
    # The driver wrote config.yaml there: a node that does not see it does not see the run dir, and
    # must not create a folder of its own under the same name.
    if not storage.exists(storage.join(run_dir, "config.yaml")):
        return problems + [f"node {node} cannot see the run dir {run_dir} (no config.yaml there)"]
    marker = storage.join(run_dir, f".preflight-{socket.gethostname()}-{os.getpid()}")
    try:
        storage.write_text(marker, node)
        storage.delete(marker)
    except (OSError, VitrailError) as error:
        problems.append(f"node {node} cannot write the run dir {run_dir} ({storage.one_line(error)})")
    return problems


def check_nodes(index_url: str, run_dir: str) -> None:
    """Fail, naming each node and path, unless every alive node with CPUs reads `index_url` and
    reads and writes `run_dir`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    pending = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
               .remote(index_url, run_dir, node["NodeManagerAddress"]) for node in nodes]
    problems = [problem for found in ray.get(pending) for problem in found]
    if problems:
        raise VitrailError("preflight: " + "; ".join(problems) + ". Every node must reach the data and the run dir: "
                           "use object storage (s3://, gs://) or a filesystem all nodes share")
