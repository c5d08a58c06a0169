"""Read a YAML config without trusting it: bounded size, bounded alias expansion, line numbers.

Host only (PyYAML); the guest reads the resolved config as JSON. ``yaml.safe_load`` is safe
from code execution but not from size: a "billion laughs" document is a few hundred bytes
whose aliases share one node graph, and the first thing that walks the value (a type check,
an error message's ``repr``) expands it to gigabytes. So the document is only *composed* by
PyYAML (a small node graph), and this module builds plain Python values from it itself,
counting every node it visits, aliases included, and refusing beyond a sane size. The same
walk records the line of every mapping key, so errors can say ``vm.yaml:12``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Set, Tuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vmtasks.guest.errors import ConfigError

# A real config has a few hundred values; these limits are far above that and far below
# anything that costs noticeable time or memory.
MAX_VALUES = 10_000
MAX_DEPTH = 40

_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_HINT_SYNTAX = "fix the YAML there (indentation, quotes, a missing ':' or bracket)"


class _Loader(yaml.SafeLoader):
    """SafeLoader's scanner, parser, composer and scalar constructors; our own tree builder.
    A subclass, so nothing we do touches PyYAML's shared SafeLoader registry."""


def parse(text: str, name: str) -> Tuple[Any, Dict[str, int]]:
    """``(value, lines)``: the document as plain dicts/lists/scalars, and for each dotted key
    (``timeouts.boot``) the 1-based line it is written on. ``name`` labels errors."""
    try:
        loader = _Loader(text)  # the reader checks for control characters right here
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, name) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise ConfigError(_syntax_message(exc, name), _HINT_SYNTAX) from None
        except yaml.reader.ReaderError as exc:
            raise _reader_error(exc, text, name) from None
        except yaml.YAMLError as exc:
            raise ConfigError("{}: not valid YAML: {}".format(name, str(exc)[:200]), _HINT_SYNTAX) from None
        except RecursionError:
            raise ConfigError("{}: nested too deeply to be a config file".format(name),
                              "a config is a few levels of mappings and lists") from None
        if node is None:
            return None, {}
        builder = _Builder(loader, name)
        return builder.build(node, "", 0), builder.lines
    finally:
        loader.dispose()


def _reader_error(exc: yaml.reader.ReaderError, text: str, name: str) -> ConfigError:
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return ConfigError("{}:{}: not valid YAML: the control character #x{:04x} is not allowed".format(
        name, text.count("\n", 0, exc.position) + 1, code),
        "remove it, or write it as an escape in a double-quoted string")


def _syntax_message(exc: yaml.MarkedYAMLError, name: str) -> str:
    """``vm.yaml:4: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow
    sequence, from line 3)``: where PyYAML noticed, and where the construct began."""
    mark = exc.problem_mark or exc.context_mark
    where = "{}:{}".format(name, mark.line + 1) if mark is not None else name
    text = "{}: not valid YAML: {}".format(where, exc.problem or exc.context or "syntax error")
    if exc.problem and exc.context:
        began = exc.context_mark
        text += " ({}{})".format(exc.context, ", from line {}".format(began.line + 1)
                                 if began is not None and began is not mark else "")
    return text


class _Builder:
    """Turns composed nodes into plain values, counting every node it expands."""

    def __init__(self, loader: _Loader, name: str) -> None:
        self.loader = loader
        self.name = name
        self.count = 0
        self.seen: Set[int] = set()  # nodes built once: seeing one again is an alias expanding
        self.through_alias = False
        self.lines: Dict[str, int] = {}

    def _at(self, node: Node) -> str:
        return "{}:{}".format(self.name, node.start_mark.line + 1)

    def build(self, node: Node, path: str, depth: int) -> Any:
        self.count += 1
        if id(node) in self.seen:
            self.through_alias = True
        self.seen.add(id(node))
        if self.count > MAX_VALUES:
            if self.through_alias:
                raise ConfigError(
                    "{}: '{}' expands to more than {} values through YAML aliases (an alias bomb?); "
                    "refusing to expand it".format(self._at(node), _shown(path), MAX_VALUES),
                    "write the value out, or reuse fewer aliases inside aliases")
            raise ConfigError("{}: more than {} values by '{}'; that is not a config".format(
                self._at(node), MAX_VALUES, _shown(path)), "point --config at the vmtasks YAML file")
        if depth > MAX_DEPTH:
            raise ConfigError(
                "{}: '{}' is nested more than {} levels deep (a recursive alias?)".format(
                    self._at(node), _shown(path), MAX_DEPTH),
                "a config is a few levels of mappings and lists",
            )
        if isinstance(node, ScalarNode):
            try:
                return self.loader.construct_object(node)
            except yaml.YAMLError as exc:
                raise ConfigError("{}: '{}' cannot be read: {}".format(
                    self._at(node), _shown(path), getattr(exc, "problem", None) or "bad value"),
                    "use a plain string, number, true/false or null") from None
        if isinstance(node, SequenceNode) and node.tag == _SEQ:
            return [self.build(item, "{}[{}]".format(path, i), depth + 1)
                    for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode) and node.tag == _MAP:
            return self._mapping(node, path, depth)
        raise ConfigError("{}: '{}' has the YAML tag {}, which a config does not use".format(
            self._at(node), _shown(path), node.tag[:80]), "remove the tag")

    def _mapping(self, node: MappingNode, path: str, depth: int) -> Dict[Any, Any]:
        merged: Dict[Any, Any] = {}
        explicit: Dict[Any, Any] = {}
        seen: Dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                # `<<: *base` or `<<: [*a, *b]`: earlier sources win, explicit keys win over all.
                sources: List[Node] = (value_node.value if isinstance(value_node, SequenceNode)
                                       else [value_node])
                for source in reversed(sources):
                    value = self.build(source, path, depth + 1)
                    if not isinstance(value, dict):
                        raise ConfigError("{}: '<<' must merge mappings".format(self._at(source)),
                                          "merge only mappings with <<")
                    merged.update(value)
                continue
            if not isinstance(key_node, ScalarNode):
                raise ConfigError("{}: a key under '{}' is not a plain name".format(
                    self._at(key_node), _shown(path)), "keys are plain names")
            key = self.build(key_node, path, depth + 1)
            line = key_node.start_mark.line + 1
            if key in seen:
                # PyYAML keeps the last silently; a config must not mean something unseen.
                raise ConfigError("{}:{}: key '{}' is given twice (first at line {})".format(
                    self.name, line, _shown(_dotted(path, key)), seen[key]), "keep one of them")
            seen[key] = line
            dotted = _dotted(path, key)
            self.lines.setdefault(dotted, line)
            explicit[key] = self.build(value_node, dotted, depth + 1)
        merged.update(explicit)
        return merged


def _dotted(path: str, key: Any) -> str:
    return "{}.{}".format(path, key) if path else str(key)


def _shown(path: str) -> str:
    """A key path for a message, cut short: keys are the file's text too."""
    path = path or "<document>"
    return path if len(path) <= 120 else path[:117] + "..."
