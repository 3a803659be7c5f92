"""Opening the store an extract process writes into, and ``--overwrite`` when several processes fill it.
``--overwrite`` deletes the whole store's content, or with ``--split`` only the named splits.

Every process of a launch opens (or creates) the store itself: creation is safe from several processes
at once (``FeatureStore.open_or_create``). A reset is not: a process that deletes the store deletes the
rows the other processes have written. So ``--overwrite`` resets the store exactly once:

* one process: it resets the store, as always;
* torchrun ranks (WORLD_SIZE > 1): rank 0 resets it while the other ranks wait in a barrier (a gloo
  process group made for this moment only), then every rank opens the fresh store; if rank 0 fails,
  every rank stops with its message;
* ``--shard i/n`` processes (SLURM array tasks, separate shells): refused. They share no process
  group, so nothing tells shard 1 whether shard 0 has already started writing; the store is deleted
  once, by hand, before they start.
"""

from __future__ import annotations

from typing import Any

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.runtime.console import console
from boxrefine.shared.runtime.distributed import ProcessGroup, Ranks
from boxrefine.shared.runtime.shards import parse_shard
from boxrefine.shared.store.feature_store import FeatureStore
from boxrefine.shared.store.identity import StoreIdentity
from boxrefine.shared.store.location import StoreError


def open_output_store(cfg: PipelineConfig, identity: StoreIdentity, checkpoint: dict[str, Any]) -> FeatureStore:
    """The store this process extracts into, reset once when ``extract.overwrite`` asks for it."""
    def open_it(reset: bool) -> FeatureStore:
        return FeatureStore.open_or_create(cfg.store, identity, checkpoint, cfg.to_dict(), overwrite=reset,
                                           splits=cfg.extract.splits)

    if not cfg.extract.overwrite:
        return open_it(False)
    if cfg.extract.shard and (n := parse_shard(cfg.extract.shard)[1]) > 1:
        raise StoreError(f"{cfg.store.path}: --overwrite with --shard {cfg.extract.shard}: each of the {n} shards "
                         "would delete the rows the others write, and separate shard processes cannot agree on one "
                         "reset; delete the store once before starting them (under torchrun, rank 0 resets it "
                         "while the other ranks wait)")
    ranks = Ranks.from_env()
    if ranks.world == 1:
        return open_it(True)
    with ProcessGroup() as pg:  # gloo on every device: it is only a barrier
        store = pg.main_first(lambda: open_it(True))
    if store is not None:
        console.print(f"--overwrite: rank 0 of {ranks.world} reset {cfg.store.path} while the other ranks waited",
                      markup=False)
        return store
    return open_it(False)
