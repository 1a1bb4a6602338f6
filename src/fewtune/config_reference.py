"""The configuration reference, written from the schema (fewtune.config) so the README cannot drift from it.

``render_reference()`` walks ``Config`` and returns Markdown: one table per section (nested sections get
their own), each row a key path with its type, default, constraints and description. ``update_readme``
rewrites the part of README.md between the two marker comments; ``make config-reference`` runs it.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fewtune.config import Config, section_class

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
COMMAND = "make config-reference"


def yaml_value(value: Any) -> str:
    """A value as it would be written in a YAML config: null, true, 0.1, [], plain strings bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = value and value == value.strip() and "\n" not in value and _loads(value) == value
        return value if plain else json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _loads(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def type_name(annotation: Any) -> str:
    """A type in the words a YAML user needs: int, str or null, list of str, one of `a`, `b`; or null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(f"`{yaml_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            named.append("null")
        return ("; or " if any("," in n for n in named) else " or ").join(named)
    if origin in (list, tuple, set, frozenset):
        inner = [type_name(a) for a in args if a is not Ellipsis]
        return f"list of {' or '.join(inner)}" if inner else "list"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if section_class(annotation) is not None:
        return "section"
    return getattr(annotation, "__name__", str(annotation))


# pydantic keeps Field(gt=..., ...) as one metadata object per bound, each with its one attribute
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "multiple of"),
           ("min_length", "length >="), ("max_length", "length <="))


def constraints(field: FieldInfo) -> str:
    """A field's constraints from its metadata: `> 0`, `>= 0.0, < 1.0`."""
    out = []
    for item in field.metadata:
        for attr, word in _BOUNDS:
            if getattr(item, attr, None) is not None:
                out.append(f"{word} {yaml_value(getattr(item, attr))}")
                break
        else:
            out.append(str(item))
    return ", ".join(out)


def default_value(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    return yaml_value(field.get_default(call_default_factory=True))


def _doc(cls: type) -> str:
    text = cls.__dict__.get("__doc__")  # a class's own docstring only, not one inherited
    return " ".join(inspect.cleandoc(text).split()) if text else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _table(cls: type[BaseModel], prefix: tuple[str, ...]) -> list[str]:
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if section_class(field.annotation) is not None:
            continue
        key = ".".join((*prefix, name))
        rows.append("| " + " | ".join(_cell(c) for c in (
            _code(key), type_name(field.annotation), _code(default_value(field)), constraints(field),
            field.description or "")) + " |")
    return rows


def _sections(cls: type[BaseModel], prefix: tuple[str, ...], about: str, level: int) -> list[str]:
    """The section at prefix, then its nested sections, depth first in schema order."""
    nested = [(name, field) for name, field in cls.model_fields.items() if section_class(field.annotation)]
    leaves = len(cls.model_fields) - len(nested)
    lines: list[str] = []
    if prefix:
        lines += [f"{'#' * level} `{'.'.join(prefix)}`", ""]
    intro = _doc(cls) or about  # the section class's docstring; else the description of the field holding it
    if nested and prefix:
        intro += (" " if intro else "") + "Sections in it: " + ", ".join(
            f"`{'.'.join((*prefix, name))}`" for name, _ in nested) + "."
    if intro:
        lines += [intro, ""]
    if leaves:
        lines += [*_table(cls, prefix), ""]
    for name, field in nested:
        lines += _sections(section_class(field.annotation), (*prefix, name), field.description or "",
                           level + 1 if prefix else level)
    return lines


def render_reference(cls: type[BaseModel] | None = None, level: int = 3) -> str:
    """The reference of a schema (default: fewtune's Config) as Markdown; top-level sections get `level` headings."""
    cls = cls or Config
    return "\n".join(_sections(cls, (), "", level)).rstrip("\n") + "\n"


def replace_between_markers(text: str, body: str) -> str:
    """text with everything between START and END replaced by body (the marker lines are kept)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {START} ... {END} are not both there, in that order")
    head = text[:start + len(START)]
    return f"{head}\n\n{body.strip(chr(10))}\n\n{text[end:]}"


def between_markers(text: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {START} ... {END} are not both there, in that order")
    return text[start + len(START):end].strip("\n") + "\n"


def update_readme(path: str | Path) -> bool:
    """Rewrite the reference between the markers in path; True when the file changed."""
    path = Path(path)
    old = path.read_text(encoding="utf-8")
    new = replace_between_markers(old, render_reference())
    if new != old:
        path.write_text(new, encoding="utf-8")
    return new != old


if __name__ == "__main__":  # python -m fewtune.config_reference README.md   (make config-reference)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fewtune.config_reference README.md")
    try:
        changed = update_readme(sys.argv[1])
    except (OSError, ValueError) as err:
        sys.exit(f"error: {sys.argv[1]}: {err}")
    print(f"{sys.argv[1]}: config reference {'rewritten' if changed else 'already up to date'}")
