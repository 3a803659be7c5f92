"""Which HQ-SAM weights: a checkpoint file named by its content (sha256, cached per file), or a seeded
random init; and the one way a state dict is read (``torch.load(map_location="cpu", weights_only=True)``)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from boxrefine.shared.data.records import file_sha256
from boxrefine.shared.errors import BoxrefineError, first_line
from boxrefine.shared.runtime.fileio import atomic_write_json

# From the HQ-SAM model card: name a known file by its content.
OFFICIAL_CHECKPOINTS = {
    "0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196": ("vit_tiny", "sam_hq_vit_tiny.pth"),
    "14a9d662cd6f5a9c2dba6d40ab0058d88d287e4a18fd6fdc6ad5fb1a3fdeaa57": ("vit_b", "sam_hq_vit_b.pth"),
    "e1a6c385d62bf005ded91a54d5ec55c985cfc4103ef89c08d90f39f04934c343": ("vit_l", "sam_hq_vit_l.pth"),
    "a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35": ("vit_h", "sam_hq_vit_h.pth"),
}


class CheckpointError(BoxrefineError, ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What produced the weights: a file (by sha256) or a seeded random init."""

    kind: str  # "file" | "random-init"
    sha256: str | None = None
    path: str | None = None
    official_name: str | None = None
    seed: int | None = None

    @property
    def fingerprint(self) -> str:
        return f"sha256:{self.sha256}" if self.kind == "file" else f"random-init:seed={self.seed}"

    def describe(self) -> str:
        if self.kind == "file":
            name = f" ({self.official_name})" if self.official_name else " (not an official HQ-SAM file)"
            return f"{self.path}{name} sha256={self.sha256[:12]}…"
        return f"RANDOM INIT (seed {self.seed}) — no checkpoint configured"


def _cache_dir() -> Path:
    base = os.environ.get("BOXREFINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "boxrefine")
    return Path(base)


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint, remembered per (absolute path, size, mtime) so a 2.5 GB file is
    hashed once, not every run. The cache is advisory: any problem with it means re-hashing."""
    path = Path(path).resolve()
    st = path.stat()
    cache_file = _cache_dir() / "checkpoint_sha256.json"
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        cache = json.loads(cache_file.read_text())
        hit = cache.get(str(path))
        if hit and hit.get("stamp") == stamp:
            return hit["sha256"]
    except (OSError, ValueError, AttributeError):
        cache = {}
    digest = file_sha256(path)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache[str(path)] = {"stamp": stamp, "sha256": digest}
        atomic_write_json(cache_file, cache, indent=1)
    except OSError:
        pass
    return digest


def checkpoint_info(model_type: str, checkpoint: Path | None, seed: int) -> CheckpointInfo:
    """Fingerprint the configured weights without building the model."""
    if checkpoint is None:
        return CheckpointInfo(kind="random-init", seed=seed)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    digest = checkpoint_sha256(checkpoint)
    official = OFFICIAL_CHECKPOINTS.get(digest)
    if official and official[0] != model_type:
        raise CheckpointError(f"{checkpoint}: this is the official {official[1]} ({official[0]}), "
                              f"but model.type is {model_type}")
    return CheckpointInfo(kind="file", sha256=digest, path=str(checkpoint),
                          official_name=official[1] if official else None)


def load_failure(e: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words. torch's own message
    opens with advice to retry with ``weights_only=False`` (which would run code from the file) and
    names the real problem lines later; this names that problem."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if found is None:
        return first_line(e, 160)
    detail = found.group(1).strip()
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    if unsafe:
        return f"it holds a {unsafe.group(1)} object, which is never unpickled: only tensors and plain values load"
    return f"not a torch checkpoint file: {detail[:120]}"


def load_state_dict_file(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with one-line errors. ``mmap``
    maps the file instead of reading it, so tensors that are never used are never loaded."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as e:  # torch raises many types for truncated/corrupt/unsafe files
        raise CheckpointError(f"{path}: cannot load checkpoint ({load_failure(e)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state
