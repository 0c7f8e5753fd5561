"""Every message that tells a user to pass a `--flag` names one the command printing it has.

prmkit's errors, warnings and hints come from library code shared by several commands, so a hint written for one
command is easily printed by another that has no such flag ("pass --skip-invalid" from `prmkit train`). This test
reads prmkit's source: it finds each string that a message is built from (in a `raise`, a `hint=`, a log or output
call, a `return`) and naming a flag, works out from the imports and names which commands can reach the function or
class holding it, and asks each such command's Typer definition whether it has the flag. A message that names its
command (`prmkit push MODEL --eval-report ...`, `prmkit --debug ...`) is checked against that one. Code run inside
``with reworded(TABLE):`` has its flags rewritten for the command running it, so there a flag in TABLE counts too.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
from pathlib import Path

import pytest
from conftest import prmkit_log

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prmkit"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-])")
MESSAGE_CALLS = {"warning", "warn", "info", "error", "hint", "debug", "exception", "echo"}
# Flags a command is getting on another branch (issue 23 item 8 gives `prmkit train` --skip-invalid, which the data
# reader's hint names). When a command has one, the test fails until its entry here is removed.
AWAITED: set[tuple[str, str]] = set()


def commands() -> tuple[dict[str, set[str]], dict[str, tuple[str, str]]]:
    """Each command's flags (the root's under ""), and the module and function that implement it."""
    from typer.main import get_command

    from prmkit.cli.app import app

    def flags(cmd) -> set[str]:
        return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}

    root = get_command(app)
    options, entry = {"": flags(root)}, {}

    def walk(group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, f"{prefix}{name} ")
                continue
            func = inspect.unwrap(cmd.callback)
            options[prefix + name], entry[prefix + name] = flags(cmd), (func.__module__, func.__name__)

    walk(root, "")
    return options, entry


class Source:
    """prmkit's modules: their top-level definitions, imports, and the message strings in each definition."""

    def __init__(self) -> None:
        self.trees = {self.module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}
        self.imports = {mod: self._imports(mod, tree) for mod, tree in self.trees.items()}
        self.tops: dict[str, dict[str, ast.AST]] = {}
        for mod, tree in self.trees.items():
            tops = self.tops.setdefault(mod, {})
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    tops[node.name] = node
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        if isinstance(target, ast.Name):
                            tops[target.id] = node

    @staticmethod
    def module_name(path: Path) -> str:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _imports(self, mod: str, tree: ast.AST) -> dict[str, tuple]:
        table: dict[str, tuple] = {}
        package = (
            mod.split(".") if (PACKAGE.parent / mod.replace(".", "/") / "__init__.py").exists() else mod.split(".")[:-1]
        )
        for node in ast.walk(tree):  # imports inside functions too: prmkit imports heavy modules late
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                src = ".".join([*base, node.module] if node.module else base)
                for alias in node.names if src.startswith("prmkit") else []:
                    full = f"{src}.{alias.name}"
                    table[alias.asname or alias.name] = (
                        ("module", full) if full in self.trees else ("name", src, alias.name)
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in self.trees:
                        table[alias.asname or alias.name.split(".")[0]] = (
                            "module",
                            alias.name if alias.asname else "prmkit",
                        )
        return table

    def resolve(self, mod: str, name: str, depth: int = 0) -> tuple[str, str] | None:
        if name in self.tops.get(mod, {}):
            return mod, name
        found = self.imports.get(mod, {}).get(name)
        if found and found[0] == "name" and depth < 5:
            return self.resolve(found[1], found[2], depth + 1)
        return None

    def refs(self, mod: str, node: ast.AST) -> list[tuple[tuple[str, str], str | None]]:
        """The definitions ``node`` names, each with the rewording table in force where it names them (or None)."""
        out: list[tuple[tuple[str, str], str | None]] = []

        def visit(n: ast.AST, table: str | None) -> None:
            if isinstance(n, ast.With):
                for item in n.items:
                    call = item.context_expr
                    if (
                        isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Name)
                        and call.func.id == "reworded"
                        and call.args
                        and isinstance(call.args[0], ast.Name)
                    ):
                        table = f"{mod}.{call.args[0].id}"
            target = None
            if isinstance(n, ast.Name):
                target = self.resolve(mod, n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                found = self.imports.get(mod, {}).get(n.value.id)
                target = self.resolve(found[1], n.attr) if found and found[0] == "module" else None
            if target:
                out.append((target, table))
            for child in ast.iter_child_nodes(n):
                visit(child, table)

        visit(node, None)
        return out

    def reach(self, start: tuple[str, str]) -> set[tuple[tuple[str, str], str | None]]:
        """Every (definition, rewording table) a command's function can get to."""
        seen: set = set()
        todo = [(start, None)]
        while todo:
            unit, table = todo.pop()
            if (unit, table) in seen:
                continue
            seen.add((unit, table))
            todo.extend((ref, table or inner) for ref, inner in self.refs(unit[0], self.tops[unit[0]][unit[1]]))
        return seen

    def messages(self):
        """(definition, line, text) for each message string naming a flag; f-string fields read as {}."""
        for mod, tops in self.tops.items():
            for name, top in tops.items():
                for node in self._message_parts(top):
                    text = _text(node)
                    if text and FLAG.search(text):
                        yield (mod, name), node.lineno, text

    @staticmethod
    def _message_parts(top: ast.AST):
        roots: list[ast.AST] = []
        for node in ast.walk(top):
            if (isinstance(node, ast.Raise) and node.exc) or (isinstance(node, ast.Return) and node.value):
                roots.append(node)
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                holder = getattr(func, "value", None)
                if called in MESSAGE_CALLS or (called == "append" and "warning" in getattr(holder, "id", "")):
                    roots.extend(node.args)
                roots.extend(k.value for k in node.keywords if k.arg in ("hint", "message"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args[len(node.args.args) - len(node.args.defaults) :]
                roots.extend(d for a, d in zip(args, node.args.defaults) if a.arg in ("hint", "message"))
        seen = set()
        for root in roots:
            for node in ast.walk(root):
                if id(node) not in seen and isinstance(node, (ast.Constant, ast.JoinedStr)):
                    seen.add(id(node))
                    seen.update(id(v) for v in getattr(node, "values", []))
                    yield node


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def named_command(text: str, flag: str, names: list[str]) -> str | None:
    """The command a message names for ``flag`` (`prmkit push MODEL --eval-report`), "" for the root's
    (`prmkit --debug`), or None."""
    pattern = rf"prmkit (?:({'|'.join(map(re.escape, names))})(?![\w-])|(?=--))((?:(?!prmkit)[^;])*)"
    for match in re.finditer(pattern, text):
        if flag in FLAG.findall(match.group(2)) or match.group(0).startswith(f"prmkit {flag}"):
            return match.group(1) or ""
    return None


def test_every_flag_a_message_names_exists_on_the_command_printing_it():
    options, entry = commands()
    source = Source()
    reached = {name: source.reach(start) for name, start in entry.items()}
    tables = {
        key: getattr(importlib.import_module(key.rpartition(".")[0]), key.rpartition(".")[2])
        for found in reached.values()
        for _unit, key in found
        if key
    }
    checked, wrong = 0, []
    for unit, line, text in source.messages():
        for flag in FLAG.findall(text):
            named = named_command(text, flag, sorted(entry, key=len, reverse=True))
            printers = (
                [(named, None)]
                if named is not None
                else [(name, table) for name, found in reached.items() for u, table in found if u == unit]
            )
            for command, table in printers:
                checked += 1
                if flag not in options[command] | set(tables.get(table, ())) and (command, flag) not in AWAITED:
                    wrong.append(f"{unit[0]}:{line}: `prmkit {command}` has no {flag}: {text[:90]!r}")
    assert checked > 100  # the walk found the messages (and the commands reach them)
    assert not wrong, "\n".join(sorted(set(wrong)))
    arrived = [
        f"`prmkit {command}` now has {flag}: remove it from AWAITED"
        for command, flag in AWAITED
        if flag in options[command]
    ]
    assert not arrived, arrived


def test_the_walk_sees_through_shared_code():
    # The reachability the check relies on: train reaches the data reader's hint, push does not; push reaches the
    # Hub code directly, train only through reworded(PUSH_FLAGS_AS_KEYS).
    _options, entry = commands()
    source = Source()
    train, push = source.reach(entry["train"]), source.reach(entry["push"])
    assert (("prmkit.data.sources", "read_step_rows"), None) in train
    assert not any(unit == ("prmkit.data.sources", "read_step_rows") for unit, _ in push)
    assert (("prmkit.hub.files", "select_files"), None) in push
    assert (("prmkit.hub.files", "select_files"), "prmkit.training.recipe.PUSH_FLAGS_AS_KEYS") in train
    assert not any(unit == ("prmkit.hub.files", "select_files") and table is None for unit, table in train)
    assert named_command("run `prmkit --debug COMMAND ...`", "--debug", list(entry)) == ""
    assert named_command("the same `prmkit train` command plus --resume", "--resume", list(entry)) == "train"
    assert named_command("pip install 'prmkit[plot]' (--no-plots)", "--no-plots", list(entry)) is None


def test_train_pushes_with_hints_in_its_own_terms(tmp_path, monkeypatch):
    import prmkit.hub
    from prmkit.config.load import load_config
    from prmkit.errors import UsageError
    from prmkit.training.recipe import _push

    def refusing_push(model_dir, repo_id, **kwargs):
        logging.getLogger("prmkit").warning("no license given (--license or push.license): the card declares none")
        raise UsageError(f"{model_dir} holds pickle files", hint="pass --allow-pickle to upload them anyway")

    monkeypatch.setattr(prmkit.hub, "push_model", refusing_push)
    with prmkit_log() as records, pytest.raises(UsageError) as err:
        _push(load_config(None, ["push.repo_id=me/prm"]), tmp_path, None)
    assert err.value.hint == "pass --set push.allow_pickle=true to upload them anyway"
    assert [r.getMessage() for r in records] == [
        "no license given (--set push.license=ID or push.license): the card declares none"
    ]
    assert not logging.getLogger("prmkit").filters  # `prmkit push` itself keeps its own words
