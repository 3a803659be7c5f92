"""HQ-SAM loading and the image encoder, using the ``segment-anything-hq`` package as it is.

The package's own loader calls ``torch.load`` without ``map_location`` (the official files hold
CUDA tensors, so it fails on CPU-only machines) and without ``weights_only``. We build the model with
``checkpoint=None`` and load the state dict ourselves. With no checkpoint the model is randomly
initialised from a fixed seed; every stage announces that loudly and the store records it.
Nothing here ever downloads weights.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from boxrefine.shared.console import console, warn_loud
from boxrefine.shared.errors import BoxrefineError, DeviceError
from boxrefine.shared.fileio import atomic_write_json
from boxrefine.shared.geometry import IMG_SIZE
from boxrefine.shared.hq_decoder import Region, decode_boxes
from boxrefine.shared.precision import autocast_context
from boxrefine.shared.records import file_sha256

EMBED_SIZE = 64  # image_embeddings are 256×64×64 for every model type
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
M = TypeVar("M", bound=torch.nn.Module)
INTERM_CHANNELS = {"vit_tiny": 160, "vit_b": 768, "vit_l": 1024, "vit_h": 1280}

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


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available, else cpu. ``auto`` and a bare ``cuda`` are the rank's own GPU under
    torchrun (``cuda:$LOCAL_RANK``); ``cuda:N`` is GPU N wherever it runs."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    rank_gpu = name == "cuda" and "LOCAL_RANK" in os.environ
    dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if rank_gpu else name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"model.device is {name!r} but CUDA is not available on this machine")
    return dev


def build_hq_sam(model_type: str, checkpoint: Path | None, seed: int, device: torch.device | str = "cpu",
                 announce: bool = True) -> torch.nn.Module:
    """Build HQ-SAM (eval mode, on ``device``) from a checkpoint file, or seeded random weights.

    Missing/unexpected keys are reported (a plain SAM checkpoint lacks the HQ parts).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from segment_anything_hq import sam_model_registry

    if checkpoint is None:
        if announce:
            warn_loud("random weights", f"HQ-SAM {model_type} is RANDOMLY INITIALISED (seed {seed}): no "
                      "model.checkpoint is set. Features are meaningless except for tests and the demo.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sam = sam_model_registry[model_type](checkpoint=None)
        # The prompt encoder and mask decoder get their own seeded stream, so train/evaluate can
        # rebuild exactly these weights without constructing the image encoder (build_sam_heads).
        heads = _random_heads(model_type, seed)
        sam.prompt_encoder, sam.mask_decoder = heads.prompt_encoder, heads.mask_decoder
    else:
        sam = sam_model_registry[model_type](checkpoint=None)
        state = load_state_dict_file(Path(checkpoint))
        result = sam.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            console.print(f"{checkpoint}: loaded with {len(result.missing_keys)} missing and "
                          f"{len(result.unexpected_keys)} unexpected key(s)"
                          + (f"; missing e.g. {result.missing_keys[:3]}" if result.missing_keys else "")
                          + (f"; unexpected e.g. {result.unexpected_keys[:3]}" if result.unexpected_keys else ""),
                          style="yellow", markup=False)
        if len(state) - len(result.unexpected_keys) == 0:
            raise CheckpointError(f"{checkpoint}: no key matches HQ-SAM {model_type}; wrong model.type?")
    return _frozen(sam, device)


def _frozen(module: M, device: torch.device | str) -> M:
    """Eval mode, no gradients, on ``device``: how every HQ-SAM part is used here."""
    module.eval()
    module.requires_grad_(False)
    return module.to(device)


def load_state_dict_file(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with one-line errors. ``mmap``
    maps the file instead of reading it, so tensors that are never used are never loaded."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as e:  # torch raises many types for truncated/corrupt/unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint ({first})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def to_input_tensor(resized_rgb: np.ndarray) -> torch.Tensor:
    """H'×W'×3 uint8 (already ``ResizeLongestSide``-resized) → 1×3×H'×W' float tensor, exactly
    as ``SamPredictor.set_image`` builds it."""
    return torch.as_tensor(resized_rgb).permute(2, 0, 1).contiguous()[None, :, :, :]


@torch.inference_mode()
def encode(sam: torch.nn.Module, images: list[torch.Tensor], precision: str = "float32"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the image encoder on a batch.

    Args:
      images: list of 1×3×H'×W' tensors (uint8 or float, long side 1024), any device.
      precision: "float32", or "float16"/"bfloat16" autocast (float16 is slow on a CPU:
        ``boxrefine.shared.precision.CPU_FLOAT16_NOTE``).
    Returns:
      image_embeddings B×256×64×64 and interm_embeddings B×64×64×C (the early-layer feature the
      HQ mask decoder consumes, ``interm_embeddings[0]``), on the model's device.
    """
    device = next(sam.parameters()).device
    batch = torch.cat([sam.preprocess(im.to(device, non_blocking=True).float()) for im in images], 0)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision)
    with autocast_context(device, dtype):
        emb, interm = sam.image_encoder(batch)
    return emb.float(), interm[0].float()


class SamHeads(torch.nn.Module):
    """HQ-SAM's frozen prompt encoder + HQ mask decoder, without the image encoder: all that
    train/evaluate need next to cached features."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = prompt_encoder, mask_decoder

    def forward(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: torch.Tensor,
                image_index: torch.Tensor | None = None, regions: Sequence[Region] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for box prompts on B images (:func:`~boxrefine.shared.hq_decoder.decode_boxes`: the
        package's decoder with the per-image work done once and nothing computed that is not read).

        Args:
          image_embeddings: B×256×64×64; interm_embeddings: B×64×64×C (float, on the heads' device).
          boxes: n×4 xyxy in the 1024-px model input frame; image_index: the image of each box
            (default: all on image 0).
          regions: per box, the low-res pixels (x0, y0, x1, y1) whose logits are needed (0 elsewhere);
            None = the whole mask.
        Returns:
          low-res mask logits n×1×256×256 (frame of the padded 1024 input, /4) and IoU scores n×1.
        """
        return decode_boxes(self.prompt_encoder, self.mask_decoder, image_embeddings, interm_embeddings, boxes,
                            image_index, regions)

    def package_forward(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor, boxes: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same for ONE image through the package's ``MaskDecoderHQ.forward`` unchanged (what
        :meth:`forward` is tested and benchmarked against)."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(image_embeddings=image_embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False, hq_token_only=False,
                                 interm_embeddings=[interm_embeddings])


def _new_heads(model_type: str) -> SamHeads:
    """The package's PromptEncoder and MaskDecoderHQ with the hyper-parameters its build_sam uses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq.modeling import MaskDecoderHQ, PromptEncoder, TwoWayTransformer
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
                           input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=16)
    decoder = MaskDecoderHQ(num_multimask_outputs=3,
                            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                            vit_dim=INTERM_CHANNELS[model_type])
    return SamHeads(prompt, decoder)


def _random_heads(model_type: str, seed: int) -> SamHeads:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1_000_003)
        return _new_heads(model_type)


def build_sam_heads(model_type: str, checkpoint: Path | None, seed: int, device: torch.device | str = "cpu",
                    announce: bool = True) -> SamHeads:
    """Frozen prompt encoder + HQ mask decoder (eval mode) with exactly the weights
    :func:`build_hq_sam` would give them. The image encoder is never built, and with a checkpoint
    file its encoder tensors are never read (the file is memory-mapped)."""
    if checkpoint is None:
        if announce:
            warn_loud("random weights", f"HQ-SAM {model_type} prompt encoder/mask decoder are RANDOMLY "
                      f"INITIALISED (seed {seed}): no model.checkpoint is set (tests/demo only).")
        heads = _random_heads(model_type, seed)
    else:
        heads = _new_heads(model_type)
        state = load_state_dict_file(Path(checkpoint), mmap=True)
        sub = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        result = heads.load_state_dict(sub, strict=False)
        if not sub:
            raise CheckpointError(f"{checkpoint}: no prompt_encoder/mask_decoder weights in this file")
        if result.missing_keys:
            console.print(f"{checkpoint}: {len(result.missing_keys)} prompt/decoder key(s) missing, "
                          f"e.g. {result.missing_keys[:3]}", style="yellow", markup=False)
    return _frozen(heads, device)
