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


@functools.cache
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
        isinstance(target, ast.Attribute) and target.attr == "dataclass"
    )


def _default(value: ast.expr | None) -> tuple[Any, bool]:
    """(literal default or MISSING, whether the field is an __init__ argument)."""
    if value is None:
        return dataclasses.MISSING, True
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) == "field":
        keywords = {k.arg: k.value for k in value.keywords}
        init = True
        if "init" in keywords:
            init = bool(_literal(keywords["init"], True))
        return (
            _literal(keywords["default"], dataclasses.MISSING) if "default" in keywords else dataclasses.MISSING
        ), init
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
        return eval(annotation, {"__builtins__": {}}, _Names())
    except Exception:
        return annotation


# ---------------------------------------------------------------------------------------------------------------------
# Fields prmkit's own loss, collator, sampler and metrics stand in for

# train_sampling_strategy values prmkit's `grouped` batching honours: its sampler draws random batches of rows of
# similar length. Any other order (sequential, batch_rebalance) is the Trainer's sampler's, used with `padded`.
GROUPED_STRATEGIES = ("random", "group_by_length")
LENGTH_COLUMN = "num_tokens"
"""The prepared data's column holding each row's length: what the Trainer's length samplers read."""


def check_training_arguments(ta: dict[str, Any], batching: str) -> None:
    """Refuse, with one line naming the key and why, a TrainingArguments setting that prmkit's own loss, collator,
    sampler or metrics would leave without effect or break on. ``ta`` holds the config's TrainingArguments keys.

    What prmkit honours itself or leaves to the Trainer is not here: ``label_smoothing_factor`` (the step loss
    smooths), ``average_tokens_across_devices`` (the Trainer scales the step loss), ``include_num_input_tokens_seen``,
    ``remove_unused_columns``, ``prediction_loss_only``, ``train_sampling_strategy`` outside ``grouped`` batching,
    ``hub_model_id``, ``hub_private_repo``, ``hub_token`` and ``hub_revision`` (prmkit's push reads them).
    """
    from prmkit.errors import ConfigError

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"train.{key}: {ta[key]!r} {why}")

    if ta.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "train.deepspeed is set but the deepspeed package is not installed",
            hint="pip install deepspeed, or remove train.deepspeed",
        )
    if ta.get("label_names") not in (None, ["labels"], "labels"):
        refuse(
            "label_names",
            "cannot apply: prmkit's collator, step loss and metrics read the step labels from `labels`; remove the key",
        )
    if ta.get("include_for_metrics"):
        refuse(
            "include_for_metrics",
            "has no effect: prmkit's step metrics read only each step's probability and label; remove the key",
        )
    if ta.get("batch_eval_metrics"):
        refuse(
            "batch_eval_metrics",
            "is not supported: prmkit's step metrics (AUROC, ECE, ...) need every step of "
            "the eval set at once; remove the key",
        )
    if ta.get("eval_do_concat_batches") is False:
        refuse(
            "eval_do_concat_batches",
            "is not supported: prmkit's step metrics need the eval batches concatenated; remove the key",
        )
    if ta.get("past_index", -1) != -1:
        refuse("past_index", "is not supported: a PRM keeps no past state between batches; remove the key")
    if ta.get("length_column_name", "length") not in ("length", LENGTH_COLUMN):
        refuse(
            "length_column_name",
            f"names no column of prmkit's prepared data, whose lengths are in {LENGTH_COLUMN!r}; remove the key",
        )
    if ta.get("push_to_hub") and ta.get("hub_strategy") in ("checkpoint", "all_checkpoints"):
        refuse(
            "hub_strategy",
            "is not supported: prmkit pushes the finished model directory once, at the end; remove the key",
        )
    strategy = ta.get("train_sampling_strategy", "random")
    if batching == "grouped" and strategy not in GROUPED_STRATEGIES:
        refuse(
            "train_sampling_strategy",
            "contradicts train.batching: grouped, whose own sampler draws random "
            "batches of similar length; set train.batching: padded to use it",
        )


def check_integrations(args: Any) -> None:
    """Refuse a ``report_to`` integration whose package is missing, as one line, before any work starts (the
    Trainer finds out only when it is built, after the data is prepared, with a traceback)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    from prmkit.errors import ConfigError, first_line

    available = set(get_available_reporting_integrations())
    for name in args.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"train.report_to: {name!r} is not an integration; expected none, all or "
                f"{', '.join(INTEGRATION_TO_CALLBACK)}"
            )
        if name in available:
            continue
        try:
            # What the Trainer does with it: each callback checks its package in __init__ (some are missing from
            # the list of available ones: flyte, and azure_ml beside mlflow).
            INTEGRATION_TO_CALLBACK[name]()
        except Exception as e:
            raise ConfigError(
                f"train.report_to: {name}: {first_line(e)}", hint=f"install it, or remove {name!r} from train.report_to"
            ) from None
