"""Config validation at every boundary (``shared/config.py``): each numeric limit accepts its edge
and refuses the value just past it, every cross-section rule and validator branch, the ``fast:`` block,
overrides of sections, shard parsing, the splits train and evaluate default to. In memory, no files
except where a path is the point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import config_dict

from boxrefine.shared.config import (
    ConfigError,
    apply_override,
    load_config,
    names_section,
    parse_set_option,
    parse_shard,
    validate_config,
)


def _validate(tmp_path: Path, overrides: dict[str, Any] | None = None, apply_fast: bool = False, **sections: Any):
    raw = config_dict(tmp_path, tmp_path / "s.zarr", **sections)
    return validate_config(raw, "<test>", tmp_path, fast=apply_fast, overrides=overrides)


def _error_keys(tmp_path: Path, **kw: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        _validate(tmp_path, **kw)
    return dict(e.value.errors)


# (section, key, accepted at the edge, refused just past it)
LIMITS = [
    ("store", "clevel", [0, 9], [-1, 10]),
    ("store", "gt_mask_size", [16, 1024], [15, 1025]),
    ("extract", "batch_size", [1], [0]),
    ("extract", "num_workers", [0], [-1]),
    ("extract", "write_threads", [1], [0]),
    ("extract", "watch_interval", [0.001], [0.0]),
    ("refiner", "roi_size", [2, 32], [1, 33]),
    ("refiner", "hidden", [8, 16], [0, 12, 4]),
    ("refiner", "context", [1.0, 4.0], [0.99, 4.01]),
    ("train", "epochs", [1], [0]),
    ("train", "batch_images", [1], [0]),
    ("train", "boxes_per_image", [1], [0]),
    ("train", "jitter", [0.001, 0.5], [0.0, 0.51]),
    ("train", "match_iou", [0.001, 1.0], [0.0, 1.01]),
    ("train", "sample_ratio", [0.001, 1.0], [0.0, 1.01]),
    ("train", "lr", [1e-9], [0.0]),
    ("train", "weight_decay", [0.0], [-1e-9]),
    ("train", "warmup_epochs", [0.0], [-0.5]),
    ("train", "grad_clip", [0.001, None], [0.0]),
    ("train", "l1_weight", [0.0], [-0.1]),
    ("train", "giou_weight", [0.0], [-0.1]),
    ("train", "eval_every", [1], [0]),
    ("train", "keep_top_k", [0], [-1]),
    ("train", "num_workers", [0], [-1]),
    ("refine", "vis_count", [1], [0]),
    ("refine", "batch_images", [1], [0]),
    ("evaluate", "jitter", [0.001, 0.5], [0.0, 0.51]),
    ("evaluate", "batch_images", [1], [0]),
    ("evaluate", "vis_count", [1], [0]),
    ("evaluate", "missing_score", [0.0, 1.0, None], [-0.01, 1.01]),
]


@pytest.mark.parametrize("section,key,ok,bad", LIMITS, ids=[f"{s}.{k}" for s, k, _, _ in LIMITS])
def test_each_limit_accepts_its_edge_and_refuses_past_it(tmp_path: Path, section: str, key: str, ok: list,
                                                         bad: list) -> None:
    for v in ok:
        cfg = _validate(tmp_path, **{section: {key: v}})
        assert getattr(getattr(cfg, section), key) == v
    for v in bad:
        assert list(_error_keys(tmp_path, **{section: {key: v}})) == [f"{section}.{key}"], v


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, tmp_path / "s.zarr")
    del raw["extract"], raw["model"]
    cfg = validate_config(raw, "<test>", tmp_path)
    assert (cfg.store.dtype, cfg.store.codec, cfg.store.clevel, cfg.store.gt_mask_size, cfg.store.on_damage) == (
        "float16", "none", 3, 256, "error")
    assert (cfg.extract.batch_size, cfg.extract.num_workers, cfg.extract.write_threads) == (1, 2, 2)
    assert cfg.extract.watch_interval == 60.0 and cfg.extract.encoder_precision == "float32"
    assert (cfg.refiner.roi_size, cfg.refiner.hidden, cfg.refiner.context, cfg.refiner.head) == (7, 64, 1.5, "sides")
    assert cfg.refiner.use_mask is True and cfg.refiner.norm == "layer"
    t = cfg.train
    assert (t.epochs, t.batch_images, t.boxes_per_image, t.jitter, t.match_iou, t.sample_ratio) == (
        20, 2, 8, 0.25, 0.5, 1.0)
    assert (t.lr, t.weight_decay, t.warmup_epochs, t.grad_clip, t.eval_every, t.keep_top_k, t.seed) == (
        1e-3, 1e-4, 1.0, 1.0, 1, 3, 0)
    assert (cfg.evaluate.jitter, cfg.evaluate.seed, cfg.evaluate.missing_score) == (0.25, 1234, None)
    assert (cfg.refine.min_score, cfg.refine.low_score, cfg.refine.vis_count) == (0.0, "keep", 10)
    assert (cfg.model.type, cfg.model.seed, cfg.model.device) == ("vit_tiny", 0, "auto")
    assert cfg.data.intensity.mode == "percentile" and cfg.data.intensity.percentiles == (0.5, 99.5)
    e = cfg.extract
    assert (e.strict, e.overwrite, e.watch, e.shard, e.reuse_features) == (False, False, False, None, None)
    assert (t.use_detections, t.resample_each_epoch, t.follow, t.l1_weight, t.giou_weight) == (
        True, False, False, 1.0, 1.0)
    assert (t.num_workers, t.prefetch_batches) == (2, 2)
    r = cfg.refine
    assert (r.masks, r.vis, r.vis_count, r.batch_images, r.checkpoint) == (False, False, 10, 2, None)
    v = cfg.evaluate
    assert (v.batch_images, v.vis, v.vis_count, v.gallery, v.noise, v.split, v.checkpoint) == (
        2, False, 6, 8, [], None, None)
    assert cfg.fast_applied == {}  # fast mode only when asked for


@pytest.mark.parametrize("percentiles,ok", [((0.0, 100.0), True), ((0.0, 0.1), True), ((-0.1, 50.0), False),
                                            ((5.0, 5.0), False), ((6.0, 5.0), False), ((1.0, 100.1), False)])
def test_intensity_percentiles(tmp_path: Path, percentiles, ok: bool) -> None:
    kw = {"data": {"intensity": {"percentiles": list(percentiles)}}}
    if ok:
        assert _validate(tmp_path, **kw).data.intensity.mapping().percentiles == percentiles
    else:
        assert "0 <= low < high <= 100" in _error_keys(tmp_path, **kw)["data.intensity"]


def test_intensity_range_mode_needs_an_increasing_range(tmp_path: Path) -> None:
    m = _validate(tmp_path, data={"intensity": {"mode": "range", "range": [0, 4095]}}).data.intensity.mapping()
    assert (m.mode, m.range) == ("range", (0.0, 4095.0))
    for bad in (None, [5, 5], [6, 5]):
        intensity = {"mode": "range"} if bad is None else {"mode": "range", "range": bad}
        assert "needs range" in _error_keys(tmp_path, data={"intensity": intensity})["data.intensity"]
    none = _validate(tmp_path, data={"intensity": {"mode": "none", "range": [6, 5]}}).data.intensity.mapping()
    assert none.mode == "none" and none.range == (6.0, 5.0)
    assert _validate(tmp_path).data.intensity.mapping().range is None


@pytest.mark.parametrize("device,ok", [("auto", True), ("cuda:12", True), ("cuda:", False), ("cpu0", False),
                                       ("xcpu", False), ("cuda:1x", False)])
def test_devices(tmp_path: Path, device: str, ok: bool) -> None:
    if ok:
        assert _validate(tmp_path, model={"device": device}).model.device == device
    else:
        assert "model.device" in _error_keys(tmp_path, model={"device": device})


@pytest.mark.parametrize("name,ok", [("run_1-a", True), ("a b", False), ("x/y", False), ("", False)])
def test_run_names(tmp_path: Path, name: str, ok: bool) -> None:
    if ok:
        assert _validate(tmp_path, train={"name": name}).train.name == name
    else:
        assert "run names must match" in _error_keys(tmp_path, train={"name": name})["train.name"]
    assert _validate(tmp_path, train={"name": None}).train.name is None


def test_split_names_list_every_bad_one(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, tmp_path / "s.zarr")
    raw["data"]["splits"]["a b"] = raw["data"]["splits"]["val"]
    raw["data"]["splits"]["c.d"] = raw["data"]["splits"]["val"]
    with pytest.raises(ConfigError) as e:
        validate_config(raw, "<test>", tmp_path)
    assert dict(e.value.errors)["data.splits"] == "split names must match [A-Za-z0-9_-]+, got ['a b', 'c.d']"
    raw["data"]["splits"] = {}
    with pytest.raises(ConfigError):
        validate_config(raw, "<test>", tmp_path)


def test_cross_section_split_rules(tmp_path: Path) -> None:
    errs = _error_keys(tmp_path, train={"train_split": "nope", "val_split": "nope2"}, evaluate={"split": "nope3"})
    assert set(errs) == {"train.train_split", "train.val_split", "evaluate.split"}
    assert "split 'nope' is not in data.splits ['train', 'val']" == errs["train.train_split"]
    raw = config_dict(tmp_path, tmp_path / "s.zarr")
    raw["data"]["splits"]["folder"] = {"images": str(tmp_path)}
    for key, section in (("train.train_split", "train"), ("train.val_split", "train"), ("evaluate.split", "evaluate")):
        sub = key.split(".")[1]
        r = {**raw, section: {sub: "folder"}}
        with pytest.raises(ConfigError) as e:
            validate_config(r, "<test>", tmp_path)
        assert "images only" in dict(e.value.errors)[key]
    ok = validate_config({**raw, "extract": {"splits": ["folder", "val"]}}, "<test>", tmp_path)
    assert ok.extract.splits == ["folder", "val"] and ok.data.splits["folder"].images_only
    with pytest.raises(ConfigError) as e:
        validate_config({**raw, "extract": {"splits": ["val", "x", "y"]}}, "<test>", tmp_path)
    assert dict(e.value.errors)["extract.splits"].startswith("names unknown split(s) ['x', 'y']")


def test_val_and_eval_split_defaults(tmp_path: Path) -> None:
    cfg = _validate(tmp_path)
    assert cfg.val_split() == "val" and cfg.eval_split() == "val"
    cfg2 = _validate(tmp_path, train={"val_split": "train"}, evaluate={"split": None})
    assert cfg2.val_split() == "train" and cfg2.eval_split() == "train"
    cfg3 = _validate(tmp_path, evaluate={"split": "train"})
    assert cfg3.eval_split() == "train" and cfg3.val_split() == "val"
    raw = config_dict(tmp_path, tmp_path / "s.zarr")
    raw["data"]["splits"]["val"] = {"images": str(tmp_path)}  # images only: nothing to score
    cfg4 = validate_config(raw, "<test>", tmp_path)
    assert cfg4.val_split() is None and cfg4.eval_split() is None
    del raw["data"]["splits"]["val"]
    assert validate_config(raw, "<test>", tmp_path).val_split() is None


@pytest.mark.parametrize("text,want", [("0/1", (0, 1)), (" 2 / 3 ", (2, 3)), ("0/0", None), ("1/1", None),
                                       ("-1/2", None), ("1/2/3", None), ("a/2", None)])
def test_parse_shard(text: str, want) -> None:
    if want is not None:
        assert parse_shard(text) == want
    else:
        with pytest.raises(ValueError, match="shard"):
            parse_shard(text)


def test_fast_block_is_validated_and_applied_only_with_fast(tmp_path: Path) -> None:
    fast = {"train": {"epochs": 2, "sample_ratio": 0.5}}
    cfg = _validate(tmp_path, apply_fast=False, fast=fast)
    assert cfg.train.epochs == 20 and cfg.fast_applied == {}
    plain = validate_config(config_dict(tmp_path, tmp_path / "s.zarr", fast=fast), "<test>", tmp_path)
    assert plain.train.epochs == 20 and plain.fast_applied == {}  # by default too
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path, tmp_path / "s.zarr", fast=fast)))
    assert load_config(path).train.epochs == 20 and load_config(path, fast=True).train.epochs == 2
    cfg = _validate(tmp_path, apply_fast=True, fast=fast)
    assert cfg.train.epochs == 2 and cfg.train.sample_ratio == 0.5
    assert cfg.fast_applied == {"train.epochs": 2, "train.sample_ratio": 0.5}
    over = _validate(tmp_path, apply_fast=True, overrides={"train.epochs": 3}, fast=fast)
    assert over.train.epochs == 3 and over.train.sample_ratio == 0.5  # CLI flags win over the fast block
    errs = _error_keys(tmp_path, fast={"train": {"epochs": 0}})
    assert list(errs) == ["fast.train.epochs"]  # reported even when not applied
    both = _error_keys(tmp_path, fast={"train": {"epochs": 0}}, train={"val_split": "zzz"})
    assert list(both) == ["train.val_split"]  # the file's own errors first: the fast block is checked after


def test_overrides_of_a_section_apply_key_by_key(tmp_path: Path) -> None:
    raw: dict[str, Any] = {"train": {"lr": 0.5, "epochs": 3}}
    apply_override(raw, "train", {"epochs": 4, "seed": 9}, "--set")
    assert raw == {"train": {"lr": 0.5, "epochs": 4, "seed": 9}}
    apply_override(raw, "train", {}, "--set")
    assert raw["train"] == {"lr": 0.5, "epochs": 4, "seed": 9}
    apply_override(raw, "train.lr", None, "--set")
    assert raw["train"]["lr"] is None
    for value in (None, 3, "x"):
        with pytest.raises(ConfigError, match="is a section; it cannot be set to"):
            apply_override(raw, "train", value, "--set")
    assert names_section("train") and names_section("data.splits") and names_section("data.splits.val")
    assert names_section("data.intensity") and not names_section("data.intensity.mode")
    assert not names_section("train.lr") and not names_section("nope") and not names_section("train.lr.x")
    cfg = _validate(tmp_path, overrides={"data.splits.val": {"detections": None}})
    assert cfg.data.splits["val"].detections is None and cfg.data.splits["val"].annotations is not None


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    raw = {"data": {"splits": {"a": {"images": "img", "annotations": "ann.json", "detections": "~/d.json"}}},
           "store": {"path": "file://rel/s.zarr"}, "model": {"checkpoint": "w.pt"},
           "train": {"train_split": "a", "runs_dir": "runs"}, "evaluate": {"checkpoint": "/abs/c.pt"},
           "refine": {"checkpoint": "r.pt"}}
    cfg = validate_config(raw, "<test>", tmp_path)
    s = cfg.data.splits["a"]
    assert s.images == tmp_path / "img" and s.annotations == tmp_path / "ann.json"
    assert s.detections == Path("~/d.json").expanduser()
    assert cfg.store.path == str(tmp_path / "rel" / "s.zarr")
    assert cfg.model.checkpoint == tmp_path / "w.pt" and cfg.train.runs_dir == tmp_path / "runs"
    assert cfg.evaluate.checkpoint == Path("/abs/c.pt") and cfg.refine.checkpoint == tmp_path / "r.pt"
    assert validate_config({**raw, "store": {"path": "s3://b/x.zarr"}}, "<t>", tmp_path).store.path == "s3://b/x.zarr"


def test_a_file_that_is_not_a_mapping_or_has_errors_names_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the file must hold a mapping of sections"):
        validate_config([1, 2], "<test>", tmp_path)
    p = tmp_path / "p.yaml"
    p.write_text("store: {path: x}\nstore: {path: y}\n")
    with pytest.raises(ConfigError, match=r"duplicate key \(lines 1 and 2\)"):
        load_config(p)
    p.write_text("store: {path: x, nope: 1}\ndata: {splits: {a: {images: i}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.errors == [("store.nope", "unknown key")] and e.value.exit_code == 2
    assert str(e.value).startswith(f"{p}: 1 config error(s):\n  store.nope: unknown key")


def test_noise_levels_are_in_0_1_sorted_and_unique(tmp_path: Path) -> None:
    assert _validate(tmp_path, evaluate={"noise": [0.3, 1.0, 0.1, 0.3]}).evaluate.noise == [0.1, 0.3, 1.0]
    assert _validate(tmp_path, evaluate={"noise": [1e-6]}).evaluate.noise == [1e-6]
    for bad in ([0.0], [1.0001], [-0.1], [0.2, 1.5]):
        assert list(_error_keys(tmp_path, evaluate={"noise": bad})) == ["evaluate.noise"], bad
    assert _validate(tmp_path, evaluate={"gallery": 0}).evaluate.gallery == 0  # no gallery, no image opened


def test_a_config_is_checked_again_when_assigned(tmp_path: Path) -> None:
    from pydantic import ValidationError

    cfg = _validate(tmp_path)
    with pytest.raises(ValidationError):
        cfg.train.lr = -1.0
    with pytest.raises(ValidationError):
        cfg.train.no_such_key = 1


def test_file_and_value_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError,
                       match=r"not a valid YAML value \(duplicate key 'a' \(lines 1 and 1\)\): '\{a: 1, a: 2\}'"):
        parse_set_option("train.lr={a: 1, a: 2}")
    with pytest.raises(ConfigError, match=r"not a valid YAML value \(expected ',' or '\]', but got '<stream end>'\)"):
        parse_set_option("train.lr=[1, 2")
    with pytest.raises(ConfigError, match="cannot be set to null"):
        apply_override({}, "train", None, "--set")
    with pytest.raises(ConfigError, match="cannot be set to 3:"):
        apply_override({}, "train", 3, "--set")
