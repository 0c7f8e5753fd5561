"""`transformers.TrainingArguments`' fields, read without importing transformers.

The config's ``train`` section takes every TrainingArguments field by name, so checking a config needs the field
names, annotations and defaults. Importing the class pulls in torch (10 seconds and more on a busy machine), which
`prmkit config show` and every command's config check would pay for nothing. The class is a plain dataclass, so
its source says all of this: it is parsed with :mod:`ast`. If a transformers release ever builds the class in a way
the parser does not follow, the class is imported instead (slow, still right); tests compare the two.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FieldInfo:
    """What the config checks need of a dataclass field: its name, its annotation and its default."""

    name: str
    type: Any
    default: Any = dataclasses.MISSING
    """The default when it is a literal (dataclasses.MISSING when it is computed or absent)."""


@functools.lru_cache(maxsize=None)
def training_argument_fields() -> dict[str, FieldInfo]:
    """Every ``TrainingArguments`` field a user may set (``init=True``), by name."""
    parsed = parse_training_arguments()
    if parsed:
        return parsed
    return imported_training_arguments()


def imported_training_arguments() -> dict[str, FieldInfo]:
    from transformers import TrainingArguments

    return {f.name: FieldInfo(f.name, f.type, f.default) for f in dataclasses.fields(TrainingArguments) if f.init}


def parse_training_arguments() -> dict[str, FieldInfo] | None:
    """The fields from transformers' source, or None when the source is not the plain dataclass expected."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "training_args.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"), None)
    if cls is None or cls.bases or not any(_is_dataclass_decorator(d) for d in cls.decorator_list):
        return None  # inheritance or a custom decorator: the source alone no longer tells the fields
    fields: dict[str, FieldInfo] = {}
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        annotation = ast.unparse(node.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        default, init = _default(node.value)
        if init:
            fields[node.target.id] = FieldInfo(node.target.id, _evaluate(annotation), default)
    return fields or None


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "dataclass") or (
        isinstance(target, ast.Attribute) and target.attr == "dataclass")


def _default(value: ast.expr | None) -> tuple[Any, bool]:
    """(literal default or MISSING, whether the field is an __init__ argument)."""
    if value is None:
        return dataclasses.MISSING, True
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) == "field":
        keywords = {k.arg: k.value for k in value.keywords}
        init = True
        if "init" in keywords:
            init = bool(_literal(keywords["init"], True))
        return (_literal(keywords["default"], dataclasses.MISSING) if "default" in keywords else dataclasses.MISSING), init
    return _literal(value, dataclasses.MISSING), True


def _literal(node: ast.expr, otherwise: Any) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return otherwise


class _Names(dict):
    """Names an annotation uses: typing's and builtins', and a stand-in class for anything else (an enum, say)."""

    def __missing__(self, name: str) -> Any:
        value = getattr(typing, name, None) or getattr(builtins, name, None) or type(name, (), {})
        self[name] = value
        return value


def _evaluate(annotation: str) -> Any:
    # Only the plain kinds (bool, int, float, str, list, dict, None) matter to the config checks; an enum or a class
    # of transformers' own becomes a stand-in that counts as none of them, as the real class would.
    try:
        return eval(annotation, {"__builtins__": {}}, _Names())  # noqa: S307 - an annotation from transformers' source
    except Exception:
        return annotation
