"""Atomic writes (one helper for every file outside the store) and the top-k checkpoint saver."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from boxrefine.shared.model.checkpoint import CKPT_FORMAT, load_checkpoint
from boxrefine.shared.runtime.fileio import atomic_write, atomic_write_json
from boxrefine.train.checkpoints import CheckpointSaver


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    """Several threads rewrite one file: every read sees one writer's whole content, and no temp file
    is left (a fixed temp name shared by two writers would interleave or fail)."""
    path = tmp_path / "boxes.json"
    atomic_write_json(path, {"writer": -1, "data": [0] * 1000})
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(40):
                atomic_write_json(path, {"writer": w, "data": [i] * 1000})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        doc = json.loads(path.read_text())  # never torn
        assert len(set(doc["data"])) == 1 and len(doc["data"]) == 1000
        seen.add(doc["writer"])
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["boxes.json"]


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("old\n")

    def boom(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, boom)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def _payload(epoch: int):
    return lambda saver_state: {"format": CKPT_FORMAT, "refiner": {"w": torch.tensor([float(epoch)])},
                                "state": {"epoch": epoch, "saver": saver_state}}


def _epochs_on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("epoch_*.pt"))


def test_saver_keeps_last_best_and_top_k(tmp_path: Path) -> None:
    """timm's CheckpointSaver policy: last always, best by metric, epoch files only for the top k."""
    saver = CheckpointSaver(tmp_path, keep_top_k=2)
    for epoch, metric in enumerate([0.5, 0.7, 0.6, 0.8, 0.4], start=1):
        saver.save(_payload(epoch), epoch, metric)
    assert _epochs_on_disk(tmp_path) == ["epoch_002.pt", "epoch_004.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["state"]["epoch"] == 4
    assert load_checkpoint(tmp_path / "last.pt")["state"]["epoch"] == 5
    saver.save(_payload(6), 6, None)  # not validated: only last.pt
    assert load_checkpoint(tmp_path / "last.pt")["state"]["epoch"] == 6
    assert _epochs_on_disk(tmp_path) == ["epoch_002.pt", "epoch_004.pt"]

    # the bookkeeping travels in the checkpoint: a resumed saver prunes as the first would have
    resumed = CheckpointSaver(tmp_path, 2, load_checkpoint(tmp_path / "last.pt")["state"]["saver"])
    resumed.save(_payload(7), 7, 0.75)
    assert _epochs_on_disk(tmp_path) == ["epoch_004.pt", "epoch_007.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["state"]["epoch"] == 4

    none = CheckpointSaver(tmp_path / "k0", keep_top_k=0)
    (tmp_path / "k0").mkdir()
    none.save(_payload(1), 1, 0.9)
    assert sorted(p.name for p in (tmp_path / "k0").iterdir()) == ["best.pt", "last.pt"]


def test_saver_links_the_files_of_one_checkpoint(tmp_path: Path) -> None:
    """An epoch's last.pt, best.pt and epoch file are one file under three names (timm's habit), and
    the next last.pt leaves the others as they were."""
    saver = CheckpointSaver(tmp_path, keep_top_k=2)
    saver.save(_payload(1), 1, 0.5)
    inode = {n: (tmp_path / n).stat().st_ino for n in ("last.pt", "best.pt", "epoch_001.pt")}
    assert len(set(inode.values())) == 1 and (tmp_path / "last.pt").stat().st_nlink == 3
    saver.save(_payload(2), 2, 0.4)  # validated, neither best nor top 2 — kept as top 2 of 2
    assert load_checkpoint(tmp_path / "best.pt")["state"]["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["state"]["epoch"] == 2
    assert (tmp_path / "best.pt").stat().st_ino == inode["best.pt"] != (tmp_path / "last.pt").stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_001.pt", "epoch_002.pt", "last.pt"]


def test_log_lines_are_not_wrapped_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    """rich wraps at 80 columns by default when it cannot ask a terminal; CI logs must keep one line
    per message, however long the path in it."""
    long = tmp_path / ("a-very-long-folder-name-" * 6) / "pipeline.yaml"
    proc = subprocess.run([sys.executable, "-m", "boxrefine.shared.cli", "extract", "--config", str(long)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "CI": "true"})
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[0].startswith("error: ") and str(long) in lines[0], proc.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    """Checkpoints (and their hard-linked best/epoch names), JSON, logs and PNGs get 0666 less the umask,
    as ``open(path, "w")`` gives: mkstemp's 0600 would hide a shared runs/ from colleagues."""
    import numpy as np

    from boxrefine.shared.data.overlay import write_png
    from boxrefine.shared.runtime.fileio import atomic_append_text

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        atomic_append_text(tmp_path / "metrics.jsonl", "{}\n")
        atomic_append_text(tmp_path / "metrics.jsonl", "{}\n")
        write_png(tmp_path / "vis.png", np.zeros((4, 4, 3), np.uint8))
        saver = CheckpointSaver(tmp_path, keep_top_k=1)
        saver.save(lambda s: {"format": CKPT_FORMAT, "state": s}, epoch=1, metric=0.5)
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("plain.txt", "m.json", "metrics.jsonl", "vis.png", "last.pt", "best.pt", "epoch_001.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n{}\n"
