"""Connecting to Ray: a cluster's address, or a one-node cluster kept on 127.0.0.1."""

from __future__ import annotations

import os

# Single-machine runs stay on loopback: Ray's single-machine mode (else Ray swaps 127.0.0.1 for the
# outward address; read when `ray` is first imported), and torch.distributed's own store and sockets.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def init_ray(address: str | None = None, object_store_mb: int | None = None, dashboard: bool = True) -> bool:
    """Connect to `address` (config key ray.address), or start a one-node cluster bound to 127.0.0.1
    with `object_store_mb` of object store; False when Ray was already initialised in this process.
    Call it before importing `ray` elsewhere."""
    if not address:
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING")
        return True
    object_store = object_store_mb * 2**20 if object_store_mb else None
    # address "local": a new cluster even when `ray start` recorded one in /tmp/ray (with None, Ray
    # would join that one instead, and refuse num_cpus).
    ray.init(
        address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard, dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1", object_store_memory=object_store, logging_level="WARNING",
        runtime_env={"env_vars": dict(LOOPBACK_ENV)},
    )
    return True
