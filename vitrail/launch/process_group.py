"""The Ray Train workers' torch.distributed process group, with its store bound to one address.

Ray Train's own TorchConfig lets rank 0 create the TCPStore from MASTER_ADDR:MASTER_PORT, and
torch's store server then listens on every interface (`*:PORT`) whatever MASTER_ADDR says: an
unauthenticated key-value server reachable from outside the machine. Here rank 0 binds the
listening socket itself, to its node's Ray address (127.0.0.1 on a single-machine run; on a
cluster the address the node was started with, `ray start --node-ip-address`), and hands it to
the store (`master_listen_fd`). gloo and NCCL bind the interface GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME name (`lo` on a single machine, `ray.interface` on a cluster).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend


def _listen() -> tuple[str, int, int]:
    """(address, port, file descriptor) of a socket listening on this node's Ray address only."""
    address = ray.util.get_node_ip_address()
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen()
    port = listener.getsockname()[1]
    return address, port, listener.detach()  # the store owns the descriptor from here on


def _join(backend: str, address: str, port: int, listen_fd: int | None, rank: int, world_size: int, timeout_s: int) -> None:
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundStoreTorchConfig") -> None:
        address, port, listen_fd = worker_group.execute_single(0, _listen)
        if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v1 sets them later, in on_training_start
            worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, ... as Ray Train's backend does
        world_size = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, _join, backend_config.backend, address, port,
                                                   listen_fd if rank == 0 else None, rank, world_size,
                                                   backend_config.timeout_s)
                 for rank in range(world_size)])


class BoundStoreTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose store listens on rank 0's node address only; `backend` must be named."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend
