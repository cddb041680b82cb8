"""Reading the user's YAML files safely, with errors that name the file.

Specs and recipes are small hand-written files, so the loader refuses what only an accident or an
attack produces, each with one line:

- a file over `MAX_YAML_BYTES` (read no further than that, so a 50 MB file costs nothing);
- aliases (`*name`): a "billion laughs" document expands a few hundred bytes into gigabytes;
- nesting deeper than `MAX_DEPTH`, keys that are not plain text, and duplicate keys (YAML itself
  would silently keep the last one);
- tags outside plain data (`!!set`, `!!binary`, `!!omap`, merge keys `<<`); a date stays text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from lora_pipeline.core.errors import UserError

MAX_YAML_BYTES = 1_000_000
MAX_DEPTH = 20
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: fast


class _PlainDataLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that keeps dates as the text they were written as."""


_PlainDataLoader.add_constructor(_TAG + "timestamp", yaml.SafeLoader.construct_yaml_str)


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _check_tree(root: yaml.Node, path: Path) -> None:
    """Walk the composed node graph (iteratively: no recursion limit) before anything is constructed."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:  # the composer hands an alias back as the very node it names
            raise UserError(f"YAML aliases (*name) are not allowed (the anchor is at {_where(node)})", path)
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise UserError(f"nested deeper than {MAX_DEPTH} levels ({_where(node)})", path)
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise UserError(f"YAML tag {node.tag.replace(_TAG, '!!')} is not allowed ({_where(node)})", path)
        elif isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                raise UserError(f"YAML tag {node.tag.replace(_TAG, '!!')} is not allowed ({_where(node)})", path)
            stack.extend((item, depth + 1) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                raise UserError(f"YAML tag {node.tag.replace(_TAG, '!!')} is not allowed ({_where(node)})", path)
            keys: set[str] = set()
            for key, value in node.value:
                if key.tag == _TAG + "merge":
                    raise UserError(f"YAML merge keys (<<) are not allowed ({_where(key)})", path)
                if not (isinstance(key, yaml.ScalarNode) and key.tag == _TAG + "str"):
                    raise UserError(f"mapping keys must be plain text ({_where(key)})", path)
                if key.value in keys:
                    raise UserError(f"duplicate key {key.value!r} ({_where(key)})", path)
                keys.add(key.value)
                stack.append((value, depth + 1))


def read_limited(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file, refusing (without reading it) one larger than `max_bytes`."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise UserError(f"{what} is larger than the limit of {max_bytes:,} bytes", path)
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError("file not found", path) from None
    except IsADirectoryError:
        raise UserError("expected a file, found a folder", path) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", path) from None
    if len(data) > max_bytes:  # it grew while we looked
        raise UserError(f"{what} is larger than the limit of {max_bytes:,} bytes", path)
    return data


def parse_yaml(text: str, path: Path) -> Any:
    """The plain data (dicts, lists, str, int, float, bool, None) of one YAML document."""
    loader = _PlainDataLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserError(f"invalid YAML{where}: {problem}", path) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer with more digits than Python converts
        raise UserError(f"invalid YAML value: {' '.join(str(exc).split())}", path) from None
    finally:
        loader.dispose()


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """A spec or recipe file as a mapping of fields; UserError (one line, naming the file) otherwise."""
    data = read_limited(path, MAX_YAML_BYTES, "a YAML file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", path) from None
    mapping = parse_yaml(text, path)
    if not isinstance(mapping, dict):
        raise UserError("expected a mapping of fields at the top level", path)
    return mapping
