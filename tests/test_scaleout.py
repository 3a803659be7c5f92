"""Scale-out on existing engines: several processes creating one store, extract under torchrun (2 CPU
ranks ≡ 1 process; --overwrite resets once), and DDP training under torchrun (2 ranks ≡ 1 process
with the same global batch; an interrupted DDP run resumes exactly).

torchrun is launched as ``python -m torch.distributed.run --standalone`` (a free port of its own, no
torchrun script needed), in its three forms: ``-m boxrefine.shared.cli``, the ``boxrefine`` console
script (``--no-python``) and a script (``tests/torchrun_entry.py``, which injects a signal or a wait
into one rank).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, invoke, make_config, write_config
from test_crash_and_shards import _assert_stores_equal

from boxrefine.extract.run import run_extract
from boxrefine.shared.store import StoreError, open_store

# ------------------------------------------------------------------------------------ concurrent creation

_CREATE_RACE = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from boxrefine.shared.config import load_config
    from boxrefine.shared.records import load_coco
    from boxrefine.shared.store import FeatureStore, identity_for

    cfg_path, base, me, n_procs, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
        int(sys.argv[5])
    cfg = load_config(Path(cfg_path))
    identity = identity_for(cfg, "random-init:seed=0")
    recs = {s: load_coco(cfg.data.splits[s].annotations) for s in cfg.data.splits}
    (base / f"ready-{me}").touch()
    while len(list(base.glob("ready-*"))) < n_procs:
        time.sleep(0.01)
    t_base = max(p.stat().st_mtime for p in base.glob("ready-*")) + 0.5  # the same on every process
    errors = []
    for k in range(rounds):
        t = t_base + 0.25 * k
        while time.time() < t - 0.005:
            time.sleep(0.001)
        while time.time() < t:  # spin the last milliseconds: start together
            pass
        cfg.store.path = str(base / f"store-{k}.zarr")
        try:
            store = FeatureStore.open_or_create(cfg.store, identity, {}, cfg.to_dict())
            for s, r in recs.items():
                store.layout_split(s, r.images, {"path": "x", "sha256": r.sha256}, "images", 160)
        except Exception as e:
            errors.append(f"round {k}: {type(e).__name__}: {e}")
    print(json.dumps(errors))
""")


@pytest.mark.slow
def test_processes_creating_one_fresh_store_at_once(demo_root, tmp_path):
    """Several processes create the same fresh store at the same moment, many times over. zarr checks
    for a group and then creates it, so the loser of that race got ContainsGroupError (measured on the
    code before the fix: 1-3 of 40 rounds with 2 processes)."""
    cfg_path = write_config(tmp_path / "cfg.yaml", demo_root, tmp_path / "unused.zarr")
    base = tmp_path / "stores"
    base.mkdir()
    n_procs, rounds = 3, 30
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE_RACE, str(cfg_path), str(base), str(i), str(n_procs),
                               str(rounds)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(n_procs)]
    outs = [p.communicate(timeout=300) for p in procs]
    errors = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        errors += json.loads(out.strip().splitlines()[-1])
    assert not errors, errors
    # every store came out whole: attributes, and the layout one process alone computes
    cfg = make_config(demo_root, tmp_path / "alone.zarr")
    from boxrefine.shared.records import load_coco
    from boxrefine.shared.store import FeatureStore, identity_for

    alone = FeatureStore.open_or_create(cfg.store, identity_for(cfg, "random-init:seed=0"), {}, cfg.to_dict())
    for s in cfg.data.splits:
        r = load_coco(cfg.data.splits[s].annotations)
        alone.layout_split(s, r.images, {"path": "x", "sha256": r.sha256}, "images", 160)
    for k in range(rounds):
        st = open_store(str(base / f"store-{k}.zarr"))
        assert st.identity == alone.identity and st.splits == alone.splits
        for s in st.splits:
            np.testing.assert_array_equal(st.split(s).keys(), alone.split(s).keys())
            assert st.split(s).group.attrs["layout"] == alone.split(s).group.attrs["layout"]


# ------------------------------------------------------------------------------------ torchrun launches

ENTRY = REPO / "tests" / "torchrun_entry.py"


def _console_script() -> list[str]:
    """The ``boxrefine`` console script as torchrun runs it (``--no-python``), else the module form."""
    script = Path(sys.executable).with_name("boxrefine")
    found = str(script) if script.is_file() else shutil.which("boxrefine")
    return ["--no-python", found] if found else ["-m", "boxrefine.shared.cli"]


def _torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port of its own) as ``python -m torch.distributed.run``."""
    full_env = {**os.environ, "CI": "true", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)


def _encoded(output: str) -> int:
    """Rows encoded, summed over the summaries every rank prints."""
    return sum(int(m) for m in re.findall(r"^\w+: rows \d+: encoded (\d+),", output, re.M))


@pytest.mark.slow
def test_torchrun_extract_two_ranks_fill_one_store_like_one_process(demo_root, reference_store, tmp_path):
    store = tmp_path / "features.zarr"
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    proc = _torchrun("-m", "boxrefine.shared.cli", "extract", "--config", str(cfg))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "shard-0-of-2" in out and "shard-1-of-2" in out
    assert _encoded(out) == 5  # every row once, by one of the ranks
    _assert_stores_equal(store, reference_store)


def test_overwrite_with_shards_is_refused_and_deletes_nothing(demo_root, reference_store, tmp_path):
    """Separate --shard processes cannot agree on one reset: --overwrite is refused before anything is
    deleted (it used to delete the rows every other shard had written)."""
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    res, out = invoke("extract", "--config", str(cfg), "--shard", "1/2", "--overwrite")
    assert res.exit_code == 1
    assert out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
    assert "--overwrite with --shard 1/2" in out and str(store) in out
    with pytest.raises(StoreError, match="delete the store once"):
        run_extract(make_config(demo_root, store, extract={"shard": "0/2", "overwrite": True}))
    _assert_stores_equal(store, reference_store)


@pytest.mark.slow
def test_torchrun_overwrite_resets_once_while_the_other_rank_waits(demo_root, reference_store, tmp_path):
    """Rank 1 starts late on purpose (once rank 0 committed a row, or waits for it): with the reset
    behind a barrier nothing rank 0 writes is deleted; before, rank 1's own reset deleted rank 0's rows."""
    store = tmp_path / "features.zarr"
    shutil.copytree(reference_store, store)
    cfg = write_config(tmp_path / "cfg.yaml", demo_root, store)
    proc = _torchrun(str(ENTRY), "extract", "--config", str(cfg), "--overwrite",
                     env={"BOXREFINE_TEST_HOLD": f"1:{tmp_path / 'markers'}"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    _assert_stores_equal(store, reference_store)
    assert _encoded(out) == 5  # a fresh store: every row encoded again, once
    assert "rank 0 of 2 reset" in out
