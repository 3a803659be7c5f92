"""A torchrun entry script for tests: boxrefine's CLI, with one rank disturbed on purpose.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_entry.py train ...

Read by every rank from the environment; each acts only where the rank matches:

* ``BOXREFINE_TEST_SIGTERM=R:N``: rank R sends itself SIGTERM right after its N-th optimizer step
  (only that rank is signalled: the ranks must still agree on where to stop).
* ``BOXREFINE_TEST_HOLD=R:DIR``: rank R starts only once rank 0 has committed a store row or waits
  for the other ranks (marker files in DIR): a late rank, deterministically, whatever the machine's
  load.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))


def _touch_on_call(owner: object, name: str, marker: Path, before: bool) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapped(*args: object, **kwargs: object) -> object:
        if before:
            marker.touch()
        out = real(*args, **kwargs)
        marker.touch()
        return out

    setattr(owner, name, wrapped)


def _sigterm_after_step(n: int) -> None:
    from boxrefine.train.recipe import TrainRecipe

    real, calls = TrainRecipe._optimizer_step, {"n": 0}

    def stepping(self: TrainRecipe, *args: object, **kwargs: object) -> None:
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)

    TrainRecipe._optimizer_step = stepping  # type: ignore[method-assign]


def _hold(rank: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if RANK == 0:
        import torch.distributed as dist

        from boxrefine.shared.store.split import SplitStore

        _touch_on_call(SplitStore, "commit_row", folder / "rank0-committed", before=False)
        for name in ("init_process_group", "barrier", "broadcast_object_list"):
            _touch_on_call(dist, name, folder / "rank0-waits", before=True)
    elif RANK == rank:
        deadline = time.time() + 600
        while not any((folder / m).exists() for m in ("rank0-committed", "rank0-waits")):
            if time.time() > deadline:
                sys.exit(f"rank {RANK}: rank 0 neither committed a row nor waited within 600 s")
            time.sleep(0.05)


if __name__ == "__main__":
    if spec := os.environ.get("BOXREFINE_TEST_SIGTERM"):
        rank, n = spec.split(":")
        if int(rank) == RANK:
            _sigterm_after_step(int(n))
    if spec := os.environ.get("BOXREFINE_TEST_HOLD"):
        rank, folder = spec.split(":", 1)
        _hold(int(rank), Path(folder))
    from boxrefine.shared.cli.main import main

    main()
