"""torchrun ranks and the few collectives the stages need (docs/architecture.md, "Scale-out").

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. :class:`ProcessGroup` joins the launch's
process group (gloo on CPU, NCCL on CUDA: the backend follows the rank's device) and offers the
collectives boxrefine uses; in a plain process, or a world of one, nothing is initialised and every
collective is the identity, so code calls them unconditionally.

Extract needs no process group (each rank takes its rows, ``extract/plan.py``); it joins one only
for ``--overwrite``, where rank 0 resets the store while the others wait. Train joins one for DDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from boxrefine.shared.errors import BoxrefineError, first_line

T = TypeVar("T")


class DistributedError(BoxrefineError, RuntimeError):
    """Another rank failed; the message is that rank's one-line error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch: (0, 1, 0) outside one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class ProcessGroup:
    """The process group of a torchrun launch (a context manager; leaving it destroys a group it
    made). ``device``: the rank's device (CUDA → NCCL, otherwise gloo). A group that already exists
    (made by the caller) is used and left alone."""

    def __init__(self, device: torch.device | None = None, timeout_s: float | None = None):
        self.ranks = Ranks.from_env()
        self.rank, self.world = self.ranks.rank, self.ranks.world
        cuda = device is not None and device.type == "cuda"
        self.backend = "nccl" if cuda else "gloo"
        # NCCL reduces tensors on the rank's GPU; gloo on the CPU
        self.comm_device = device if cuda else torch.device("cpu")
        self._owned = False
        if self.world > 1 and not dist.is_initialized():
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise DistributedError(f"RANK/WORLD_SIZE make this rank {self.rank} of {self.world}, but "
                                       f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                                       "launch the ranks with torchrun")
            kwargs: dict[str, Any] = {}
            if timeout_s is not None:
                kwargs["timeout"] = timedelta(seconds=timeout_s)
            if cuda:
                torch.cuda.set_device(device)
                kwargs["device_id"] = device
            dist.init_process_group(self.backend, **kwargs)
            self._owned = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
        self._owned = False

    # ---- collectives (identity for a world of one) ------------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Rank 0 runs ``fn`` while the other ranks wait; returns its result on rank 0 (None elsewhere).
        If it fails, every rank raises: rank 0 its own error, the others a one-line
        :class:`DistributedError` quoting it, so no rank waits for one that will never come."""
        if not self.active:
            return fn()
        result: T | None = None
        error: BaseException | None = None
        message = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are told
                error, message = e, first_line(e, 1000)
        message = self.broadcast(message)
        if error is not None:
            raise error
        if message is not None:
            raise DistributedError(f"rank 0 failed: {message}")
        return result

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0 if self.active else bool(flag)

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


