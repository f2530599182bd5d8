"""Torch's rendezvous store on 127.0.0.1 when every Ray node is this machine.

Ray Train's torch backend has rank 0 open torch's ``TCPStore`` (the key-value store the ranks
meet at before DDP's collectives) at ``MASTER_ADDR:MASTER_PORT``; torch 2.13's store listens on
every interface (``[::]``) whatever MASTER_ADDR says, so a private raygan job was reachable from
the network for its whole length. The store accepts an already-listening socket instead
(``master_listen_fd``): rank 0 binds one on 127.0.0.1, and the backend below builds the process
group on that store. Only for clusters whose nodes all run on 127.0.0.1 (raygan's private Ray,
services.launch.init_ray); on a real cluster the ranks meet across machines, as Ray sets up.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"
_listening: list[socket.socket] = []  # rank 0's store socket, kept open for the store's life


def all_nodes_on_loopback() -> bool:
    """Whether every live node of the connected Ray runs on 127.0.0.1 (so on this machine)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") == LOOPBACK for n in nodes)


def _open_store_socket() -> int:
    """On rank 0: a socket listening on 127.0.0.1 for the store; returns its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    _listening.append(sock)
    port = sock.getsockname()[1]
    # Anything that reads the usual variables (torch's own helpers, user code) finds the store.
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    return port


def _join(backend: str, world_rank: int, world_size: int, port: int, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray's own backend: a collective that times out fails instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_rank == 0:
        store = dist.TCPStore(
            LOOPBACK,
            port,
            world_size,
            is_master=True,
            timeout=timeout,
            master_listen_fd=_listening[-1].fileno(),
        )
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(
        backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        backend = backend_config.backend or "gloo"
        port = worker_group.execute_single(0, _open_store_socket)
        worker_group.execute(_set_torch_distributed_env_vars)
        world = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join,
                    backend=backend,
                    world_rank=rank,
                    world_size=world,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group meets at a store on 127.0.0.1."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend
