"""HQ-SAM's mask decoder for box prompts exactly as the package runs it (``MaskDecoderHQ.forward``, one
image per call): the reference ``shared/model/hq_decoder.py`` is tested (tests/test_hq_decoder.py)
and benchmarked (bench/step_profile.py) against."""

from __future__ import annotations

import torch

from boxrefine.shared.model.sam import SamHeads


def package_decode(heads: SamHeads, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor,
                   boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits n×1×256×256 and IoU scores n×1 for box prompts on ONE image."""
    sparse, dense = heads.prompt_encoder(points=None, boxes=boxes, masks=None)
    return heads.mask_decoder(image_embeddings=image_embeddings, image_pe=heads.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False, hq_token_only=False, interm_embeddings=[interm_embeddings])
