"""shared/config.py: every shipped YAML parses; unknown keys and bad values are reported by their
dotted YAML key, all at once; overrides; path resolution; round trip through to_dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, config_dict

from boxrefine.shared.config import ConfigError, PipelineConfig, load_config, parse_set_option, validate_config

_SKIP_DIRS = {".venv", "data", "runs"}


def _shipped_yaml() -> list[Path]:
    found = set(REPO.glob("*.yaml")) | set(REPO.glob("**/*.yaml"))
    keep = []
    for p in found:
        rel = p.relative_to(REPO).parts
        if rel[0] in _SKIP_DIRS or rel[:2] == ("bench", "out") or any(part.startswith(".") for part in rel):
            continue  # the venv, generated data, run and benchmark outputs, hidden tool configs (.github, ...)
        keep.append(p)
    return sorted(keep)


SHIPPED = _shipped_yaml()


def test_shipped_configs_found() -> None:
    assert REPO / "pipeline.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.data.splits, "a shipped config must name at least one split"
    for split in cfg.data.splits.values():
        assert split.images.is_absolute() and split.annotations.is_absolute()


def test_pipeline_yaml_values() -> None:
    cfg = load_config(REPO / "pipeline.yaml")
    assert sorted(cfg.data.splits) == ["train", "val"]
    assert cfg.data.splits["train"].images == REPO / "data/demo/images/train"
    assert cfg.store.path == str(REPO / "data/demo/features.zarr")
    assert (cfg.model.type, cfg.model.checkpoint, cfg.store.dtype) == ("vit_tiny", None, "float16")


# ----------------------------------------------------------------------------------------- helpers


def _write(tmp_path: Path, raw: Any, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


def _raw(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    return config_dict(tmp_path / "d", tmp_path / "store.zarr", **sections)


def _errors(tmp_path: Path, raw: Any, overrides: dict[str, Any] | None = None) -> ConfigError:
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    assert ei.value.source == str(path)
    assert str(ei.value).startswith(f"{path}: {len(ei.value.errors)} config error(s):")
    return ei.value


def _keys(err: ConfigError) -> list[str]:
    return [k for k, _ in err.errors]


# ------------------------------------------------------------------------------------ unknown keys


def test_unknown_keys_all_reported_in_one_error(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["extract"]["bogus"] = 1
    raw["model"]["foo"] = "bar"
    raw["trainer"] = {"epochs": 3}  # an unknown top-level section
    raw["data"]["splits"]["train"]["imgs"] = "x"  # a typo deep inside
    err = _errors(tmp_path, raw)
    assert sorted(err.errors) == sorted([
        ("extract.bogus", "unknown key"),
        ("model.foo", "unknown key"),
        ("trainer", "unknown key"),
        ("data.splits.train.imgs", "unknown key"),
    ])
    text = str(err)
    assert "4 config error(s)" in text
    for key in ("extract.bogus", "model.foo", "trainer", "data.splits.train.imgs"):
        assert f"  {key}: unknown key" in text.splitlines()


def test_unknown_key_and_bad_value_together(tmp_path: Path) -> None:
    raw = _raw(tmp_path, extract={"batch_size": 0, "bogus": True}, store={"dtype": "float8"})
    err = _errors(tmp_path, raw)
    assert sorted(_keys(err)) == ["extract.batch_size", "extract.bogus", "store.dtype"]


def test_missing_required_sections(tmp_path: Path) -> None:
    err = _errors(tmp_path, {"model": {"type": "vit_b"}})
    assert sorted(_keys(err)) == ["data", "store"]


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_reports_missing_sections(tmp_path: Path, text: str) -> None:
    err = _errors(tmp_path, text)
    assert sorted(_keys(err)) == ["data", "store"]


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    err = _errors(tmp_path, "- a\n- b\n")
    assert _keys(err) == ["<root>"]


# -------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("section", "key", "value", "fragment"), [
    ("extract", "batch_size", 0, "greater than or equal to 1"),
    ("store", "dtype", "float8", "float16"),
    ("model", "type", "vit_x", "vit_tiny"),
    ("model", "device", "gpu", "cuda:N"),
    ("extract", "shard", "3/2", "0 <= i < n"),
    ("extract", "shard", "two", "i/n"),
    ("store", "clevel", 12, "less than or equal to 9"),
    ("store", "gt_mask_size", 8, "greater than or equal to 16"),
    ("extract", "num_workers", -1, "greater than or equal to 0"),
    ("train", "prefetch_batches", 0, "greater than or equal to 1"),
    ("store", "codec", "gzip", "none"),
])
def test_bad_value_names_its_key(tmp_path: Path, section: str, key: str, value: Any, fragment: str) -> None:
    err = _errors(tmp_path, _raw(tmp_path, **{section: {key: value}}))
    assert len(err.errors) == 1
    got_key, msg = err.errors[0]
    assert got_key == f"{section}.{key}"
    assert fragment in msg
    assert f"  {section}.{key}: " in str(err)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_good_devices_accepted(tmp_path: Path, device: str) -> None:
    assert load_config(_write(tmp_path, _raw(tmp_path, model={"device": device}))).model.device == device


def test_bad_split_name(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["data"]["splits"]["bad name"] = raw["data"]["splits"].pop("val")
    err = _errors(tmp_path, raw)
    assert _keys(err) == ["data.splits"]
    assert "bad name" in err.errors[0][1]


def test_extract_splits_must_name_data_splits(tmp_path: Path) -> None:
    err = _errors(tmp_path, _raw(tmp_path, extract={"splits": ["train", "nope"]}))
    assert _keys(err) == ["extract.splits"]
    msg = err.errors[0][1]
    assert "'nope'" in msg and "data.splits" in msg
    assert "'train'" not in msg.split(";")[0], "only the unknown split is reported as unknown"


def test_extract_splits_known_names_accepted(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _raw(tmp_path, extract={"splits": ["val"]})))
    assert cfg.extract.splits == ["val"]


# ------------------------------------------------------------------------------------ file problems


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = "data:\n  splits:\n    train: {images: a\nstore:\n  path: x\n"  # unclosed flow mapping
    err = _errors(tmp_path, text)
    assert _keys(err) == ["<yaml>"]
    assert "not valid YAML (line " in err.errors[0][1]

    err = _errors(tmp_path, "a: b\n  c: d\n")  # bad indentation on line 2
    assert "(line 2)" in err.errors[0][1]


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pipeline.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(missing)
    assert str(ei.value).startswith(str(missing))
    assert ei.value.errors[0][0] == "<file>"
    assert "cannot read" in ei.value.errors[0][1]


# --------------------------------------------------------------------------------------- overrides


def test_override_wins_over_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _raw(tmp_path, extract={"batch_size": 2}))
    assert load_config(path).extract.batch_size == 2
    cfg = load_config(path, {"extract.batch_size": 4, "store.dtype": "bfloat16", "train.grad_clip": None})
    assert cfg.extract.batch_size == 4
    assert cfg.store.dtype == "bfloat16"
    assert cfg.train.grad_clip is None, "a None override is `--set KEY=null`: it sets the key to null"


def test_override_creates_missing_section(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    del raw["extract"]
    cfg = load_config(_write(tmp_path, raw), {"extract.shard": "1/2"})
    assert cfg.extract.shard == "1/2"
    assert cfg.extract.batch_size == 1  # the rest of the section keeps its defaults


def test_bad_override_reported_under_its_key(tmp_path: Path) -> None:
    err = _errors(tmp_path, _raw(tmp_path), {"extract.batch_size": 0, "extract.nope": 1})
    assert sorted(_keys(err)) == ["extract.batch_size", "extract.nope"]


@pytest.mark.parametrize(("item", "expected"), [
    ("extract.batch_size=4", ("extract.batch_size", 4)),
    (" extract.strict = true", ("extract.strict", True)),
    ("extract.splits=[train, val]", ("extract.splits", ["train", "val"])),
    ("store.path=s3://bucket/a=b.zarr", ("store.path", "s3://bucket/a=b.zarr")),
    ("model.checkpoint=null", ("model.checkpoint", None)),
    ("extract.shard='1/2'", ("extract.shard", "1/2")),
])
def test_parse_set_option(item: str, expected: tuple[str, Any]) -> None:
    assert parse_set_option(item) == expected


def test_parse_set_option_without_equals() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_set_option("extract.batch_size")
    assert ei.value.errors[0][0] == "extract.batch_size"
    assert "KEY=VALUE" in ei.value.errors[0][1]


# ---------------------------------------------------------------------------------- path resolution


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "project" / "conf"
    sub.mkdir(parents=True)
    raw = {
        "data": {"splits": {"train": {"images": "imgs/train", "annotations": "../ann/train.json"}}},
        "model": {"checkpoint": "weights/sam.pth"},
        "store": {"path": "out/features.zarr"},
    }
    path = _write(sub, raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    cfg = load_config(path)
    train = cfg.data.splits["train"]
    assert train.images == sub / "imgs" / "train"
    assert train.images.is_absolute()
    assert train.annotations.resolve() == (tmp_path / "project" / "ann" / "train.json")
    assert train.detections is None
    assert cfg.model.checkpoint == sub / "weights" / "sam.pth"
    assert cfg.store.path == str(sub / "out" / "features.zarr")


def test_relative_config_path_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    _write(sub, {"data": {"splits": {"train": {"images": "i", "annotations": "a.json"}}},
                 "store": {"path": "s.zarr"}})
    monkeypatch.chdir(tmp_path)
    cfg = load_config("conf/cfg.yaml")
    assert cfg.data.splits["train"].images == sub / "i"
    assert cfg.store.path == str(sub / "s.zarr")


def test_absolute_paths_unchanged(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    cfg = load_config(_write(tmp_path / "x", _raw(tmp_path)))
    assert cfg.data.splits["val"].annotations == tmp_path / "d" / "annotations" / "instances_val.json"
    assert cfg.store.path == str(tmp_path / "store.zarr")


@pytest.mark.parametrize("url", ["s3://bucket/x.zarr", "gs://b/features.zarr", "memory://abc.zarr"])
def test_store_url_left_untouched(tmp_path: Path, url: str) -> None:
    cfg = load_config(_write(tmp_path, _raw(tmp_path, store={"path": url})))
    assert cfg.store.path == url


def test_file_url_becomes_a_path(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _raw(tmp_path, store={"path": "file://rel/f.zarr"})))
    assert cfg.store.path == str(tmp_path / "rel" / "f.zarr")
    cfg = load_config(_write(tmp_path, _raw(tmp_path, store={"path": f"file://{tmp_path}/abs.zarr"})))
    assert cfg.store.path == str(tmp_path / "abs.zarr")


# ------------------------------------------------------------------------------------------ to_dict


def test_to_dict_round_trips(tmp_path: Path) -> None:
    raw = _raw(tmp_path, extract={"splits": ["train"], "shard": "0/3", "encoder_precision": "bfloat16"},
               store={"dtype": "bfloat16", "codec": "lz4", "clevel": 5, "gt_mask_size": 128},
               model={"type": "vit_b", "checkpoint": "w.pth", "seed": 7})
    cfg = load_config(_write(tmp_path, raw))
    d = cfg.to_dict()
    # plain JSON-able data: paths are strings
    assert isinstance(d["data"]["splits"]["train"]["images"], str)
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    again = validate_config(d, "<roundtrip>", tmp_path / "somewhere-else")
    assert again == cfg
    assert again.to_dict() == d
    assert again.model.checkpoint == tmp_path / "w.pth"
