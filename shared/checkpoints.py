"""Training checkpoints: safe loading, and a saver in the style of timm's ``CheckpointSaver``.

A run folder keeps ``last.pt`` (every save), ``best.pt`` (the best validation metric so far) and
``epoch_NNN.pt`` for the top-k epochs by that metric (``train.keep_top_k``); an epoch that drops
out of the top k has its file deleted. Every file is written through
:func:`boxrefine.shared.fileio.atomic_write_bytes`, and loaded with ``weights_only=True``.

Every checkpoint carries ``checksum``: the sha256 of all its tensors (bytes, dtype, shape) and other
values (:func:`content_checksum`). torch's zip reader does not check the tensor records, so a flipped
byte in the weights would otherwise load silently; :func:`load_checkpoint` refuses it in one line.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.fileio import atomic_write_bytes, read_bytes
from boxrefine.shared.refiner import BoxRefiner

CKPT_FORMAT = 2  # 2: a content checksum in every checkpoint


class CheckpointFileError(BoxrefineError, ValueError):
    """A file that is not a usable boxrefine checkpoint; the message names it (one line)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def content_checksum(obj: Any) -> str:
    """``sha256:<hex>`` of a checkpoint's content, its ``checksum`` entry excepted: every tensor's
    bytes with its dtype and shape, every other value by its repr, in key order."""
    h = hashlib.sha256()

    def walk(x: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{where}:{t.dtype}:{tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if not (where == "" and k == "checksum"):
                    walk(x[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        else:
            h.update(f"{where}={x!r};".encode())

    walk(obj, "")
    return f"sha256:{h.hexdigest()}"


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """A checkpoint file's bytes: ``payload`` with its ``checksum``, through ``torch.save``."""
    buf = io.BytesIO()
    torch.save({**payload, "checksum": content_checksum(payload)}, buf)
    return buf.getvalue()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a boxrefine checkpoint with ``weights_only=True`` and check its content checksum;
    one-line errors naming the file."""
    data = read_bytes(path, CheckpointFileError, "checkpoint")
    try:
        ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointFileError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(ck, dict) or "refiner" not in ck or not isinstance(ck.get("format"), int):
        raise CheckpointFileError(f"{path}: not a boxrefine training checkpoint")
    if ck["format"] != CKPT_FORMAT:
        raise CheckpointFileError(f"{path}: checkpoint format {ck['format']} (written by an older boxrefine, "
                                  f"without a checksum); this boxrefine reads format {CKPT_FORMAT}: train again")
    if ck.get("checksum") != content_checksum(ck):
        raise CheckpointFileError(f"{path}: checkpoint content fails its checksum (a flipped byte or a damaged "
                                  "copy); not loaded")
    return ck


def refiner_from_checkpoint(ck: dict[str, Any], path: Path) -> BoxRefiner:
    """The refiner a checkpoint holds, rebuilt from its recorded ``refiner_args`` (so a checkpoint of
    another head architecture loads unchanged), in eval mode on the CPU; CheckpointFileError (one
    line naming the file) when it cannot be rebuilt."""
    args = ck.get("refiner_args")
    if not isinstance(args, dict):
        raise CheckpointFileError(f"{path}: no refiner_args in the checkpoint")
    # checkpoints from before refiner.norm / refiner.head existed hold the box head without a norm
    args = {"norm": "none", "head": "box", **args}
    try:
        refiner = BoxRefiner(**args)
        refiner.load_state_dict(ck["refiner"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointFileError(f"{path}: cannot rebuild the refiner from its refiner_args ({_first_line(e)})"
                                  ) from None
    return refiner.eval()


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


class CheckpointSaver:
    """Keeps last, best and the top-k epochs of one run folder (higher metric is better).

    Its bookkeeping (:meth:`state`) is saved inside every checkpoint, so a resumed run prunes
    exactly as an uninterrupted one would.
    """

    def __init__(self, folder: Path, keep_top_k: int, state: dict[str, Any] | None = None):
        self.folder, self.keep_top_k = Path(folder), keep_top_k
        state = state or {}
        self.top: list[tuple[float, int]] = [(float(m), int(e)) for m, e in state.get("top", [])]
        self.best: float | None = state.get("best")

    def state(self) -> dict[str, Any]:
        return {"top": [[m, e] for m, e in self.top], "best": self.best}

    def save(self, payload: Callable[[dict[str, Any]], dict[str, Any]], epoch: int,
             metric: float | None = None) -> list[Path]:
        """Write ``payload(saver_state)`` to last.pt and, given ``metric``, to best.pt and
        ``epoch_NNN.pt`` as they qualify. Returns the files written."""
        is_best = metric is not None and (self.best is None or metric > self.best)
        keep = (metric is not None and self.keep_top_k > 0
                and (len(self.top) < self.keep_top_k or metric > self.top[-1][0]))
        dropped: list[tuple[float, int]] = []
        if keep:
            assert metric is not None
            self.top = sorted([*self.top, (metric, epoch)], key=lambda x: (-x[0], x[1]))
            self.top, dropped = self.top[:self.keep_top_k], self.top[self.keep_top_k:]
        if is_best:
            self.best = metric
        data = checkpoint_bytes(payload(self.state()))
        names = ["last.pt"] + ([epoch_file(epoch)] if keep else []) + (["best.pt"] if is_best else [])
        written = [atomic_write_bytes(self.folder / n, data) for n in names]
        for _, e in dropped:
            (self.folder / epoch_file(e)).unlink(missing_ok=True)
        return written
