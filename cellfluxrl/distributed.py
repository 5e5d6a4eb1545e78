"""Process-group plumbing for ``torchrun`` (DDP): NCCL on CUDA, gloo on CPU; one process otherwise.

Under ``torchrun --nproc_per_node N`` the environment holds ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); :func:`init_distributed` reads them. Without
them everything runs as rank 0 of 1 and the collectives below are no-ops.
"""

from __future__ import annotations

import os
import re
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


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|gpu)(:\d+)?)$")
DEVICE_WORDS = "auto, cpu, cuda, cuda:N, mps or gpu (= cuda)"


def normalise_device(spec: str | torch.device) -> str:
    """A device as the user wrote it -> its canonical word: ``" GPU:1"`` -> ``"cuda:1"``, ``"Auto"`` -> ``"auto"``.

    Raises:
        CellfluxError: ``spec`` is not one of auto, cpu, cuda, cuda:N, mps, gpu, gpu:N (one line naming it).
    """
    text = str(spec).strip().lower()
    if not DEVICE_PATTERN.match(text):
        raise CellfluxError(f"device {str(spec)!r}: not a device; use {DEVICE_WORDS}")
    return text.replace("gpu", "cuda")


def device_problem(device: str, cuda_count: int, mps_available: bool, local_rank: int = 0) -> str | None:
    """Why a canonical ``device`` (``normalise_device``, not ``auto``) cannot run here, or None if it can.

    Pure: the machine is described by its number of CUDA devices and whether MPS is available. A bare
    ``cuda`` means device ``local_rank`` (each torchrun process takes its own GPU).

    Returns:
        e.g. ``"this machine has no CUDA device 3 (it has 2: cuda:0 to cuda:1)"``, or None.
    """
    kind, _, index = device.partition(":")
    if kind == "mps":
        return None if mps_available else "this machine has no MPS (Apple GPU) device"
    if kind != "cuda":
        return None
    wanted = int(index) if index else local_rank
    if wanted < cuda_count:
        return None
    if not index and local_rank == 0:
        return "this machine has no CUDA device"
    have = "none" if cuda_count == 0 else f"{cuda_count}: cuda:0" + (f" to cuda:{cuda_count - 1}" if cuda_count > 1 else "")
    rank = "" if index else f" for local rank {local_rank}"
    return f"this machine has no CUDA device {wanted}{rank} (it has {have})"


def env_local_rank() -> int:
    """This process's ``LOCAL_RANK`` under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_unavailable(device: str, rank: int = 0) -> str | None:
    """:func:`device_problem` of a canonical ``device`` on this machine (asks torch what it has)."""
    mps = getattr(torch.backends, "mps", None)
    return device_problem(device, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                          bool(mps is not None and mps.is_available()), rank)


def pick_device(spec: str | torch.device | None = "auto", rank: int = 0) -> str:
    """The one device resolver: a user's device word, checked on this machine, as a canonical string.

    ``auto``/``None`` -> ``"cuda"`` when CUDA is available, else ``"cpu"``; ``gpu[:N]`` -> ``cuda[:N]``; a
    bare ``cuda`` stays bare (the caller adds the local rank). An unknown word, or a device this
    machine lacks (``cuda:3`` with fewer GPUs, ``cuda`` without one), is a one-line
    :class:`CellfluxError` naming what was asked, e.g. ``"device cuda:3: this machine has no CUDA
    device 3 (it has none)"``. The CLI's ``--device`` type (``commands/params.py``) runs the same checks
    at parse time.
    """
    device = normalise_device("auto" if spec is None else spec)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    problem = device_unavailable(device, rank)
    if problem:
        raise CellfluxError(f"device {spec}: {problem}")
    return device


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """:func:`pick_device` as a ``torch.device``; a bare ``cuda`` gets the local rank (``cuda:{local_rank}``)."""
    device = torch.device(pick_device(spec, local_rank))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device | None = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (idempotent) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), env_local_rank()
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


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
