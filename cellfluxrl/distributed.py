"""Process-group plumbing for ``torchrun`` (DDP): NCCL on CUDA, gloo on CPU; one process otherwise.

Under ``torchrun --nproc_per_node N`` the environment holds ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); :func:`init_distributed` reads them. Without
them everything runs as rank 0 of 1 and the collectives below are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cellfluxrl.errors import CellfluxError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` and ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``/``None`` -> ``cuda:{local_rank}`` if CUDA is available else CPU; ``"cuda"`` (or ``"gpu"``)
    gets the local rank; an unknown spec or CUDA without a GPU is a one-line :class:`CellfluxError`."""
    if spec is None or str(spec) == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(spec, str) and spec.strip().lower().startswith("gpu"):
        spec = "cuda" + spec.strip()[3:]  # "gpu", "gpu:1": CUDA
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise CellfluxError(f"device {spec!r}: use auto, cpu, cuda, cuda:N or gpu (= cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CellfluxError("device cuda requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device | None = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (idempotent) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_main() -> bool:
    """True on rank 0 (and when not distributed)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` itself when not distributed)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, rank order."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_initialized():
        dist.destroy_process_group()
