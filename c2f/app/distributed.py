"""Process-group facts for training under ``torchrun`` (one process when not launched by it)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .devices import resolve_device


class Dist:
    """Rank, world size and device of this process; collectives that are no-ops in a single process."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device(f"cuda:{local}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum(self, values: list) -> list:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a bool tensor) or-ed over processes."""
        if self.world == 1:
            return flag
        t = flag.to(self._comm_device, torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.to(flag.device).bool()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Process 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, barrier: bool = True) -> None:
        """Destroys the process group. With ``barrier``, every process reaches the end before any tears the
        group down: a process that destroyed it and exited while a peer still finished its last collective
        left that peer waiting for ever (seen about one run in six with gloo). On an error path pass False:
        a peer that did not fail may be waiting in another collective, and would meet the barrier there."""
        if self.world > 1 and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
