"""A store's identity: everything that decides the values it holds, and the one rule that says whether
features (and so a refiner trained on them) are compatible."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from boxrefine.shared.config import PipelineConfig
from boxrefine.shared.geometry.frames import IMG_SIZE
from boxrefine.shared.model.sam import PIXEL_MEAN, PIXEL_STD
from boxrefine.shared.store.location import StoreError
from boxrefine.shared.yamlkeys import dict_differences

# The parts of a store identity that decide the features a refiner sees (the GT mask size does not).
# the identity fields that decide the feature values (the others, e.g. gt_mask_size, only the GT)
FEATURE_FIELDS = ("model_type", "checkpoint", "img_size", "pixel_mean", "pixel_std", "dtype", "encoder_precision",
                  "intensity")


def feature_differences(have: StoreIdentity | dict[str, Any], want: StoreIdentity | dict[str, Any],
                        names: tuple[str, str], fields: tuple[str, ...] = FEATURE_FIELDS) -> list[str]:
    """The one compatibility rule for features: what differs between two identities (or their saved
    dicts) in the fields that decide the feature values, each naming both values (``names``: what to
    call each side). A refiner works only on features made as the ones it was trained on: evaluate
    (checkpoint vs store), ``train --resume`` (checkpoint vs store), refine and ``RefinePredictor``
    (checkpoint vs config or store) and ``extract --reuse-features`` (old store vs new) all ask it."""
    a = have.to_dict() if isinstance(have, StoreIdentity) else dict(have)
    b = want.to_dict() if isinstance(want, StoreIdentity) else dict(want)
    return dict_differences({k: a.get(k) for k in fields}, {k: b.get(k) for k in fields}, names)


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that decides the *values* in a store. Two configs with different identities must
    never write to, or read from, the same store."""

    model_type: str
    checkpoint: str  # "sha256:<hex>" or "random-init:seed=<n>"
    img_size: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    dtype: str
    encoder_precision: str
    gt_mask_size: int
    intensity: str  # how images that are not 8-bit were mapped to 8 bits (shared/data/imageio.py Intensity)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pixel_mean"], d["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreIdentity:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["pixel_mean"], d["pixel_std"] = tuple(d["pixel_mean"]), tuple(d["pixel_std"])
        return cls(**d)

    def differences(self, other: StoreIdentity) -> list[str]:
        return dict_differences(self.to_dict(), other.to_dict(), ("store has", "config gives"))


def identity_for(cfg: PipelineConfig, checkpoint_fingerprint: str) -> StoreIdentity:
    """The identity a store made (or read) with this config must have."""
    return StoreIdentity(model_type=cfg.model.type, checkpoint=checkpoint_fingerprint, img_size=IMG_SIZE,
                         pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, dtype=cfg.store.dtype,
                         encoder_precision=cfg.extract.encoder_precision, gt_mask_size=cfg.store.gt_mask_size,
                         intensity=cfg.data.intensity.mapping().fingerprint)


def check_identity(store_path: str, store_id: StoreIdentity, wanted: StoreIdentity) -> None:
    diffs = store_id.differences(wanted)
    if diffs:
        raise StoreError(f"{store_path}: store was made with a different model/checkpoint/preprocessing: "
                         + "; ".join(diffs)
                         + ". Use another store path, or --overwrite to rebuild this one.")
