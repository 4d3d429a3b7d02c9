"""Which part of the work this process does, and how the parts meet.

``Ranks.current()`` reads ``torch.distributed`` (set up by Lightning's DDP/FSDP strategies, or by
``torchrun`` for the ``select`` command); one process is rank 0 of 1 and every collective is a no-op.
A Lightning strategy can be given for the broadcast and the barrier (``Ranks.of(trainer.strategy)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def join_launched_group() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment and no process group yet), join the launched
    processes' group, with gloo (the selection is CPU work); True if this call created it (the caller destroys
    it). Without it every process would run the whole selection alone."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo")
    return True


def blocks(sizes: list[int], world: int) -> list[range]:
    """Contiguous blocks of ``len(sizes)`` items, one per rank, each about ``sum(sizes) / world`` in size (an
    item goes to the rank whose share holds its midpoint)."""
    total, out, start, acc = sum(sizes), [], 0, 0
    for r in range(world):
        goal = total * (r + 1) / world
        end = start
        while end < len(sizes) and (acc + sizes[end] / 2 <= goal or r == world - 1):
            acc += sizes[end]
            end += 1
        out.append(range(start, end))
        start = end
    return out


class Ranks:
    """This process's rank among ``world`` and the collectives the selection needs."""

    def __init__(self, rank: int = 0, world: int = 1, broadcast: Callable | None = None,
                 barrier: Callable | None = None):
        self.rank, self.world = rank, world
        self._broadcast, self._barrier = broadcast, barrier

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def of(cls, strategy) -> Ranks:
        """The ranks of a Lightning strategy: its broadcast and barrier."""
        if strategy is None or strategy.world_size == 1:
            return cls()
        return cls(strategy.global_rank, strategy.world_size, broadcast=lambda obj: strategy.broadcast(obj, src=0),
                   barrier=lambda: strategy.barrier("prism-selection"))

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        if self._broadcast is not None:
            return self._broadcast(obj)
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world == 1:
            return
        self._barrier() if self._barrier is not None else dist.barrier()

    def gather_rows(self, part: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's ``part`` ([counts[r], ...] on rank r) concatenated in rank order, on every rank.

        Exact: the values are copied, never reduced. Tensors travel padded to the largest part (gloo and
        NCCL gather equal shapes), on the device the process group uses.
        """
        if self.world == 1:
            return part
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else part.device
        width = max(counts)
        padded = part.new_zeros((width, *part.shape[1:])).to(device)
        padded[: len(part)] = part.to(device)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[:c].cpu() for o, c in zip(out, counts)])
