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
from pathlib import Path
from typing import Any

import torch

from boxrefine.shared.errors import BoxrefineError, first_line
from boxrefine.shared.model.heads import build_refiner
from boxrefine.shared.model.refiner import BoxRefiner
from boxrefine.shared.model.weights import load_failure
from boxrefine.shared.runtime.fileio import read_bytes

CKPT_FORMAT = 2  # 2: a content checksum in every checkpoint


class CheckpointFileError(BoxrefineError, ValueError):
    """A file that is not a usable boxrefine checkpoint; the message names it (one line)."""


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
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointFileError(f"{path}: not a readable checkpoint ({load_failure(e)})") from None
    if not isinstance(ckpt, dict) or "refiner" not in ckpt or not isinstance(ckpt.get("format"), int):
        raise CheckpointFileError(f"{path}: not a boxrefine training checkpoint")
    if ckpt["format"] != CKPT_FORMAT:
        raise CheckpointFileError(f"{path}: checkpoint format {ckpt['format']} (written by an older boxrefine, "
                                  f"without a checksum); this boxrefine reads format {CKPT_FORMAT}: train again")
    if ckpt.get("checksum") != content_checksum(ckpt):
        raise CheckpointFileError(f"{path}: checkpoint content fails its checksum (a flipped byte or a damaged "
                                  "copy); not loaded")
    return ckpt


def refiner_from_checkpoint(ckpt: dict[str, Any], path: Path) -> BoxRefiner:
    """The refiner a checkpoint holds, rebuilt from its recorded ``refiner_args`` (so a checkpoint of
    another head architecture loads unchanged), in eval mode on the CPU; CheckpointFileError (one
    line naming the file) when it cannot be rebuilt."""
    args = ckpt.get("refiner_args")
    if not isinstance(args, dict):
        raise CheckpointFileError(f"{path}: no refiner_args in the checkpoint")
    # refiner_args without norm / head: the box head without a norm (checkpoints of boxrefine 0.1 before those options)
    args = {"norm": "none", "head": "box", **args}
    try:
        refiner = build_refiner(**args)
        refiner.load_state_dict(ckpt["refiner"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointFileError(f"{path}: cannot rebuild the refiner from its refiner_args ({first_line(e, 160)})"
                                  ) from None
    return refiner.eval()



