"""Deeply nested JSON (issue #24): a bad row like any other, never a RecursionError out of a reader.

Python's decoder recurses once per array/object level, so a line about 990 levels deep used to end score, eval and
prepare with a traceback, --skip-invalid or not. Every JSON reader of input prmkit did not write goes through
:func:`prmkit.core.jsonio.loads`, which refuses more than ``MAX_DEPTH`` levels as a ``json.JSONDecodeError``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_prm
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.core import jsonio

runner = CliRunner()

GOOD = [
    {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [True, True]},
    {"prompt": "What is 2 + 2?", "completions": ["2 + 2 = 5."], "labels": [False]},
]
REASON = f"JSON nested more than {jsonio.MAX_DEPTH} arrays/objects deep"


PREFIX = '{"prompt": "What is 1 + 1?", "completions": ["1 + 1 = 2."], "labels": [true], "meta": '
COLUMN = len(PREFIX) + jsonio.MAX_DEPTH  # 1-based: the meta array that opens level 101 (the row's object is level 1)


def nested(depth: int) -> str:
    """A stepwise row whose extra field nests ``depth`` arrays."""
    return PREFIX + "[" * depth + "]" * depth + "}"


def write(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("deep") / "prm", train_tokenizer_dir, seed=3)


def _run(command: str, tmp_path: Path, prm_dir: Path, tok: Path, src: Path, *extra: str):
    out = tmp_path / f"{command}-out{len(extra)}"
    args = {
        "prepare": ["prepare", "--train", str(src), "--tokenizer", str(tok), "-o", str(out)],
        "eval": ["eval", str(prm_dir), "--data", str(src), "-o", str(out), "--no-plots"],
        "score": ["score", str(prm_dir), str(src), "-o", str(out)],
    }[command]
    return runner.invoke(app, [*args, *extra]), out


@pytest.mark.parametrize("command", ["prepare", "eval", "score"])
def test_a_deeply_nested_line_is_a_bad_row(tmp_path, prm_dir, train_tokenizer_dir, command):
    deep = nested(990)
    src = write(tmp_path / "rows.jsonl", GOOD[0], deep, GOOD[1])
    strict, _ = _run(command, tmp_path, prm_dir, train_tokenizer_dir, src)
    assert strict.exit_code == 2, strict.output
    assert f"rows.jsonl: line 2: row: {REASON} (at column {COLUMN})" in strict.stderr
    assert ("Traceback" not in strict.output and strict.exception is None) or isinstance(strict.exception, SystemExit)

    skipped, out = _run(command, tmp_path, prm_dir, train_tokenizer_dir, src, "--skip-invalid")
    assert skipped.exit_code == 0, skipped.output
    rejects_file = out.parent / (out.name + ".rejects.jsonl") if command == "score" else out / "rejects.jsonl"
    [reject] = [json.loads(x) for x in rejects_file.read_text(encoding="utf-8").splitlines()]
    assert (reject["line"], reject["field"], reject["record"], reject["raw"]) == (2, "row", None, deep)
    assert reject["reason"] == f"{REASON} (at column {COLUMN})"
    if command == "score":  # the two good lines are scored
        assert [json.loads(x)["prompt"] for x in out.read_text(encoding="utf-8").splitlines()] == [
            GOOD[0]["prompt"],
            GOOD[1]["prompt"],
        ]


def test_a_row_too_deep_in_a_json_file_is_rejected_and_a_file_too_deep_to_read_is_one_line(
    tmp_path, train_tokenizer_dir
):
    rows = tmp_path / "rows.json"
    rows.write_text("[" + ", ".join([json.dumps(GOOD[0]), nested(150), json.dumps(GOOD[1])]) + "]", encoding="utf-8")
    strict, out = _run("prepare", tmp_path, None, train_tokenizer_dir, rows)
    assert strict.exit_code == 2 and f"rows.json: row 2: row: {REASON}" in strict.stderr, strict.output
    skipped, out = _run("prepare", tmp_path, None, train_tokenizer_dir, rows, "--skip-invalid", "--json")
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout)["splits"]["train"]["rows_rejected"] == 1
    [reject] = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (reject["row"], reject["reason"]) == (2, REASON)

    rows.write_text("[" + ", ".join([json.dumps(GOOD[0]), nested(100_000)]) + "]", encoding="utf-8")
    unreadable, _ = _run("prepare", tmp_path, None, train_tokenizer_dir, rows)
    assert unreadable.exit_code == 2, unreadable.output
    column = len("[" + json.dumps(GOOD[0]) + ", ") + COLUMN - 1  # the file's array is one level more
    assert f"rows.json: line 1: {REASON} (at column {column})" in unreadable.stderr
    assert unreadable.exception is None or isinstance(unreadable.exception, SystemExit)


def test_a_deeply_nested_model_file_is_one_line(tmp_path, prm_dir):
    import shutil

    model = tmp_path / "prm"
    shutil.copytree(prm_dir, model)
    head = '{"notes": '
    (model / "prmkit.json").write_text(head + "[" * 5000 + "]" * 5000 + "}", encoding="utf-8")
    res = runner.invoke(
        app, ["score", str(model), str(write(tmp_path / "in.jsonl", *GOOD)), "-o", str(tmp_path / "out.jsonl")]
    )
    assert res.exit_code == 2, res.output
    assert (
        f"{model / 'prmkit.json'}: malformed JSON ({REASON[5:]} at line 1 column {len(head) + jsonio.MAX_DEPTH})"
        in res.stderr
    )


@pytest.mark.parametrize("depth,column", [(99, None), (100, None), (101, 101), (990, 101), (100_000, 101)])
def test_loads_refuses_more_than_max_depth_levels(depth, column):
    text = "[" * depth + "]" * depth
    if column is None:
        assert jsonio.loads(text) is not None and jsonio.loads(text.encode()) == jsonio.loads(text)
        return
    with pytest.raises(jsonio.NestingError) as e:
        jsonio.loads(text)
    assert isinstance(e.value, json.JSONDecodeError) and isinstance(e.value, ValueError)
    assert (e.value.msg, e.value.colno) == (REASON[5:], column)


def test_brackets_inside_strings_do_not_count():
    text = json.dumps({"s": "[" * 500 + '\\"{' * 200, "steps": ["[x]"] * 300})
    assert jsonio.loads(text)["steps"][0] == "[x]"
    assert not jsonio.nested_too_deep(jsonio.loads(text))
    assert jsonio.nested_too_deep(json.loads("[" * 101 + "]" * 101))


@pytest.mark.slow
def test_score_subprocess_rejects_a_nested_line_and_goes_on(tmp_path, prm_dir):
    src = write(tmp_path / "rows.jsonl", GOOD[0], nested(990), nested(200_000), GOOD[1])
    out = tmp_path / "scored.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", str(prm_dir), str(src), "-o", str(out), "--skip-invalid", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    summary = json.loads(res.stdout)
    assert (summary["lines_in"], summary["lines_scored"], summary["lines_rejected"]) == (4, 2, 2)
    rejects = [json.loads(x) for x in Path(summary["rejects"]).read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, f"{REASON} (at column {COLUMN})"),
        (3, f"{REASON} (at column {COLUMN})"),
    ]
