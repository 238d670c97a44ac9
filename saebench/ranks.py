"""The processes of one torchrun launch: joining its process group, who this process is, exchanging objects.

`torchrun --nproc-per-node N -m saebench train|run ...` starts N processes with RANK, LOCAL_RANK and
WORLD_SIZE in their environment; `init_from_environment` joins them into torch.distributed's default group
(gloo on the CPU, NCCL on CUDA, each rank on cuda:LOCAL_RANK).  Without torchrun (or with one process)
nothing is joined and every helper here answers as the only process.  Training splits its steps over the
group (`saebench.train.distributed`); evaluation splits its checkpoints (`saebench.sharded`).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist


class OutOfStep(Exception):
    """The ranks reached different exchanges (one skipped a step the others took): the run cannot go on."""


def launched_ranks() -> int:
    """How many processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes shared files and prints."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def init_from_environment(device: str, timeout: timedelta | None = None) -> str:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on CUDA, else
    gloo.  Returns the device this rank works on ('cuda' becomes cuda:LOCAL_RANK).  Without torchrun (or
    with one process) nothing happens and `device` comes back as given.  `timeout`: how long a collective
    waits for the slowest rank (torch's default, 30 minutes, when None)."""
    if launched_ranks() <= 1 or not dist.is_available():
        return device
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(_leave)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_columns(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's (rows, m) `tensor` side by side: (rows, world m), in rank order (on every rank)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=1)


class Group:
    """The default group as evaluation uses it: rank, world, and `gather` (every rank gets every rank's
    object).  Each exchange names its step; ranks that reach different steps raise `OutOfStep` instead of
    pairing one step's objects with another's."""

    def __init__(self):
        self.rank, self.world = rank(), world_size()

    def gather(self, step: str, obj: object) -> list:
        """Every rank's `obj` for `step`, in rank order (on every rank)."""
        parts: list = [None] * self.world
        dist.all_gather_object(parts, (step, obj))
        steps = {s for s, _ in parts}
        if steps != {step}:
            raise OutOfStep(
                f"rank {self.rank} is at {step!r} while others are at {sorted(steps - {step})}; a rank "
                "failed half-way through a step: see the other ranks' errors above"
            )
        return [o for _, o in parts]
