"""HQ-SAM's mask decoder for box prompts, computed with less work and the package's own weights.

``MaskDecoderHQ.forward`` (``segment-anything-hq``) does everything once per box, on one image per
call. For the single-mask output boxrefine uses, the same logits come out of fewer operations
(measured in ``bench/step_profile.py``; ``tests/test_hq_decoder.py`` checks the logits against the
package's forward):

* **per image, not per box**: the HQ feature (``embedding_encoder`` + ``compress_vit_feat``), the
  image tokens with the no-mask embedding, and in the first transformer block the key/value
  projections of the token-to-image attention and the query projection of the image-to-token one
  (the image side is the same for every box until that block updates it);
* **only what is read**: of the four SAM mask tokens only the first is used without multimask
  output, so only its hypernetwork runs; the last 3×3 convolution of ``embedding_maskfeature`` is
  linear, so the HQ token's hypernetwork is folded into its kernel (64→1 channel instead of 64→32);
* **only where it is read** (``regions``): the upscaling and the mask-feature convolutions are
  local (a 2×2-stride transposed convolution maps each embedding cell to its own 4×4 low-res
  pixels; two 3×3 convolutions need a 2-pixel halo), so the logits of a rectangle of the 256×256
  frame are computed exactly from that rectangle alone. Training only reads the logits inside each
  box's RoI (``shared.model.refiner.mask_regions``); evaluation scores whole masks and passes no regions.
* boxes of several images go through the transformer in one batch.

Outside its region a box's logits are 0 (never read).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as nnf
from torch import nn

from boxrefine.shared.geometry.frames import LOWRES

HALO = 2  # low-res pixels: two 3×3 convolutions in embedding_maskfeature
CHUNK = 16  # boxes per transformer batch (bounds memory: ~4 MB of activations per box per tensor)
FULL = (0, 0, LOWRES, LOWRES)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _run(layers: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply ``layers`` in turn, the package's ``LayerNorm2d`` as one fused ``layer_norm`` over the
    channels (same statistics: mean and biased variance; one pass instead of its elementwise ones,
    on channels-last activations)."""
    for layer in layers:
        if type(layer).__name__ == "LayerNorm2d":  # the package's (imported lazily, as in sam.py)
            x = nnf.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), layer.weight, layer.bias,
                               layer.eps).permute(0, 3, 1, 2)
        else:
            x = layer(x)
    return x


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, n_heads, c // n_heads).transpose(1, 2)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` of the package after its q/k/v projections (given already projected)."""
    q, k, v = _heads(q, attn.num_heads), _heads(k, attn.num_heads), _heads(v, attn.num_heads)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = (a @ v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)


Region = tuple[int, int, int, int]


def _upscale(module: nn.Sequential, x: torch.Tensor, region: Region) -> torch.Tensor:
    """``module`` (two 2×2-stride transposed convolutions, with per-pixel layers between: 64 → 256
    px) applied to embedding-frame ``x`` (B×C×64×64), for the low-res pixels ``region`` only
    (x0, y0, x1, y1, exclusive ends): each output pixel (y, x) depends on cell (y // 4, x // 4)."""
    x0, y0, x1, y1 = region
    cx0, cy0 = x0 // 4, y0 // 4
    out = _run(module, _channels_last(x[..., cy0:-(-y1 // 4), cx0:-(-x1 // 4)]))
    return out[..., y0 - 4 * cy0:y1 - 4 * cy0, x0 - 4 * cx0:x1 - 4 * cx0]


def _grow(region: Region, px: int) -> Region:
    x0, y0, x1, y1 = region
    return max(0, x0 - px), max(0, y0 - px), min(LOWRES, x1 + px), min(LOWRES, y1 + px)


def _transformer(md: nn.Module, keys0: torch.Tensor, key_pe: torch.Tensor, shared: tuple[torch.Tensor, ...],
                 tokens: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` for boxes of several images: ``keys0`` B×4096×256 (image tokens
    + no-mask embedding), ``tokens`` n×T×256, ``idx`` the image of each box; ``shared`` the first
    block's per-image projections (k and v of token→image, q of image→token)."""
    t = md.transformer
    first = t.layers[0]
    k1, v1, q1 = (s[idx] for s in shared)
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))  # skip_first_layer_pe
    ca = first.cross_attn_token_to_image
    queries = first.norm2(queries + _attend(ca, ca.q_proj(queries + tokens), k1, v1))
    queries = first.norm3(queries + first.mlp(queries))
    ci = first.cross_attn_image_to_token
    keys = keys0[idx] + _attend(ci, q1, ci.k_proj(queries + tokens), ci.v_proj(queries))
    keys = first.norm4(keys)
    for layer in t.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = t.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    return t.norm_final_attn(queries + attn_out), keys


def decode_boxes(prompt_encoder: nn.Module, md: nn.Module, image_embeddings: torch.Tensor,
                 interm_embeddings: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor | None = None,
                 regions: Sequence[Region] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``MaskDecoderHQ`` returns with ``multimask_output=False, hq_token_only=False``, for box
    prompts on B images.

    Args:
      image_embeddings: B×256×64×64; interm_embeddings: B×64×64×C (float, on the decoder's device).
      boxes: n×4 xyxy in the 1024-px input frame; image_index: n image numbers (default all 0).
      regions: per box (x0, y0, x1, y1) in the 256×256 low-res frame, exclusive ends: compute the
        logits only there (0 elsewhere); None = everywhere.
    Returns:
      low-res mask logits n×1×256×256 and IoU predictions n×1, float32 (under autocast too).
    """
    n, dev = len(boxes), image_embeddings.device
    idx = torch.zeros(n, dtype=torch.long, device=dev) if image_index is None else image_index.to(dev).long()
    regs = [FULL] * n if regions is None else [_grow(tuple(int(v) for v in r), 0) for r in regions]
    # float32 whatever autocast computes in: the rows are written one group of boxes at a time
    logits = torch.zeros((n, 1, LOWRES, LOWRES), dtype=torch.float32, device=dev)
    iou = torch.zeros((n, 1), dtype=torch.float32, device=dev)
    if n == 0:
        return logits, iou
    sparse, _ = prompt_encoder(points=None, boxes=boxes, masks=None)
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight, md.hf_token.weight], 0)
    tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse], 1)
    key_pe = prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
    keys0 = (image_embeddings + prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)).flatten(2).transpose(1, 2)
    first = md.transformer.layers[0]
    shared = (first.cross_attn_token_to_image.k_proj(keys0 + key_pe), first.cross_attn_token_to_image.v_proj(keys0),
              first.cross_attn_image_to_token.q_proj(keys0 + key_pe))
    hq = _HQFeatures(md, image_embeddings, interm_embeddings, idx, regs)
    for s in range(0, n, CHUNK):
        j = slice(s, s + CHUNK)
        hs, keys = _transformer(md, keys0, key_pe, shared, tokens[j], idx[j])
        iou[j] = md.iou_prediction_head(hs[:, 0])[:, :1].float()
        _write_logits(md, hs, keys, regs[j], idx[j], hq, logits[j])
    return logits, iou


class _HQFeatures:
    """The HQ feature (``embedding_encoder`` of the embedding + ``compress_vit_feat`` of the early-layer
    feature) in the low-res frame: once per image over the union of its boxes' regions, or per box
    where the regions are small and apart (it is local too)."""

    def __init__(self, md: nn.Module, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor,
                 idx: torch.Tensor, regs: Sequence[Region]):
        self.md, self.emb, self.vit = md, image_embeddings, interm_embeddings.permute(0, 3, 1, 2)
        self.union: dict[int, tuple[Region, torch.Tensor]] = {}
        for b in idx.unique().tolist():
            rs = [regs[k] for k in (idx == b).nonzero().flatten().tolist() if _area(regs[k])]
            if not rs:
                continue
            u = (min(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs), max(r[3] for r in rs))
            if _area(u) <= sum(_area(r) for r in rs):
                self.union[b] = (u, self.compute(b, u))

    def compute(self, b: int, r: Region) -> torch.Tensor:
        return (_upscale(self.md.embedding_encoder, self.emb[b:b + 1], r)
                + _upscale(self.md.compress_vit_feat, self.vit[b:b + 1], r))

    def __call__(self, b: int, r: Region) -> torch.Tensor:
        return _crop(*self.union[b], r) if b in self.union else self.compute(b, r)


def _write_logits(md: nn.Module, hs: torch.Tensor, keys: torch.Tensor, regs: Sequence[Region], idx: torch.Tensor,
                  hq: _HQFeatures, logits: torch.Tensor) -> None:
    """The mask logits of a chunk of boxes (the transformer's ``hs`` tokens and ``keys``) inside each
    box's region, written into ``logits`` (the chunk's rows, float32)."""
    conv1, norm, act, conv2 = md.embedding_maskfeature
    h_sam = md.output_hypernetworks_mlps[0](hs[:, 1])  # m×32: the single-mask SAM token
    h_hq = md.hf_mlp(hs[:, md.num_mask_tokens])  # m×32: the HQ token
    # conv2 is linear: fold the HQ token's hypernetwork into its kernel (64→1 channel per box)
    w2, b2 = torch.einsum("mc,cikl->mikl", h_hq, conv2.weight), h_hq @ conv2.bias
    src = keys.transpose(1, 2).reshape(len(hs), -1, 64, 64)
    groups: dict[Region, list[int]] = {}  # boxes with the same region run as one batch
    for m, r in enumerate(regs):
        if _area(r):
            groups.setdefault(r, []).append(m)
    for r, members in groups.items():
        g = _grow(r, HALO)
        sel = torch.tensor(members, device=hs.device)
        up = _upscale(md.output_upscaling, src[sel], g)  # k×32×(region + halo)
        feat = _run((conv1, norm, act), up).contiguous()
        k, c, gh, gw = feat.shape
        hq_mask = nnf.conv2d(feat.reshape(1, k * c, gh, gw), w2[sel], b2[sel], padding=1, groups=k)[0]
        y, x = slice(r[1] - g[1], r[3] - g[1]), slice(r[0] - g[0], r[2] - g[0])
        hqf = torch.cat([hq(b, r) for b in idx[sel].tolist()])
        out = (torch.einsum("kc,kchw->khw", h_sam[sel], up[:, :, y, x]) + hq_mask[:, y, x]
               + torch.einsum("kc,kchw->khw", h_hq[sel], hqf))
        logits[sel, 0, r[1]:r[3], r[0]:r[2]] = out.float()


def _crop(region: Region, feature: torch.Tensor, r: Region) -> torch.Tensor:
    """``r`` of a feature computed over ``region`` (``r`` inside it)."""
    return feature[..., r[1] - region[1]:r[3] - region[1], r[0] - region[0]:r[2] - region[0]]


def _area(r: Region) -> int:
    return max(0, r[2] - r[0]) * max(0, r[3] - r[1])
