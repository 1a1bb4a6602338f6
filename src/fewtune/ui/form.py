"""The training form of the web UI, generated from the config schema (fewtune.config.Config).

Every leaf of the schema is one field, keyed by its dotted YAML path (``train.lr``): a new config key
appears in the form by itself, and a renamed one cannot be left behind. Values go to and from the
widgets as plain Python (booleans, numbers, strings); keys whose type a widget cannot hold directly
(lists, mappings, unions, anything that may be null) are edited as YAML text, as they are written in a
config file. ``to_config`` validates with the same pydantic model as ``fewtune train``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from fewtune.config import Config, ConfigError, build_config, section_class
from fewtune.config_reference import yaml_value

NONE_CHOICE = "(none)"  # how null reads in a drop-down of a key that may be null


@dataclass(frozen=True)
class Field:
    key: str  # dotted path, e.g. train.lr
    kind: str  # bool | int | float | choice | text | yaml
    default: Any
    description: str
    choices: tuple = ()
    nullable: bool = False

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]


def _kind(annotation: Any) -> tuple[str, tuple, bool]:
    """(widget kind, choices, may be null) for a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    nullable = False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        nullable = len(rest) < len(args)
        if len(rest) == 1:
            annotation = rest[0]
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        else:
            return "yaml", (), nullable  # e.g. str | list[str]
    if origin is Literal:
        return "choice", tuple(args), nullable
    if annotation is bool:
        return ("yaml" if nullable else "bool"), (), nullable
    if annotation in (int, float):
        return ("yaml" if nullable else annotation.__name__), (), nullable
    if annotation is str:
        return "text", (), nullable
    return "yaml", (), nullable


def schema_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[Field]:
    """Every leaf of the schema, in the schema's order."""
    out: list[Field] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = section_class(info.annotation)
        if nested is not None:
            out += schema_fields(nested, key + ".")
            continue
        kind, choices, nullable = _kind(info.annotation)
        default = info.get_default(call_default_factory=True)
        out.append(Field(key, kind, default, info.description or "", choices, nullable))
    return out


def get_value(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def to_widget(field: Field, value: Any) -> Any:
    """A config value as its widget holds it."""
    if field.kind == "choice":
        return NONE_CHOICE if value is None else value
    if field.kind == "text":
        return "" if value is None else str(value)
    if field.kind == "yaml":
        return yaml_value(value)
    return value


def from_widget(field: Field, value: Any) -> Any:
    """A widget's value as the config value (YAML text parsed; empty text of a nullable key is null)."""
    if field.kind == "choice":
        return None if value == NONE_CHOICE else value
    if field.kind == "text":
        return None if (value in ("", None) and field.nullable) else (value or "")
    if field.kind == "yaml":
        text = "" if value is None else str(value).strip()
        if not text:
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{field.key}: not valid YAML ({str(err).splitlines()[0]})") from None
    if field.kind == "int":
        if value is None or value == "":
            raise ConfigError(f"{field.key}: a whole number is needed")
        if float(value) != int(float(value)):
            raise ConfigError(f"{field.key}: a whole number is needed (got {value})")
        return int(float(value))
    if field.kind == "float":
        if value is None or value == "":
            raise ConfigError(f"{field.key}: a number is needed")
        return float(value)
    return bool(value)


def widget_values(fields: list[Field], cfg: Config) -> list[Any]:
    return [to_widget(f, get_value(cfg, f.key)) for f in fields]


def to_config(fields: list[Field], values: list[Any]) -> Config:
    """The checked Config from the form's values (ConfigError with the key's name when one is wrong)."""
    nested: dict = {}
    for field, value in zip(fields, values):
        parts = field.key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = from_widget(field, value)
    return build_config(nested, [], source="the form")
