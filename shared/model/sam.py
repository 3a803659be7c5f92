"""HQ-SAM loading and the image encoder, using the ``segment-anything-hq`` package as it is.

The package's own loader calls ``torch.load`` without ``map_location`` (the official files hold
CUDA tensors, so it fails on CPU-only machines) and without ``weights_only``. We build the model with
``checkpoint=None`` and load the state dict ourselves. With no checkpoint the model is randomly
initialised from a fixed seed; every stage announces that loudly and the store records it.
Nothing here ever downloads weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from boxrefine.shared.geometry.frames import IMG_SIZE
from boxrefine.shared.model.hq_decoder import Region, decode_boxes
from boxrefine.shared.model.weights import CheckpointError, load_state_dict_file
from boxrefine.shared.runtime.console import console, warn_loud
from boxrefine.shared.runtime.device import autocast_context

EMBED_SIZE = 64  # image_embeddings are 256×64×64 for every model type


@contextmanager
def quiet_package_import() -> Iterator[None]:
    """Around every import of ``segment_anything_hq``: importing it warns ~10 lines through timm
    (deprecated ``timm.models.layers`` paths, its TinyViT names registered again), none of them about
    boxrefine's use; those warnings, and only those, are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
        yield
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
M = TypeVar("M", bound=torch.nn.Module)
INTERM_CHANNELS = {"vit_tiny": 160, "vit_b": 768, "vit_l": 1024, "vit_h": 1280}


def build_hq_sam(model_type: str, checkpoint: Path | None, seed: int, device: torch.device | str = "cpu",
                 announce: bool = True) -> torch.nn.Module:
    """Build HQ-SAM (eval mode, on ``device``) from a checkpoint file, or seeded random weights.

    Missing/unexpected keys are reported (a plain SAM checkpoint lacks the HQ parts).
    """
    with quiet_package_import():
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


def encoder_input(rgb: np.ndarray) -> torch.Tensor:
    """THE image → encoder input path: H×W×3 uint8 RGB → 3×H'×W' uint8 (long side 1024), exactly as
    ``SamPredictor.set_image`` builds it (``ResizeLongestSide``; :func:`encode` normalises and pads).
    Extract, refine's predictor and the benches all call it."""
    with quiet_package_import():  # the package, imported on first use
        from segment_anything_hq.utils.transforms import ResizeLongestSide

    return torch.from_numpy(ResizeLongestSide(IMG_SIZE).apply_image(rgb)).permute(2, 0, 1).contiguous()


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



def _new_heads(model_type: str) -> SamHeads:
    """The package's PromptEncoder and MaskDecoderHQ with the hyper-parameters its build_sam uses."""
    with quiet_package_import():
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
