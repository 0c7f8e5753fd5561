"""Commands that need no model start without torch, transformers or datasets (seconds each on a busy machine)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from prmkit.config.load import _resolve
from prmkit.config.training_args import imported_training_arguments, parse_training_arguments

HEAVY = ("torch", "transformers", "datasets", "fastapi", "uvicorn", "prometheus_client")

# Runs each command in one fresh interpreter, as `prmkit ...` would, then reports the heavy modules it imported.
PROBE = r"""
import json, sys
from typer.testing import CliRunner
from prmkit.cli.app import app
results = []
for args in json.loads(sys.argv[1]):
    res = CliRunner().invoke(app, args)
    results.append({"args": args, "exit_code": res.exit_code, "output": res.output[-2000:], "stdout": res.stdout,
                    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)})
print(json.dumps(results))
""".replace("HEAVY", repr(HEAVY))


def probe(commands: list[list[str]], cwd) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_of_every_command_and_config_commands_import_no_heavy_library(tmp_path):
    cfg = tmp_path / "x.yaml"
    commands = [
        ["--help"],
        *([name, "--help"] for name in ("prepare", "train", "eval", "score", "serve", "push", "config")),
        ["config", "init", "--help"],
        ["config", "show", "--help"],
        ["config", "init", str(cfg)],
        # The template holds TrainingArguments keys (learning_rate, save_strategy, ...): checking them needs no torch.
        ["config", "show", "-c", str(cfg)],
        ["config", "show", "-c", str(cfg), "--set", "train.lr_scheduler_type=cosine", "--set", "train.warmup_steps=5"],
    ]
    for result in probe(commands, tmp_path):
        assert result["exit_code"] == 0, result
        assert result["heavy"] == [], f"prmkit {' '.join(result['args'])} imported {result['heavy'][:5]}"
    shown = probe([["config", "show", "-c", str(cfg), "--json"]], tmp_path)[0]
    assert json.loads(shown["stdout"])["train"]["learning_rate"] == 1e-05


def test_a_bad_training_argument_is_caught_without_torch(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lerning_rate: 1.0e-4\n  num_train_epochs: many\n")
    [typo] = probe([["config", "show", "-c", str(tmp_path / "c.yaml")]], tmp_path)
    assert typo["exit_code"] == 2 and typo["heavy"] == []
    assert "unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)" in typo["output"]
    (tmp_path / "c.yaml").write_text("train:\n  num_train_epochs: many\n")
    [kind] = probe([["config", "show", "-c", str(tmp_path / "c.yaml")]], tmp_path)
    assert kind["exit_code"] == 2 and "train.num_train_epochs: expected a number" in kind["output"]


def test_fields_read_from_the_source_match_the_class():
    parsed, real = parse_training_arguments(), imported_training_arguments()
    assert parsed is not None and set(parsed) == set(real) and len(real) > 50
    plain = {bool, int, float, str, list, dict}
    for name, fld in real.items():
        kinds, nullable = _resolve(fld.type)
        p_kinds, p_nullable = _resolve(parsed[name].type)
        # The config checks look only at the plain kinds and at null; an enum is a stand-in class in both.
        assert (kinds & plain, nullable) == (p_kinds & plain, p_nullable), name
        if parsed[name].default is not dataclasses.MISSING:
            assert parsed[name].default == fld.default, name
        if isinstance(fld.default, bool):
            assert isinstance(parsed[name].default, bool), name


def test_the_training_recipe_imports_no_heavy_library(tmp_path):
    # The `prmkit train --num-processes` launcher imports the recipe to check the config and the output directory
    # before it starts any process: the Trainer classes (prmkit.training.trainer) come in only when a run builds them.
    code = (
        "import json, sys; import prmkit.training.recipe; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
