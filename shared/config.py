"""Typed configuration for ``pipeline.yaml``.

One pydantic model per YAML section; unknown keys are rejected; every error is collected and
reported with its dotted YAML key (``extract.batch_size: Input should be ...``). Stages receive a
:class:`PipelineConfig`, never raw YAML.

Relative paths in the file are resolved against the directory holding the YAML file, so a config
works from any working directory. A store path that is a URL (``s3://...``) is left as it is.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from boxrefine.shared.data.intensity import Intensity
from boxrefine.shared.errors import BoxrefineError
from boxrefine.shared.runtime.shards import parse_shard
from boxrefine.shared.runtime.urls import is_url
from boxrefine.shared.yamlkeys import DuplicateKeyError, UniqueKeyLoader, flatten, set_dotted

MODEL_TYPES = ("vit_tiny", "vit_b", "vit_l", "vit_h")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(BoxrefineError, ValueError):
    """A config file or override that does not validate. ``errors`` holds (yaml_key, message)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {key}: {msg}" for key, msg in errors)
        super().__init__(f"{source}: {len(errors)} config error(s):\n{lines}")

    exit_code = 2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """One data split: an image folder and its COCO instances JSON (+ optional detections).

    Without ``annotations`` the split is *images only*: every image under ``images`` (recursively,
    common image extensions), sizes from the image headers, no ground truth. A COCO file with images
    and no annotations is images only too. Such splits can be extracted and refined, not trained
    on or scored."""

    images: Path
    annotations: Path | None = None
    detections: Path | None = None

    @property
    def images_only(self) -> bool:
        """True when the config gives no annotation file (a COCO file without annotations is found
        out when it is read)."""
        return self.annotations is None


class IntensityConfig(_Section):
    """How images that are not 8-bit become 8-bit (``shared/data/imageio.py`` ``Intensity``)."""

    mode: Literal["percentile", "range", "none"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    range: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> IntensityConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(self.percentiles)}")
        if self.mode == "range" and (self.range is None or not self.range[0] < self.range[1]):
            raise ValueError("mode 'range' needs range: [low, high] with low < high")
        return self

    def mapping(self) -> Intensity:
        return Intensity(self.mode, tuple(self.percentiles), tuple(self.range) if self.range else None)


class DataConfig(_Section):
    splits: dict[str, SplitConfig] = Field(min_length=1)
    intensity: IntensityConfig = IntensityConfig()

    @field_validator("splits")
    @classmethod
    def _names(cls, v: dict[str, SplitConfig]) -> dict[str, SplitConfig]:
        bad = [k for k in v if not _SPLIT_NAME.match(k)]
        if bad:
            raise ValueError(f"split names must match [A-Za-z0-9_-]+, got {bad}")
        return v


class ModelConfig(_Section):
    type: Literal["vit_tiny", "vit_b", "vit_l", "vit_h"] = "vit_tiny"
    checkpoint: Path | None = None
    seed: int = 0
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", v):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v


class StoreConfig(_Section):
    path: str
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    codec: Literal["none", "zstd", "lz4"] = "none"  # of the features; GT masks are always compressed
    clevel: int = Field(3, ge=0, le=9)
    gt_mask_size: int = Field(256, ge=16, le=1024)
    on_damage: Literal["error", "skip"] = "error"


class ExtractConfig(_Section):
    splits: list[str] | None = None
    batch_size: int = Field(1, ge=1)
    num_workers: int = Field(2, ge=0)
    write_threads: int = Field(2, ge=1)
    encoder_precision: Literal["float32", "float16", "bfloat16"] = "float32"
    shard: str | None = None
    strict: bool = False
    overwrite: bool = False
    reuse_features: str | None = None  # another store to copy unchanged images' features from
    watch: bool = False  # run as a service until SIGTERM/SIGINT, re-planning every watch_interval seconds
    watch_interval: float = Field(60.0, gt=0.0)

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is not None:
            parse_shard(v)
        return v


class RefinerConfig(_Section):
    roi_size: int = Field(7, ge=2, le=32)
    hidden: int = Field(64, ge=8, multiple_of=8)
    context: float = Field(1.5, ge=1.0, le=4.0)
    use_mask: bool = True
    norm: Literal["layer", "none"] = "layer"
    head: Literal["sides", "box"] = "sides"


class TrainConfig(_Section):
    train_split: str = "train"
    val_split: str | None = None  # None: the split named "val" when data.splits has one
    runs_dir: Path = Path("runs")
    name: str | None = None
    epochs: int = Field(20, ge=1)
    batch_images: int = Field(2, ge=1)
    boxes_per_image: int = Field(8, ge=1)
    jitter: float = Field(0.25, gt=0.0, le=0.5)
    use_detections: bool = True
    match_iou: float = Field(0.5, gt=0.0, le=1.0)
    sample_ratio: float = Field(1.0, gt=0.0, le=1.0)
    resample_each_epoch: bool = False
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    l1_weight: float = Field(1.0, ge=0.0)
    giou_weight: float = Field(1.0, ge=0.0)
    amp: Literal["auto"] | bool = "auto"
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    eval_every: int = Field(1, ge=1)
    keep_top_k: int = Field(3, ge=0)
    num_workers: int = Field(2, ge=0)
    prefetch_batches: int = Field(2, ge=1)  # batches each DataLoader worker reads ahead (prefetch_factor)
    seed: int = 0
    follow: bool = False  # each epoch trains on the rows complete when it starts (an extractor is running)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _SPLIT_NAME.match(v):
            raise ValueError("run names must match [A-Za-z0-9_-]+")
        return v


class RefineConfig(_Section):
    checkpoint: Path | None = None  # a refiner checkpoint file or a run folder (its best.pt)
    min_score: float = 0.0
    low_score: Literal["keep", "drop"] = "keep"
    masks: bool = False
    vis: bool = False
    vis_count: int = Field(10, ge=1)
    batch_images: int = Field(2, ge=1)


class EvaluateConfig(_Section):
    split: str | None = None  # None: train's validation split
    checkpoint: Path | None = None
    jitter: float = Field(0.25, gt=0.0, le=0.5)
    seed: int = 1234
    batch_images: int = Field(2, ge=1)
    vis: bool = False
    vis_count: int = Field(6, ge=1)
    missing_score: float | None = Field(None, ge=0.0, le=1.0)  # None: a detection without a score is an error
    gallery: int = Field(8, ge=0)  # boxes per gallery of the report (0: none, no image opened)
    noise: list[float] = []  # GT jitter levels of the robustness curve (--noise 0.1,0.2,...)

    @field_validator("noise")
    @classmethod
    def _noise(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < x <= 1.0 for x in v):
            raise ValueError("noise levels must be in (0, 1]")
        return sorted(set(v))


class PipelineConfig(_Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    store: StoreConfig
    extract: ExtractConfig = ExtractConfig()
    refiner: RefinerConfig = RefinerConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    refine: RefineConfig = RefineConfig()
    fast: dict[str, dict[str, Any]] = {}
    fast_applied: dict[str, Any] = {}  # filled by load_config(fast=True): what FAST changed

    def val_split(self) -> str | None:
        """The split train evaluates on (``train.val_split``, else "val" if configured)."""
        if self.train.val_split is not None:
            return self.train.val_split
        val = self.data.splits.get("val")
        return "val" if val is not None and not val.images_only else None  # images only: nothing to score

    def eval_split(self) -> str | None:
        return self.evaluate.split if self.evaluate.split is not None else self.val_split()

    def cross_errors(self) -> list[tuple[str, str]]:
        """Checks that span sections, as (yaml_key, message)."""
        errors = []
        for key, split in (("train.train_split", self.train.train_split), ("train.val_split", self.train.val_split),
                           ("evaluate.split", self.evaluate.split)):
            if split is not None and split not in self.data.splits:
                errors.append((key, f"split {split!r} is not in data.splits {sorted(self.data.splits)}"))
            elif split is not None and self.data.splits[split].images_only:
                errors.append((key, f"split {split!r} is images only (data.splits.{split}.annotations is not set): "
                                    "training and scoring need ground truth; `boxrefine refine` uses such splits"))
        if self.extract.splits is not None:
            unknown = [s for s in self.extract.splits if s not in self.data.splits]
            if unknown:
                errors.append(("extract.splits", f"names unknown split(s) {unknown}; "
                                                 f"data.splits has {sorted(self.data.splits)}"))
        return errors

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data (saved beside every output)."""
        return self.model_dump(mode="json")


def parse_set_option(item: str) -> tuple[str, Any]:
    """``"extract.batch_size=4"`` → ``("extract.batch_size", 4)`` (value parsed as YAML; ``KEY=null``
    sets the key to null)."""
    if "=" not in item:
        raise ConfigError("--set", [(item, "expected KEY=VALUE, e.g. extract.batch_size=4")])
    key, _, value = item.partition("=")
    key = key.strip()
    try:
        return key, yaml.load(value, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        problem = str(e) if isinstance(e, DuplicateKeyError) else getattr(e, "problem", None) or type(e).__name__
        raise ConfigError("--set", [(key, f"not a valid YAML value ({problem}): {value!r}")]) from None


def _resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    for split in cfg.data.splits.values():
        split.images = fix(split.images)
        split.annotations = fix(split.annotations)
        split.detections = fix(split.detections)
    cfg.model.checkpoint = fix(cfg.model.checkpoint)
    cfg.train.runs_dir = fix(cfg.train.runs_dir)
    cfg.evaluate.checkpoint = fix(cfg.evaluate.checkpoint)
    cfg.refine.checkpoint = fix(cfg.refine.checkpoint)
    if not is_url(cfg.store.path):
        raw = cfg.store.path.removeprefix("file://")
        cfg.store.path = str(fix(Path(raw)))
    return cfg


def _key_of(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _validate(raw: dict[str, Any]) -> tuple[PipelineConfig | None, list[tuple[str, str]]]:
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            errors.append((_key_of(err["loc"]), msg))
        return None, errors
    return cfg, cfg.cross_errors()


def names_section(key: str) -> bool:
    """Whether a dotted key names a whole section (``train``, ``data.splits.val``) rather than a value."""
    node: Any = PipelineConfig
    for part in key.split("."):
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return False
    return (isinstance(node, type) and issubclass(node, BaseModel)) or typing.get_origin(node) is dict


def apply_override(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set one dotted override in ``raw``. A section is never replaced whole, which would silently drop
    the keys the YAML gives it: a mapping is applied key by key, and null is refused."""
    if not names_section(key):
        set_dotted(raw, key, value)
    elif isinstance(value, dict):
        for sub, v in (flatten(value, f"{key}.") if value else {}).items():
            apply_override(raw, sub, v, source)
    else:
        shown = "null" if value is None else repr(value)
        raise ConfigError(source, [(key, f"is a section; it cannot be set to {shown}: set its keys one by one "
                                         f"(e.g. --set {key}.KEY=VALUE)")])


def validate_config(raw: Any, source: str, base: Path, fast: bool = False,
                    overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate already-parsed YAML data; raise :class:`ConfigError` listing every problem.

    The ``fast:`` block holds dotted overrides (``train: {sample_ratio: 0.1}``) that ``fast=True``
    applies before ``overrides`` (CLI flags). It is validated in every case, its errors reported
    under ``fast.<key>``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<root>", "the file must hold a mapping of sections")])
    raw = copy.deepcopy(raw)
    cfg, errors = _validate(raw)
    block = raw.get("fast") if isinstance(raw.get("fast"), dict) else {}
    fast_keys = flatten(block)
    merged = copy.deepcopy(raw)
    merged.pop("fast", None)
    for key, value in fast_keys.items():
        set_dotted(merged, key, value)
    if not errors and fast_keys:
        _, fast_errors = _validate(merged)
        errors += [(f"fast.{k}", m) for k, m in fast_errors if any(k.startswith(f) for f in fast_keys)]
        errors += [(k, m) for k, m in fast_errors if not any(k.startswith(f) for f in fast_keys)]
    if errors:
        raise ConfigError(source, errors)
    if fast or overrides:
        final = merged if fast else raw
        for key, value in (overrides or {}).items():
            apply_override(final, key, value, source)
        cfg, errors = _validate(final)
        if errors:
            raise ConfigError(source, errors)
        assert cfg is not None
        if fast:
            cfg.fast_applied = fast_keys
    assert cfg is not None
    return _resolve_paths(cfg, base)


def load_config(path: Path | str, overrides: dict[str, Any] | None = None, fast: bool = False) -> PipelineConfig:
    """Read ``path`` (YAML, safe loading, a key given twice refused), apply the ``fast:`` block if
    ``fast``, then the dotted ``overrides`` (``--set`` and CLI flags; a None value sets the key to
    null), and validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), [("<file>", f"cannot read: {e.strerror or e}")]) from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise ConfigError(str(path), [(e.key, f"duplicate key (lines {e.lines[0]} and {e.lines[1]}); remove one")]
                          ) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        pos = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(str(path), [("<yaml>", f"not valid YAML{pos}: {getattr(e, 'problem', e)}")]) from None
    raw = raw if raw is not None else {}
    return validate_config(raw, str(path), path.resolve().parent, fast=fast, overrides=overrides)
