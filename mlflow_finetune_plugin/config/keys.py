"""Every recipe key's help, read from the schema: its type, default and meaning, as docs/reference.md's key
tables show them (`docs/recipe_keys.py` writes those tables from here) and as the studio's Train page
explains its fields.

The meaning is the key's `Field(description=...)` in the schema (`schema.py` and the section modules beside
it), the one place it is written; the type and the default are read from the field's annotation, constraints
and default."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class KeyHelp:
    """One row of a key table. `key` as the table writes it (dotted from the recipe's top, or relative to the
    table's own section, e.g. a gate's `metric`); `group` the adapter type an `adapter.*` key belongs to."""

    key: str
    type: str
    default: str
    help: str
    group: str | None = None


def flat_types(annotation) -> list:
    """The types an annotation admits: Annotated unwrapped, unions flattened."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return flat_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [a for arg in get_args(annotation) for a in flat_types(arg)]
    return [annotation]


def section_class(annotation) -> type[BaseModel] | None:
    """The recipe section (pydantic model) an annotation holds, also through `| None`; None for a value."""
    return next((a for a in flat_types(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


_NAMES = {bool: "bool", int: "int", float: "float", str: "string", list: "list", tuple: "list",
          dict: "mapping"}


def _type_name(annotation) -> str:
    """`string`, `list of strings`, `list of gates`, `mapping: name -> task`, ..."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple) and args and get_origin(args[0]) is not Literal:
        items = [a for a in flat_types(args[0]) if a is not type(None)]
        return "list of " + " or ".join(_plural(a) for a in items)
    if origin is dict and len(args) == 2 and section_class(args[1]):
        return f"mapping: name -> {args[1].__name__.lower()}"
    section = section_class(annotation)
    return _NAMES.get(origin or annotation) or ("mapping" if section else str(annotation))


def _plural(annotation) -> str:
    section = section_class(annotation)
    return f"{section.__name__.lower()}s" if section else {str: "strings", dict: "mappings"}.get(
        get_origin(annotation) or annotation, _type_name(annotation))


def type_text(info: FieldInfo) -> str:
    """The field's type in the reference's words: `float > 0`, `int in [0, 1)`, `` `a` | `b` ``, `bool or
    string`."""
    args = [a for a in flat_types(info.annotation) if a is not type(None)]
    literals = [f"`{v}`" for a in args if get_origin(a) is Literal for v in get_args(a)]
    names = []
    for a in args:
        if get_origin(a) is Literal:
            continue
        name = _type_name(a)
        if name not in names:
            names.append(name)
    if literals:
        return " | ".join(literals + names)
    words = " or ".join(names)
    bounds = {attr: getattr(meta, attr) for meta in info.metadata for attr in ("gt", "ge", "lt", "le")
              if getattr(meta, attr, None) is not None}
    low = next(((attr, v) for attr, v in bounds.items() if attr in ("gt", "ge")), None)
    high = next(((attr, v) for attr, v in bounds.items() if attr in ("lt", "le")), None)
    if low and high:
        words += (f" in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}"
                  f"{']' if high[0] == 'le' else ')'}")
    elif low or high:
        attr, value = low or high
        words += f" {dict(gt='>', ge='>=', lt='<', le='<=')[attr]} {value:g}"
    return words


def _value_text(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 100:
        return str(int(value))
    return str(value)


def default_text(info: FieldInfo) -> str:
    """The field's default as the reference writes it: `required`, `empty`, `true`, 0.05, `` `cosine` ``, a
    list; or the words a field gives in `json_schema_extra={"default_text": ...}` where its value alone
    says too little (`empty (= tiny)`)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "default_text" in extra:
        return str(extra["default_text"])
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None or value == {} or value == []:
        return "empty" if value is None or value == {} else "`[]`"
    if isinstance(value, BaseModel) and not info.description:
        return ""
    if isinstance(value, (bool, int, float)):
        return _value_text(value)
    return f"`{_value_text(value)}`"


def _row(key: str, info: FieldInfo, group: str | None = None) -> KeyHelp:
    return KeyHelp(key, type_text(info), default_text(info), info.description or "", group)


def section_rows(cls: type[BaseModel], prefix: str = "", expand: tuple[str, ...] = (),
                 skip: tuple[str, ...] = ()) -> list[KeyHelp]:
    """The rows of `cls`'s keys, `prefix.` before each; the nested sections named in `expand` as their own
    keys."""
    rows = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}.{name}" if prefix else name
        nested = section_class(info.annotation)
        if name in expand and nested is not None:
            rows += section_rows(nested, key)
        else:
            rows.append(_row(key, info))
    return rows


def adapter_rows() -> list[KeyHelp]:
    """`adapter.type`, then each adapter type's own keys (the group they belong to)."""
    from mlflow_finetune_plugin.config.schema import ADAPTER_CONFIGS, Recipe

    adapter = Recipe.model_fields["adapter"]
    choices = " | ".join(f"`{t}`" for t in ADAPTER_CONFIGS)
    rows = [KeyHelp("adapter.type", choices, "from the preset (`lora`)", adapter.description or "")]
    for kind, cls in ADAPTER_CONFIGS.items():
        rows += [KeyHelp(row.key, row.type, row.default, row.help, kind)
                 for row in section_rows(cls, "adapter", skip=("type",))]
    return rows


def objective_rows() -> list[KeyHelp]:
    from mlflow_finetune_plugin.config.schema import OBJECTIVES, Recipe

    return [row for name in OBJECTIVES if name in Recipe.model_fields
            for row in section_rows(section_class(Recipe.model_fields[name].annotation), name)]


def top_rows() -> list[KeyHelp]:
    """The recipe's top-level keys: the values, then its sections in one row."""
    from mlflow_finetune_plugin.config.schema import Recipe

    fields = {n: i for n, i in Recipe.model_fields.items() if n != "project_dir"}
    rows = [_row(n, i) for n, i in fields.items() if section_class(i.annotation) is None and n != "adapter"]
    sections = ", ".join(n for n, i in fields.items()
                         if section_class(i.annotation) is not None or n == "adapter")
    return rows + [KeyHelp(sections, "mapping", "", "the sections below")]


def tables() -> dict[str, list[KeyHelp]]:
    """Every key table of the reference, by name, in the schema's order."""
    from mlflow_finetune_plugin.config import schema
    from mlflow_finetune_plugin.config.distill import DistillConfig
    from mlflow_finetune_plugin.config.documents import QuestionsConfig, RetrievalConfig
    from mlflow_finetune_plugin.config.evaluation import EvalConfig
    from mlflow_finetune_plugin.config.gates import Gate
    from mlflow_finetune_plugin.config.monitor import MonitorConfig

    return {
        "top": top_rows(),
        "model": section_rows(schema.ModelConfig, "model"),
        "adapter": adapter_rows(),
        "data": section_rows(schema.DataConfig, "data", expand=("traces",)),
        "data.tasks": section_rows(schema.Task),
        "data.columns": section_rows(schema.DataColumns),
        "data.tags": section_rows(schema.DataTags),
        "train": section_rows(schema.TrainConfig, "train"),
        "eval": section_rows(EvalConfig, "eval", expand=("optimize",)),
        "registry": section_rows(schema.RegistryConfig, "registry"),
        "gate": section_rows(Gate),
        "monitor": section_rows(MonitorConfig, "monitor"),
        "objectives": objective_rows(),
        "distill": section_rows(DistillConfig, "distill"),
        "retrieval": section_rows(RetrievalConfig, "retrieval"),
        "questions": section_rows(QuestionsConfig, "questions"),
    }


# Tables whose keys are written relative to a section of the recipe: the prefix that makes them dotted keys.
_RELATIVE = {"data.tasks": "data.tasks.<name>", "data.columns": "data.columns", "data.tags": "data.tags",
             "gate": "registry.promote_if"}


@functools.cache
def _index() -> dict[tuple[str, str | None], KeyHelp]:
    index: dict[tuple[str, str | None], KeyHelp] = {}
    for name, rows in tables().items():
        for row in rows:
            key = f"{_RELATIVE[name]}.{row.key}" if name in _RELATIVE else row.key
            index.setdefault((key, row.group), row)
    return index


def key_help(key: str, adapter: str | None = None) -> KeyHelp | None:
    """The help of a dotted recipe key (an `adapter.*` key: of `adapter`'s type), or None for no such key."""
    return _index().get((key, adapter if key.startswith("adapter.") and key != "adapter.type" else None))
