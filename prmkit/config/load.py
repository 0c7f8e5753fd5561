"""Loading a config: YAML (bounded in size), dotted ``--set`` keys, flags, coercion to each field's type; dumping
one."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import types
import typing
from pathlib import Path
from typing import Any, overload

import yaml

from prmkit.config.schema import (
    SECTIONS,
    TRAINING_ARGUMENT_DEFAULTS,
    Config,
    _check_lora,
    _did_you_mean,
    check_range,
    choices_for,
    training_argument_fields,
)
from prmkit.core.redact import collect_secrets, mask, redact
from prmkit.errors import ConfigError, first_line, shown

log = logging.getLogger(__name__)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, flags: dict | None = None
) -> Config:
    """Resolve a config: defaults, then the YAML file at ``path``, then ``--set`` overrides, then explicit flags.

    ``flags`` maps dotted keys to values from a command's own options; ``None`` values mean "not given". Every problem
    found is reported at once: one :class:`ConfigError`, naming all of them when there are several.
    """
    cfg = Config()
    problems: list[ConfigError] = []
    if path is not None:
        path = Path(path)
        cfg.source = str(path)
        sections = _read_yaml(path, problems)
        collect_secrets(sections)  # before anything can echo a value back in an error
        quoted = _double_quoted_keys(path)
        for section, values in sections.items():
            for key, value in values.items():
                dotted = f"{section}.{key}"
                _collect(problems, _set_text_key, cfg, dotted, value, str(path), dotted in quoted)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(
                ConfigError(f"--set {shown(mask(item))}: expected section.key=value, e.g. --set data.max_length=2048")
            )
            continue
        try:
            value = _parse_scalar(raw)
        except ConfigTooLarge as e:
            problems.append(ConfigError(f"--set {key.strip()[:100]}: {e.problem}"))
            continue
        collect_secrets({key.strip(): value})
        _collect(problems, _set_text_key, cfg, key.strip(), value, "--set", raw.strip().startswith('"'))
    for key, value in (flags or {}).items():
        if value is not None:
            _collect(problems, set_key, cfg, key, value, "command line")
    raise_config_problems(problems)
    return cfg


MAX_YAML_NODES = 100_000


MAX_YAML_CHARS = 10_000_000


class ConfigTooLarge(yaml.composer.ComposerError):
    pass


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document larger than :data:`MAX_YAML_NODES` values or
    :data:`MAX_YAML_CHARS` characters of scalars with every alias expanded, and an alias inside its own anchor."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, characters), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        node = super().compose_node(parent, index)
        if alias:
            size = self._sizes.get(id(node))
            if size is None:  # the anchored node is still being composed
                raise yaml.composer.ComposerError(
                    None, None, "an alias inside the value it refers to (a recursive structure)", mark
                )
        else:
            if isinstance(node, yaml.ScalarNode):
                size = (1, len(node.value))
            else:
                children = (
                    [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
                )
                sizes = [self._sizes[id(c)] for c in children]
                size = (1 + sum(n for n, _ in sizes), sum(c for _, c in sizes))
            self._sizes[id(node)] = size
        if size[0] > MAX_YAML_NODES or size[1] > MAX_YAML_CHARS:
            raise ConfigTooLarge(
                None,
                None,
                f"more than {MAX_YAML_NODES:,} values or {MAX_YAML_CHARS:,} characters once its aliases are expanded",
                mark,
            )
        return node


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded (:class:`BoundedLoader`)."""
    return yaml.load(text, Loader=BoundedLoader)


def _collect(problems: list[ConfigError], func: Any, *args: Any) -> None:
    try:
        func(*args)
    except ConfigError as e:
        problems.append(e)


def raise_config_problems(problems: list[ConfigError]) -> None:
    """Raise nothing, the one problem, or one error listing them all (with each one's hint)."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    lines = [p.message + (f" ({p.hint})" if p.hint else "") for p in problems]
    raise ConfigError(
        f"{len(problems)} problems in the config:", problems=lines, hint="fix them all, then run the same command again"
    )


# Keys whose value is text to match in the data, where a shell user types '\n' for a line break. A YAML file keeps
# backslashes as typed outside double quotes ('\n' is a backslash and an n), and so does --set; read there the way
# --step-separator reads them, so a config and the command line mean the same thing.
ESCAPED_KEYS = ("data.step_separator", "serve.step_separator")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}


@overload
def unescape(text: str) -> str: ...
@overload
def unescape(text: None) -> None: ...
def unescape(text: str | None) -> str | None:
    r"""Turn the escapes a user types ('\n', '\t', '\r', '\\', '\0') into the characters they mean."""
    if text is None or "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _set_text_key(cfg: Config, dotted: str, value: Any, origin: str, double_quoted: bool = False) -> None:
    """set_key for a value written as YAML text (a file, --set): outside double quotes, where YAML reads no escapes,
    backslash escapes in ESCAPED_KEYS are read, with a warning naming the spelling that says so."""
    if dotted in ESCAPED_KEYS and isinstance(value, str) and not double_quoted and unescape(value) != value:
        meant = unescape(value)
        quoted = _yaml_value(meant)
        named = {"\n": "a line break", "\t": "a tab", "\r": "a carriage return", "\n\n": "a blank line"}.get(meant)
        if origin == "--set":
            fix = f"quote it for YAML: --set '{dotted}={quoted}'"
        else:
            fix = f"write it in double quotes: {dotted.partition('.')[2]}: {quoted}"
        log.warning(
            f"{origin}: {dotted}: '{value}' holds a backslash escape, which YAML keeps as typed outside double "
            f"quotes; read as {named + ' ' if named else ''}({quoted}), as on the command line. "
            f"To say so, {fix}"
        )
        value = meant
    set_key(cfg, dotted, value, origin)


def _double_quoted_keys(path: Path) -> set[str]:
    """The dotted keys whose value the file writes in double quotes (YAML has read its escapes already)."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    found: set[str] = set()
    for section, values in getattr(root, "value", []) if isinstance(root, yaml.MappingNode) else []:
        for key, value in values.value if isinstance(values, yaml.MappingNode) else []:
            if isinstance(value, yaml.ScalarNode) and value.style == '"':
                found.add(f"{section.value}.{key.value}")
    return found


def _read_yaml(path: Path, problems: list[ConfigError] | None = None) -> dict[str, dict]:
    """The file's sections; a bad section goes to ``problems`` (when given) and the others are still read."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # PyYAML converts an integer of more than 4,300 digits, which Python refuses
        raise ConfigError(f"{path}: invalid YAML ({first_line(e)})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        what = "too large" if isinstance(e, ConfigTooLarge) else "invalid YAML"
        raise ConfigError(f"{path}:{where}: {what} ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    good: dict[str, dict] = {}
    for section, values in data.items():
        if section not in SECTIONS:
            error = ConfigError(f"{path}: unknown section {shown(section)}{_did_you_mean(str(section), SECTIONS)}")
        elif values is not None and not isinstance(values, dict):
            error = ConfigError(
                f"{path}: section {shown(section)}: expected a mapping of keys, got {type(values).__name__}"
            )
        else:
            good[section] = values or {}
            continue
        if problems is None:
            raise error
        problems.append(error)
    return good


def _parse_scalar(raw: str) -> Any:
    # YAML gives --set the file's own syntax: null, true, [a, b], {r: 8}, "quoted\n".
    try:
        return load_yaml(raw) if raw.strip() else ""
    except ConfigTooLarge:
        raise
    except (yaml.YAMLError, ValueError):  # ValueError: an integer of more than 4,300 digits
        return raw


def set_key(cfg: Config, dotted: str, value: Any, origin: str = "config") -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(
            f"{origin}: unknown section {shown(section)} in {shown(dotted)}{_did_you_mean(section, SECTIONS)}"
        )
    if not key:
        raise ConfigError(f"{origin}: {shown(dotted)}: expected section.key")
    obj = getattr(cfg, section)
    own = {f.name: f for f in dataclasses.fields(obj)}
    if key in own:
        value = _coerce(value, own[key].type, dotted, origin)
        check_range(dotted, value, origin)
        if dotted == "train.lora":
            _check_lora(value, origin)
        setattr(obj, key, value)
        cfg.explicit.add(dotted)
        return
    if section == "train":
        ta_fields = training_argument_fields()
        if key in ta_fields:
            value = _coerce_training_argument(value, ta_fields[key], key, origin)
            check_range(dotted, value, origin)
            cfg.training_arguments[key] = value
            cfg.explicit.add(dotted)
            return
        raise ConfigError(f"{origin}: unknown key {shown(dotted)}{_did_you_mean(key, [*own, *ta_fields])}")
    raise ConfigError(f"{origin}: unknown key {shown(dotted)}{_did_you_mean(key, own)}")


_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _resolve(annotation: Any) -> tuple[set[type], bool]:
    """Base types an annotation admits, and whether it admits null."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {**vars(typing), "Any": Any})
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        nullable = False
        for arg in typing.get_args(annotation):
            if arg is type(None):
                nullable = True
            else:
                sub, _ = _resolve(arg)
                kinds |= sub
        return kinds, nullable
    if origin is not None:
        return {origin}, False
    if annotation is Any:
        return set(), True
    return {annotation}, False


def _coerce(value: Any, annotation: Any, key: str, origin: str) -> Any:
    kinds, nullable = _resolve(annotation)
    expected = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in sorted(kinds, key=str)) + (
        " or null" if nullable else ""
    )
    if value is None:
        if nullable or not kinds:
            return None
        raise ConfigError(f"{origin}: {key}: expected {expected}, got null")
    if not kinds:
        return value
    if bool in kinds and isinstance(value, bool):
        return value
    if int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if float in kinds and isinstance(value, str):
        # PyYAML reads 1e-5 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if str in kinds and isinstance(value, str):
        choices = choices_for(key)
        if choices and value not in choices:
            allowed = ("true, false or " if bool in kinds else "one of ") + ", ".join(choices)
            raise ConfigError(f"{origin}: {key}: expected {allowed}, got {shown(value)}{_did_you_mean(value, choices)}")
        return value
    if list in kinds and isinstance(value, (list, tuple)):
        return list(value)
    if list in kinds and isinstance(value, str):
        return [value]
    if dict in kinds and isinstance(value, dict):
        return value
    raise ConfigError(f"{origin}: {key}: expected {expected}, got {shown(value)} ({type(value).__name__})")


def _coerce_training_argument(value: Any, fld: Any, key: str, origin: str) -> Any:
    default = fld.default if fld.default is not dataclasses.MISSING else None
    if key.endswith("_strategy") and value is False:
        return "no"  # YAML 1.1 reads the documented value `no` as false
    try:
        kinds, _ = _resolve(fld.type)
    except Exception:
        kinds = set()
    # TrainingArguments accepts enums as strings and many unions; check the plain scalar kinds, let it validate the
    # rest.
    if isinstance(default, bool) and not isinstance(value, bool) and value is not None:
        raise ConfigError(f"{origin}: train.{key}: expected true or false, got {shown(value)} ({type(value).__name__})")
    if kinds & {int, float} and not kinds & {str, dict, list} and isinstance(value, str):
        try:
            number = float(value)  # PyYAML reads 1e20 (an exponent, no dot) as a string
        except ValueError:
            raise ConfigError(f"{origin}: train.{key}: expected a number, got {shown(value)}") from None
        if int in kinds and float not in kinds:
            if not number.is_integer():
                raise ConfigError(f"{origin}: train.{key}: expected an integer, got {shown(value)}")
            return int(value) if value.strip().lstrip("+-").isdigit() else int(number)
        return number
    if kinds == {int} and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{origin}: train.{key}: expected an integer, got {shown(value)}")
        return int(value)
    # An integer stays one where the field takes a float (num_train_epochs: 1): TrainingArguments takes it as it is,
    # and `config show` then prints what the user wrote.
    return value


def render_template() -> str:
    """A commented YAML file holding every prmkit key with its default (what `prmkit config init` writes)."""
    lines = [
        "# prmkit config: every key with its default. Delete what you do not change.",
        "# Precedence: defaults < this file < --set section.key=value < a command's own flags.",
        "",
    ]
    cfg = Config()
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            if docs.get(f.name):
                lines.append(f"  # {docs[f.name]}")
            lines.append(f"  {f.name}: {_yaml_value(value)}")
        if section == "train":
            lines.append("  # Every transformers.TrainingArguments field is accepted here by its own name.")
            lines.append("  # prmkit's defaults for some of them, following TRL's PRMConfig:")
            for key, value in TRAINING_ARGUMENT_DEFAULTS.items():
                lines.append(f"  {key}: {_yaml_value(value)}")
            lines.append("  per_device_train_batch_size: 8")
            lines.append("  seed: 42")
        lines.append("")
    return "\n".join(lines)


class _Dumper(yaml.SafeDumper):
    """Writes a string holding a line break, tab or other control character double-quoted with escapes ("\\n"), so
    a separator stays one readable line instead of a quoted string spanning lines."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    # A backslash too: a config read back takes backslash escapes outside double quotes as the command line does.
    style = '"' if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def _yaml_value(value: Any) -> str:
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, allow_unicode=False, width=1 << 16)
    return text.strip().removesuffix("...").strip()


def _field_docs(cls: type) -> dict[str, str]:
    # Attribute docstrings (the string under each field) double as the template's comments.
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if is_field and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted: what prmkit_config.yaml holds and `config show` prints."""
    return yaml.dump(redact(cfg.to_dict()), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16)
