"""Apply a trained refiner to new images: a predictor in the spirit of HQ-SAM's ``SamPredictor``.

    from boxrefine import RefinePredictor

    predictor = RefinePredictor.from_run("runs/demo")          # best.pt, the HQ-SAM weights it was trained with
    # or RefinePredictor("runs/demo/best.pt", sam_checkpoint=None)  # None: the seeded random init
    predictor.set_image(rgb)                                  # H×W×3 uint8 RGB (or a store row)
    boxes, deltas = predictor.refine([[x0, y0, x1, y1], ...])  # original pixels, xyxy

The refiner checkpoint records what its features were made with (model type, HQ-SAM checkpoint
fingerprint, intensity mapping, storage dtype, ...: the store identity) and its architecture
(``refiner_args``); the predictor rebuilds exactly that and refuses HQ-SAM weights or a store that
give other features, naming both values. ``set_image`` runs the image encoder as extract does
(same resize, same precision) and rounds the features to the storage dtype the refiner was trained
on, so an image refined here and one refined from the store by ``boxrefine refine`` get the same
boxes. The refinement itself is ``shared/scoring/predict.py``'s ``apply_refiner``, which evaluate runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boxrefine.shared.config import IntensityConfig
from boxrefine.shared.data.intensity import Intensity
from boxrefine.shared.data.records import image_key, safe_relpath
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.geometry.frames import ImageGeometry
from boxrefine.shared.model.checkpoint import CheckpointFileError, load_checkpoint, refiner_from_checkpoint
from boxrefine.shared.model.runs import run_best
from boxrefine.shared.model.sam import SamHeads, build_hq_sam, build_sam_heads, encode, encoder_input
from boxrefine.shared.model.weights import checkpoint_info
from boxrefine.shared.runtime.device import resolve_device
from boxrefine.shared.scoring.predict import apply_refiner, box_prompt_logits
from boxrefine.shared.store.codecs import from_storage, to_storage
from boxrefine.shared.store.feature_store import open_store
from boxrefine.shared.store.identity import StoreIdentity, feature_differences
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.store.rows import row_geometry
from boxrefine.shared.store.schema import FIELD, STATE_COMPLETE


class RefineError(BoxrefineError, ValueError):
    """A refiner that cannot be applied as asked; one line naming what differs or what is wrong."""


@dataclass
class ImageFeatures:
    """One image's cached HQ-SAM features (storage dtype) and its frames."""

    image_embeddings: torch.Tensor  # 256×64×64
    interm_embeddings: torch.Tensor  # 64×64×C
    geometry: ImageGeometry

    @classmethod
    def from_store(cls, store_path: str, split: str, file_name: str) -> ImageFeatures:
        """The features of image ``file_name`` (relative to the split's image folder) from a store."""
        split_store = open_store(store_path).split(split)
        key = image_key(safe_relpath(file_name))
        rows = np.flatnonzero(split_store.keys() == key)
        record = split_store.read_record(int(rows[0])) if len(rows) else None
        if record is None or int(record[FIELD["state"]]) != STATE_COMPLETE:
            raise StoreError(f"{store_path}: split {split!r} has no complete row for {file_name!r}; run extract")
        emb, interm = split_store.read_features(int(rows[0]), record=record)  # checked against the record's digests
        return cls(emb, interm, row_geometry(record))


def as_rgb(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """H×W×3 uint8 RGB from an RGB(A) or grey array of any dtype, as extract decodes files: alpha
    dropped, other than 8-bit mapped by ``intensity``, grey repeated."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3))) or min(a.shape[:2]) < 1:
        raise RefineError(f"image must be H×W, H×W×1, H×W×3 or H×W×4, got shape {a.shape}")
    a = intensity.to_uint8(a, "image")
    if a.ndim == 2 or a.shape[2] == 1:
        a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(a)


def as_boxes(boxes: Any) -> torch.Tensor:
    """n×4 xyxy float32 (CPU) from any array-like; RefineError for other shapes, non-finite values
    or a far side before its near side."""
    try:
        a = np.asarray(boxes, dtype=np.float32)
    except (TypeError, ValueError):
        raise RefineError("boxes must be an n×4 array of numbers (xyxy, original pixels)") from None
    if a.size == 0:
        return torch.zeros((0, 4))
    if a.ndim not in (1, 2) or a.shape[-1] != 4:
        raise RefineError(f"boxes must be n×4 (xyxy, original pixels), got shape {a.shape}")
    t = torch.from_numpy(a.reshape(-1, 4).copy())
    if not torch.isfinite(t).all():
        raise RefineError("boxes must be finite numbers (xyxy, original pixels)")
    if (t[:, 2:] < t[:, :2]).any():
        raise RefineError("boxes must be xyxy with x1 >= x0 and y1 >= y0 (original pixels)")
    return t


class RefinePredictor:
    """A trained refiner with the HQ-SAM parts it needs, for one image at a time (``set_image`` +
    ``refine``) or many (``refine_batch``). HQ-SAM is built lazily: the image encoder only when an
    image is encoded, the prompt encoder + mask decoder only when the refiner uses mask logits or
    masks are asked for."""

    def __init__(self, refiner_checkpoint: str | Path, sam_checkpoint: str | Path | None = None,
                 device: str | torch.device = "auto", amp_dtype: torch.dtype | None = None, announce: bool = True,
                 expect: tuple[StoreIdentity, str] | None = None):
        """``expect``: (identity, its source) of the features this predictor will be given, refused
        when they differ from the ones the refiner was trained on (``boxrefine refine``: the config)."""
        path = Path(refiner_checkpoint)
        ckpt = load_checkpoint(path)
        try:
            self.identity = StoreIdentity.from_dict(ckpt["store_identity"])
            self.intensity = IntensityConfig(**ckpt["config"]["data"]["intensity"]).mapping()
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(f"{path}: records no readable store identity and intensity mapping") from None
        self.path, self.announce, self.amp_dtype = path, announce, amp_dtype
        if expect is not None:
            self.check_features(*expect)
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        self.refiner = refiner_from_checkpoint(ckpt, path).to(self.device)
        fp = self.identity.checkpoint
        self.seed = int(fp.split("=", 1)[1]) if fp.startswith("random-init:seed=") else 0
        self.sam_checkpoint = Path(sam_checkpoint) if sam_checkpoint is not None else None
        given = checkpoint_info(self.identity.model_type, self.sam_checkpoint, self.seed).fingerprint
        if given != fp:
            source = self.sam_checkpoint or "no checkpoint: random init"
            raise RefineError(f"{path}: the refiner was trained on features of HQ-SAM weights {fp}, but the "
                              f"HQ-SAM weights given are {given} ({source})")
        self._sam: torch.nn.Module | None = None
        self._heads: SamHeads | None = None
        self.features: ImageFeatures | None = None

    @classmethod
    def from_run(cls, run: str | Path, device: str | torch.device = "auto", **kwargs: Any) -> RefinePredictor:
        """The refiner of a run folder (its best.pt) or a checkpoint file, with the HQ-SAM weights its
        training config names (``model.checkpoint``; none: the seeded random init) unless
        ``sam_checkpoint`` is given. Other keyword arguments go to the constructor."""
        path = Path(run)
        ckpt_path = run_best(path) if path.is_dir() else path
        if "sam_checkpoint" not in kwargs:
            config = load_checkpoint(ckpt_path).get("config")
            model = config.get("model") if isinstance(config, dict) else None
            kwargs["sam_checkpoint"] = model.get("checkpoint") if isinstance(model, dict) else None
        return cls(ckpt_path, device=device, **kwargs)

    # ---- HQ-SAM, built on first use ------------------------------------------------------------
    def use_sam(self, sam: torch.nn.Module) -> None:
        """Adopt an HQ-SAM already built with the recorded weights (e.g. by extract)."""
        self._sam = sam
        self._heads = None

    def sam(self) -> torch.nn.Module:
        if self._sam is None:
            self._sam = build_hq_sam(self.identity.model_type, self.sam_checkpoint, self.seed, self.device,
                                     announce=self.announce)
        return self._sam

    def heads(self) -> SamHeads:
        if self._heads is None:
            self._heads = (SamHeads(self._sam.prompt_encoder, self._sam.mask_decoder) if self._sam is not None else
                           build_sam_heads(self.identity.model_type, self.sam_checkpoint, self.seed, self.device,
                                           announce=self.announce))
        return self._heads

    def check_features(self, identity: StoreIdentity, what: str) -> None:
        """Refuse features made otherwise than the refiner's (``what`` names their source)."""
        diffs = feature_differences(self.identity, identity, ("checkpoint", what))
        if diffs:
            raise RefineError(f"{self.path}: trained on features made otherwise than the {what}'s: "
                              + "; ".join(diffs))

    # ---- images → features ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        """Run the image encoder on RGB arrays (one batch), as extract does, rounding the features to
        the storage dtype the refiner was trained on."""
        geos, tensors = [], []
        for image in images:
            rgb = as_rgb(image, self.intensity)
            geos.append(ImageGeometry.of(*rgb.shape[:2]))
            tensors.append(encoder_input(rgb)[None])
        if not tensors:
            return []
        emb, interm = encode(self.sam(), tensors, self.identity.encoder_precision)
        dt = self.identity.dtype
        emb, interm = from_storage(to_storage(emb, dt), dt), from_storage(to_storage(interm, dt), dt)
        return [ImageFeatures(emb[i], interm[i], g) for i, g in enumerate(geos)]

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode one image (H×W×3 uint8 as ``SamPredictor.set_image``, RGB or, with ``image_format``
        "BGR", as cv2 reads it; grey, RGBA and 16-bit or float images are converted as extract
        converts files) for the next ``refine`` calls."""
        if image_format not in ("RGB", "BGR"):
            raise RefineError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        a = np.asarray(image)
        if image_format == "BGR" and a.ndim == 3 and a.shape[2] in (3, 4):
            a = a[..., [2, 1, 0, *range(3, a.shape[2])]]
        self.features = self.encode_images([a])[0]

    def set_features(self, features: ImageFeatures) -> None:
        self.features = features

    def set_store_row(self, store_path: str, split: str, file_name: str) -> None:
        """Use an image's cached features from a feature store (refused if the store was made otherwise)."""
        self.check_features(open_store(store_path).identity, f"store {store_path}")
        self.features = ImageFeatures.from_store(store_path, split, file_name)

    # ---- refining ------------------------------------------------------------------------------
    def refine(self, boxes_xyxy: Any) -> tuple[np.ndarray, np.ndarray]:
        """Refine n×4 xyxy boxes (original pixels) of the current image → (refined boxes n×4 clipped to
        the image, deltas n×4 = refined − given), float32 numpy."""
        if self.features is None:
            raise RefineError("no image set: call set_image (or set_features / set_store_row) first")
        return self.refine_batch([self.features], [boxes_xyxy])[0]

    def refine_batch(self, images: Sequence[np.ndarray | ImageFeatures], boxes: Sequence[Any]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Many images at once: RGB arrays (encoded here, in one batch) or ``ImageFeatures``, with the
        boxes of each; the refiner runs once over all the boxes."""
        if len(images) != len(boxes):
            raise RefineError(f"refine_batch: {len(images)} images but {len(boxes)} box lists")
        raw = [i for i, im in enumerate(images) if not isinstance(im, ImageFeatures)]
        encoded = dict(zip(raw, self.encode_images([images[i] for i in raw]), strict=True))
        feats = [encoded.get(i, im) for i, im in enumerate(images)]
        given = [as_boxes(b) for b in boxes]
        refined = self.refine_features(feats, given)
        return [(r.numpy(), (r - g).numpy()) for r, g in zip(refined, given, strict=True)]

    @torch.no_grad()
    def refine_features(self, feats: Sequence[ImageFeatures], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The refinement, as evaluate's ``predict`` runs it: HQ-SAM's mask logits per image (when the
        refiner uses them), then the refiner over every box of the batch. ``boxes``: n_i×4 float32
        original px per image → refined n_i×4 original px, clipped to the image."""
        if not feats:
            return []
        dev = self.device
        emb = torch.stack([f.image_embeddings for f in feats]).to(dev).float()
        interm = torch.stack([f.interm_embeddings for f in feats]).to(dev).float()
        boxes_in = [f.geometry.boxes_to_input(b).to(dev) for f, b in zip(feats, boxes, strict=True)]
        heads = self.heads() if self.refiner.use_mask else None
        logits = [box_prompt_logits(heads, emb[i:i + 1], interm[i:i + 1], b, dev, self.amp_dtype,
                                    self.refiner.mask_regions(b))
                  if heads is not None and len(b) else None for i, b in enumerate(boxes_in)]
        refined = apply_refiner(self.refiner, emb, interm, boxes_in, logits, dev, self.amp_dtype)
        out, start = [], 0
        for f, b in zip(feats, boxes_in, strict=True):
            r = refined[start:start + len(b)]
            start += len(b)
            out.append(f.geometry.clip_original(f.geometry.boxes_to_original(r).cpu()))
        return out

    @torch.no_grad()
    def masks(self, boxes_xyxy: Any, features: ImageFeatures | None = None) -> np.ndarray:
        """HQ-SAM's masks (n×H×W bool, original frame, ``ImageGeometry.lowres_to_original``) for box
        prompts on the current image (or ``features``)."""
        f = features or self.features
        if f is None:
            raise RefineError("no image set: call set_image (or set_features / set_store_row) first")
        b = as_boxes(boxes_xyxy)
        h, w = f.geometry.orig_hw
        if not len(b):
            return np.zeros((0, h, w), bool)
        dev = self.device
        emb = f.image_embeddings[None].to(dev).float()
        interm = f.interm_embeddings[None].to(dev).float()
        logits = box_prompt_logits(self.heads(), emb, interm, f.geometry.boxes_to_input(b).to(dev), dev,
                                   self.amp_dtype)
        return (f.geometry.lowres_to_original(logits)[:, 0] > 0).cpu().numpy()
