"""Dotted keys of nested mappings, for the config loader and its users: a YAML loader that refuses
duplicate keys (PyYAML keeps the last one silently), setting a dotted key (``train.lr``), and listing
the dotted keys whose values differ between two mappings."""

from __future__ import annotations

from typing import Any

import yaml


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice in one YAML document (``key`` dotted, ``lines`` 1-based)."""

    def __init__(self, key: str, lines: tuple[int, int]):
        self.key, self.lines = key, lines
        super().__init__(f"duplicate key {key!r} (lines {lines[0]} and {lines[1]})")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in a mapping (PyYAML keeps the last one
    silently, hiding a pasted-twice or mistyped option). YAML merge keys (``<<``) are not duplicates."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def _check_unique_keys(node: yaml.Node, path: str, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias already checked (and recursive structures)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                _check_unique_keys(value_node, path, seen_nodes)
                continue
            dotted = f"{path}{key_node.value}"
            line = key_node.start_mark.line + 1
            k = (key_node.tag, key_node.value)
            if k in first_line:
                raise DuplicateKeyError(dotted, (first_line[k], line))
            first_line[k] = line
            _check_unique_keys(value_node, f"{dotted}.", seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}{i}.", seen_nodes)


def dict_differences(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("a", "b"),
                     prefix: str = "") -> list[str]:
    """Every dotted key whose value differs between two nested dicts, as
    ``"train.lr: checkpoint 0.001, now 0.0003"`` (``names`` label the two sides). Lists and tuples
    compare equal when their items do."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += dict_differences(x, y, names, f"{prefix}{k}.")
            continue
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            x, y = list(x), list(y)
        if x != y:
            out.append(f"{prefix}{k}: {names[0]} {x!r}, {names[1]} {y!r}")
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys (``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``); an empty mapping is a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
