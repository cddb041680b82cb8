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
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from lora_pipeline.core.errors import UserError

MAX_YAML_BYTES = 1_000_000
MAX_DEPTH = 20
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))

try:  # libyaml's scanner and parser when present (about 4x faster); composing stays in Python, below
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _Parser  # type: ignore[assignment]


class _PlainDataLoader(Composer, _Parser, SafeConstructor, Resolver):  # type: ignore[misc,valid-type]
    """SafeLoader whose composer refuses aliases and deep nesting, and which keeps dates as text.

    PyYAML's own C composer recurses without a limit (a deeply nested document crashes the
    interpreter), so nodes are composed by PyYAML's Python composer, counting the depth.
    """

    def __init__(self, text: str) -> None:
        _Parser.__init__(self, text)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        Composer.__init__(self)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(None, None, "aliases (*name) are not allowed", self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_PlainDataLoader.add_constructor(_TAG + "timestamp", SafeConstructor.construct_yaml_str)


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _check_tree(root: yaml.Node, path: Path) -> None:
    """Check tags and keys of the composed nodes before anything is constructed."""
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise UserError(f"YAML tag {node.tag.replace(_TAG, '!!')} is not allowed ({_where(node)})", path)
        elif isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                raise UserError(f"YAML tag {node.tag.replace(_TAG, '!!')} is not allowed ({_where(node)})", path)
            stack.extend(node.value)
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
                stack.append(value)


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
