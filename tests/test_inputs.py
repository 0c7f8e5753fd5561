"""Every input handled: bad text, encodings, score's labels, odd JSON shapes, stdin, mixed formats, rejects, config.

Each entry point (prepare, train, eval, score) meets the same bad input and must answer with one line naming the
source, the line and the field, exit 2 and no traceback; prmkit writes only valid JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_tiny_prm
from typer.testing import CliRunner

from prmkit.cli.app import app

runner = CliRunner()

GOOD = [
    {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is 5."], "labels": [True, True]},
    {"prompt": "What is 2 + 2?", "completions": ["2 + 2 = 5."], "labels": [False]},
]
PB = {"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5.", "The answer is 6."], "label": 1}


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python accepts but JSON does not have."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("inputs") / "prm", train_tokenizer_dir, seed=3)


def prepare(tmp_path, tok, src, *extra):
    return runner.invoke(
        app,
        [
            "prepare",
            "--train",
            str(src),
            "--tokenizer",
            str(tok),
            "-o",
            str(tmp_path / "out"),
            "--json",
            *map(str, extra),
        ],
    )


# --- 1. text that is not text ---------------------------------------------------------------------------------------

# A JSON line that json.loads accepts but whose text cannot be tokenized (written raw: json.dumps would escape it).
BAD_TEXT = [
    (
        '{"prompt": "a\\ud800b", "completions": ["x"], "labels": [true]}',
        "prompt",
        "lone surrogate U+D800 at character 1",
    ),
    (
        '{"prompt": "p", "completions": ["ok", "\\udc00\\ud800"], "labels": [true, false]}',
        "completions[1]",
        "lone surrogate U+DC00 at character 0",
    ),
    ('{"prompt": "p", "completions": ["a\\u0000b"], "labels": [true]}', "completions[0]", "NUL character (U+0000)"),
]


@pytest.mark.parametrize("line,field,reason", BAD_TEXT)
def test_bad_text_is_a_bad_row_in_prepare_and_skip_invalid_rejects_it(
    tmp_path, train_tokenizer_dir, line, field, reason
):
    src = write(tmp_path / "rows.jsonl", lines(GOOD[0], line, GOOD[1]))
    result = prepare(tmp_path, train_tokenizer_dir, src)
    assert result.exit_code == 2, result.output
    assert f"rows.jsonl: line 2: {field}: {reason}" in result.stderr
    no_traceback(result)

    skipped = prepare(tmp_path, train_tokenizer_dir, src, "--skip-invalid")
    assert skipped.exit_code == 0, skipped.output
    split = json.loads(skipped.stdout)["splits"]["train"]
    assert (split["rows_in"], split["rows_rejected"], split["rows_kept"]) == (3, 1, 2)
    reject = strict_json((tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8"))
    assert reject["line"] == 2 and reject["field"] == field and reason in reject["reason"]
    assert reject["record"] == json.loads(line)  # written so that it reads back to the very same record


def test_bad_text_in_train_eval_and_score(tmp_path, prm_dir, tiny_qwen2_config_dir):
    line, field, reason = BAD_TEXT[0]
    src = write(tmp_path / "rows.jsonl", lines(GOOD[0], line))
    trained = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_qwen2_config_dir),
            "--set",
            "model.init_from_config=true",
            "--train",
            str(src),
            "-o",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
        ],
    )
    evaluated = runner.invoke(
        app, ["eval", str(prm_dir), "--data", str(src), "-o", str(tmp_path / "eval"), "--no-plots"]
    )
    scored = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(tmp_path / "scored.jsonl")])
    for result in (trained, evaluated, scored):
        assert result.exit_code == 2, result.output
        assert f"rows.jsonl: line 2: {field}: {reason}" in result.stderr
        no_traceback(result)


def test_library_tokenization_names_a_lone_surrogate(train_tokenizer_dir):
    from transformers import AutoTokenizer

    from prmkit.errors import DataError
    from prmkit.tokenization import TokenizationParams, encode_solutions

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    with pytest.raises(DataError, match="lone surrogate U\\+D800 at character 2"):
        encode_solutions(tok, ["ab\ud800"], [["x"]], TokenizationParams())


def _prepared_ids(path: Path) -> list:
    import datasets

    return datasets.load_from_disk(str(path))["train"]["input_ids"]


def test_bom_and_crlf_are_accepted_and_change_nothing(tmp_path, train_tokenizer_dir):
    text = lines(*GOOD)
    plain = write(tmp_path / "plain.jsonl", text)
    variants = {
        "bom.jsonl": b"\xef\xbb\xbf" + text.encode(),
        "crlf.jsonl": text.replace("\n", "\r\n").encode(),
        "bom_crlf.json": b"\xef\xbb\xbf" + json.dumps(GOOD, indent=1).replace("\n", "\r\n").encode(),
    }
    assert prepare(tmp_path / "p", train_tokenizer_dir, plain).exit_code == 0
    expected = _prepared_ids(tmp_path / "p" / "out")
    for name, data in variants.items():
        result = prepare(tmp_path / f"o_{name}", train_tokenizer_dir, write(tmp_path / name, data))
        assert result.exit_code == 0, (name, result.output)
        assert json.loads(result.stdout)["splits"]["train"]["format"] == "stepwise"
        assert _prepared_ids(tmp_path / f"o_{name}" / "out") == expected, name


@pytest.mark.parametrize("encoding,named", [("utf-16", "UTF-16LE"), ("utf-16-be", "UTF-16BE"), ("utf-32", "UTF-32LE")])
def test_utf16_and_utf32_files_are_refused_with_their_encoding_named(tmp_path, train_tokenizer_dir, encoding, named):
    for name in ("rows.jsonl", "rows.json"):
        text = lines(*GOOD) if name.endswith("l") else json.dumps(GOOD)
        result = prepare(tmp_path, train_tokenizer_dir, write(tmp_path / name, text.encode(encoding)))
        assert result.exit_code == 2, result.output
        assert f"{name}: the text is encoded in {named}, not UTF-8" in result.stderr
        assert f"iconv -f {named} -t UTF-8" in result.stderr
        no_traceback(result)


def test_a_raw_nul_byte_is_a_bad_line(tmp_path, train_tokenizer_dir):
    src = write(tmp_path / "rows.jsonl", lines(GOOD[0]).encode() + b'{"prompt": "a\x00"}\n')
    result = prepare(tmp_path, train_tokenizer_dir, src)
    assert result.exit_code == 2
    assert "rows.jsonl: line 2: row: a NUL byte at byte 13" in result.stderr


@pytest.mark.slow
def test_prepare_subprocess_bad_text_and_utf16(tmp_path, train_tokenizer_dir):
    cmd = [
        sys.executable,
        "-m",
        "prmkit",
        "prepare",
        "--tokenizer",
        str(train_tokenizer_dir),
        "-o",
        str(tmp_path / "o"),
    ]
    bad = write(tmp_path / "bad.jsonl", lines(GOOD[0], BAD_TEXT[0][0]))
    proc = subprocess.run([*cmd, "--train", str(bad)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "bad.jsonl: line 2: prompt: lone surrogate U+D800" in proc.stderr and "Traceback" not in proc.stderr
    wide = write(tmp_path / "wide.jsonl", lines(*GOOD).encode("utf-16"))
    proc = subprocess.run([*cmd, "--train", str(wide)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "encoded in UTF-16LE, not UTF-8" in proc.stderr, proc.stderr


# --- 2. score checks labels and writes only valid JSON --------------------------------------------------------------

BAD_LABELS = [
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "labels", "1 labels for 2 steps"),
    ('{"prompt": "p", "completions": ["a"], "labels": [NaN]}', "labels[0]", "label is NaN"),
    ({"prompt": "p", "completions": ["a"], "labels": ["true"]}, "labels[0]", "label 'true' is a str"),
    ({"problem": "p", "steps": ["a", "b"], "label": 2}, "label", "expected -1 or a step index below 2, got 2"),
    ('{"prompt": "p", "completions": ["a"], "score": Infinity}', "score", "NaN or Infinity is not valid JSON"),
]


@pytest.mark.parametrize("line,field,reason", BAD_LABELS)
def test_score_refuses_bad_labels_as_eval_does(tmp_path, prm_dir, line, field, reason):
    src = write(tmp_path / "in.jsonl", lines(line))
    result = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 2, result.output
    assert f"in.jsonl: line 1: {field}: {reason}" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_score_subprocess_rejects_bad_labels_and_text_and_writes_valid_json(tmp_path, prm_dir):
    unlabelled = {"prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5."], "labels": None, "id": "x\ud800"}
    records = [GOOD[0], *(line for line, _, _ in BAD_LABELS[:3]), BAD_LABELS[4][0], BAD_TEXT[0][0], unlabelled]
    src = write(tmp_path / "in.jsonl", lines(*records))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", str(prm_dir), str(src), "-o", str(out), "--skip-invalid"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scored 2 of 7 lines" in proc.stderr and "5 rejected" in proc.stderr
    scored = [strict_json(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in scored] == [GOOD[0]["prompt"], unlabelled["prompt"]]
    assert scored[1]["id"] == "x\ud800" and scored[1]["labels"] is None  # written back exactly (as a \u escape)
    rejects = [strict_json(line) for line in Path(f"{out}.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [
        (2, "labels"),
        (3, "labels[0]"),
        (4, "labels[0]"),
        (5, "score"),
        (6, "prompt"),
    ]
    # A NaN cannot be written as JSON: the record says null there, and `raw` keeps the line as it was.
    assert rejects[1]["record"]["labels"] == [None] and rejects[1]["raw"] == BAD_LABELS[1][0]
    assert "raw" not in rejects[0]

    # Empty stdin is an error (exit 2), as an empty file is.
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", str(prm_dir), "-", "-o", "-"],
        input="",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "<stdin>: no lines to score" in proc.stderr, proc.stderr


def test_json_writers_never_write_nan(tmp_path):
    from prmkit.core.jsonio import dumps, dumps_record, nonfinite_field

    assert (
        dumps({"a": float("nan"), "b": [1.0, float("inf")], "p": Path("x")})
        == '{"a": null, "b": [1.0, null], "p": "x"}'
    )
    with pytest.raises(ValueError):
        dumps_record({"a": float("nan")})
    assert nonfinite_field({"a": {"b": [1, float("-inf")]}}) == "a.b[1]"
    assert nonfinite_field({"a": [1.5, "NaN"]}) is None
    assert strict_json(dumps_record({"t": "\ud800é"})) == {"t": "\ud800é"}
    dumps_record({"t": "\ud800"}).encode("utf-8")  # encodable: a lone surrogate goes out as its \u escape


# --- 3. what was found, and what was expected -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content,message",
    [
        (
            "one.json",
            json.dumps(PB),
            "one.json: found one object with keys ['label', 'problem', 'steps']; expected a JSON array of rows",
        ),
        (
            "two.json",
            json.dumps({"train": [GOOD[0]], "test": [GOOD[1]]}),
            "two.json: found an object with several arrays of rows (test, train)",
        ),
        (
            "strings.json",
            json.dumps(["a", "b"]),
            "strings.json: cannot detect the data format: none of the first 2 rows is a JSON object",
        ),
        ("array.jsonl", json.dumps(GOOD) + "\n", "array.jsonl: line 1: a JSON array, expected an object"),
        (
            "other.jsonl",
            lines({"question": "q", "answer": "a"}),
            "other.jsonl: line 1: cannot detect the data format from columns ['answer', 'question']",
        ),
    ],
)
def test_unusable_shapes_say_what_was_found_and_what_was_expected(
    tmp_path, train_tokenizer_dir, name, content, message
):
    result = prepare(tmp_path, train_tokenizer_dir, write(tmp_path / name, content))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "columns []" not in result.stderr
    no_traceback(result)


def test_the_format_is_detected_past_bad_first_lines(tmp_path, train_tokenizer_dir):
    src = write(tmp_path / "rows.jsonl", lines("{oops", *GOOD))
    strict = prepare(tmp_path, train_tokenizer_dir, src)
    assert strict.exit_code == 2 and "rows.jsonl: line 1: row: malformed JSON" in strict.stderr
    result = prepare(tmp_path, train_tokenizer_dir, src, "--skip-invalid")
    assert result.exit_code == 0, result.output
    split = json.loads(result.stdout)["splits"]["train"]
    assert (split["format"], split["rows_in"], split["rows_rejected"], split["rows_kept"]) == ("stepwise", 3, 1, 2)


# --- 4. stdin -------------------------------------------------------------------------------------------------------


def test_empty_stdin_is_an_error_like_an_empty_file(tmp_path, prm_dir):
    empty = write(tmp_path / "empty.jsonl", "")
    from_file = runner.invoke(app, ["score", str(prm_dir), str(empty), "-o", "-"])
    from_stdin = runner.invoke(app, ["score", str(prm_dir), "-", "-o", "-"], input="")
    blank_stdin = runner.invoke(app, ["score", str(prm_dir), "-", "-o", "-"], input="\n\n")
    assert from_file.exit_code == from_stdin.exit_code == blank_stdin.exit_code == 2
    assert "empty.jsonl: the file is empty" in from_file.stderr
    assert "<stdin>: no lines to score" in from_stdin.stderr and from_stdin.stdout == ""


def test_stdin_is_refused_clearly_where_data_is_read_more_than_once(
    tmp_path, prm_dir, train_tokenizer_dir, tiny_qwen2_config_dir
):
    text = lines(*GOOD)
    calls = {
        "prepare": ["prepare", "--train", "-", "--tokenizer", str(train_tokenizer_dir), "-o", str(tmp_path / "p")],
        "train": [
            "train",
            "--model",
            str(tiny_qwen2_config_dir),
            "--set",
            "model.init_from_config=true",
            "--train",
            "-",
            "-o",
            str(tmp_path / "run"),
        ],
        "eval": ["eval", str(prm_dir), "--data", "-", "-o", str(tmp_path / "eval"), "--no-plots"],
    }
    for name, args in calls.items():
        result = runner.invoke(app, args, input=text)
        assert result.exit_code == 2, (name, result.output)
        assert "-: reading data from stdin works only for `prmkit score`" in result.stderr, name
        assert "HFValidation" not in result.output and "Traceback" not in result.output, name
    assert not (tmp_path / "run").exists()  # refused before the output directory is touched


def test_score_reads_a_bom_on_stdin(tmp_path, prm_dir):
    text = lines(*GOOD)
    plain = runner.invoke(app, ["score", str(prm_dir), "-", "-o", "-"], input=text)
    bom = runner.invoke(app, ["score", str(prm_dir), "-", "-o", "-"], input="\ufeff" + text.replace("\n", "\r\n"))
    assert plain.exit_code == bom.exit_code == 0, bom.output
    assert bom.stdout == plain.stdout and len(plain.stdout.splitlines()) == 2


# --- 5. mixed formats and empty steps -------------------------------------------------------------------------------


def test_a_line_in_another_format_is_named_as_such(tmp_path, train_tokenizer_dir, prm_dir):
    src = write(tmp_path / "mixed.jsonl", lines(GOOD[0], PB))
    result = prepare(tmp_path, train_tokenizer_dir, src)
    assert result.exit_code == 2
    assert (
        "mixed.jsonl: line 2: row: a processbench row (columns label, problem, steps), but the format detected "
        "from line 1 is stepwise; one source holds one format"
    ) in result.stderr
    assert "missing" not in result.stderr

    src = write(tmp_path / "mixed2.jsonl", lines(PB, {"prompt": "p", "completions": ["a"]}))
    scored = runner.invoke(app, ["score", str(prm_dir), str(src), "-o", str(tmp_path / "o.jsonl")])
    assert scored.exit_code == 2
    assert (
        "mixed2.jsonl: line 2: row: a stepwise row (columns completions, prompt), but the format detected from "
        "line 1 is processbench"
    ) in scored.stderr

    given = prepare(
        tmp_path, train_tokenizer_dir, write(tmp_path / "g.jsonl", lines(GOOD[0])), "--format", "processbench"
    )
    assert (
        "line 1: row: a stepwise row (columns completions, labels, prompt), but the format given is processbench"
        in given.stderr
    )


@pytest.mark.parametrize(
    "record,field", [({**PB, "steps": []}, "steps"), ({**GOOD[0], "completions": [], "labels": []}, "completions")]
)
def test_empty_steps_say_empty(tmp_path, train_tokenizer_dir, record, field):
    result = prepare(tmp_path, train_tokenizer_dir, write(tmp_path / "rows.jsonl", lines(record)))
    assert result.exit_code == 2
    assert f"rows.jsonl: line 1: {field}: empty: expected a non-empty list of strings" in result.stderr
    assert "got list" not in result.stderr


# --- 11. config text, README, rejects keep the raw line -------------------------------------------------------------


def test_config_init_writes_the_separator_on_one_line_and_show_prints_integers(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "config", "init"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert '  step_separator: "\\n"\n' in proc.stdout
    assert yaml.safe_load(proc.stdout)["data"]["step_separator"] == "\n"
    cfg = write(tmp_path / "prmkit.yaml", proc.stdout)
    shown = runner.invoke(app, ["config", "show", "-c", str(cfg), "--set", r'data.step_separator="\n\n"'])
    assert shown.exit_code == 0, shown.output
    assert "  num_train_epochs: 1\n" in shown.stdout and "  save_steps: 500\n" in shown.stdout
    assert '  step_separator: "\\n\\n"\n' in shown.stdout
    assert yaml.safe_load(shown.stdout)["train"]["num_train_epochs"] == 1


def test_readme_says_row_is_a_1_based_number():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(the source row)" not in readme
    assert "`row` (the 1-based line of a JSONL file, or the 1-based row of any other source" in readme


def test_a_malformed_line_is_kept_raw_in_rejects_for_replay(tmp_path, train_tokenizer_dir):
    broken = '{"prompt": "What is 1 + 1?", "completions": ["1 + 1 = 2."], "labels": [true],}'
    src = write(tmp_path / "rows.jsonl", lines(GOOD[0], broken).replace("\n", "\r\n"))
    result = prepare(tmp_path, train_tokenizer_dir, src, "--skip-invalid")
    assert result.exit_code == 0, result.output
    reject = strict_json((tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8"))
    assert reject["line"] == 2 and reject["record"] is None and reject["raw"] == broken
    # Fixed by hand and replayed, the line is a good row.
    replay = write(tmp_path / "replay.jsonl", reject["raw"].replace("],}", "]}") + "\n")
    again = runner.invoke(
        app,
        [
            "prepare",
            "--train",
            str(replay),
            "--tokenizer",
            str(train_tokenizer_dir),
            "-o",
            str(tmp_path / "again"),
            "--json",
        ],
    )
    assert again.exit_code == 0 and json.loads(again.stdout)["splits"]["train"]["rows_kept"] == 1
