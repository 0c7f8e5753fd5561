"""`prmkit prepare`: sources, bad input, rejects, caching, and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES, ROOT
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import load_config
from prmkit.core.filenames import METADATA_FILE, REJECTS_FILE
from prmkit.data.prepare import prepare_splits
from prmkit.models.loading import load_tokenizer

runner = CliRunner()

ROWS = [
    {
        "prompt": "Which number is larger, 9.8 or 9.11?",
        "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
        "labels": [True, False],
    },
    {
        "prompt": "Let's call the price of a pencil p.",
        "completions": ["The first equation is 3p + e = 124."],
        "labels": [True],
    },
    {
        "prompt": "So the answer is 42.",
        "completions": ["We check: 6 * 7 = 42.", "So the answer is 42."],
        "labels": [0.25, 1],
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg_for(tok_dir, train, **data):
    return load_config(
        None,
        None,
        {"model.tokenizer": str(tok_dir), "data.train": str(train), **{f"data.{k}": v for k, v in data.items()}},
    )


def prepare_cli(*args):
    return runner.invoke(app, ["prepare", *map(str, args)])


def test_prepare_writes_a_datasetdict_with_metadata(tmp_path, tiny_tokenizer_dir):
    import datasets

    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    res = prepare_cli(
        "-o", tmp_path / "out", "--train", src, "--eval", src, "--tokenizer", tiny_tokenizer_dir, "--json"
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["splits"]["train"]["rows_kept"] == 3
    assert summary["splits"]["train"]["labels_soft"] == 1
    assert summary["splits"]["train"]["labels_positive"] == 3 and summary["splits"]["train"]["labels_negative"] == 1
    dsd = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dsd) == {"train", "eval"}
    row = dsd["train"][2]
    labelled = [x for x in row["labels"] if x != -100]
    assert labelled == pytest.approx([0.25, 1.0])  # soft label kept, not floored to 0
    meta = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert meta["tokenization"]["step_separator"] == "\n"
    assert meta["tokenization"]["max_length"] == 1024
    assert len(meta["tokenizer"]["sha256"]) == 64
    assert meta["data"]["fingerprints"]["train"]
    assert meta["prmkit_version"]


def test_bool_labels_keep_minus_100(tmp_path, tiny_tokenizer_dir):
    # TRL's PR #2127 bug: Dataset.map cast -100 to True for a bool labels column.
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS[:2])
    prepared = prepare_splits(cfg_for(tiny_tokenizer_dir, src), load_tokenizer(str(tiny_tokenizer_dir)))
    ds = prepared.load()["train"]
    assert ds.features["labels"].feature.dtype == "int64"
    labels = ds[0]["labels"]
    assert labels.count(-100) == len(labels) - 2
    assert [x for x in labels if x != -100] == [1, 0]


def test_cache_hit_and_invalidation(tmp_path, tiny_tokenizer_dir, tiny_bos_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    first = prepare_splits(cfg_for(tiny_tokenizer_dir, src), tok)
    assert not first.cache_hit
    again = prepare_splits(cfg_for(tiny_tokenizer_dir, src), tok)
    assert again.cache_hit and again.path == first.path
    # A changed parameter, tokenizer or data file is a different cache entry.
    assert not prepare_splits(cfg_for(tiny_tokenizer_dir, src, max_length=16), tok).cache_hit
    assert not prepare_splits(
        cfg_for(tiny_bos_tokenizer_dir, src), load_tokenizer(str(tiny_bos_tokenizer_dir))
    ).cache_hit
    write_jsonl(src, ROWS[:2])
    changed = prepare_splits(cfg_for(tiny_tokenizer_dir, src), tok)
    assert not changed.cache_hit and changed.reports["train"].rows_kept == 2


def test_output_dir_is_rebuilt_when_inputs_change(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    assert prepare_cli("-o", out, "--train", src, "--tokenizer", tiny_tokenizer_dir).exit_code == 0
    res = prepare_cli("-o", out, "--train", src, "--tokenizer", tiny_tokenizer_dir, "--json")
    assert json.loads(res.stdout.strip().splitlines()[-1])["cache_hit"] is True
    res = prepare_cli(
        "-o", out, "--train", src, "--tokenizer", tiny_tokenizer_dir, "--set", "data.max_length=16", "--json"
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["cache_hit"] is False
    assert summary["splits"]["train"]["tokens_max"] == 16 and summary["splits"]["train"]["rows_kept"] == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
def test_the_prepared_directory_follows_the_umask(tmp_path, tiny_tokenizer_dir, umask, mode):
    import os
    import stat

    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    previous = os.umask(umask)
    try:
        fresh = prepare_cli("--train", src, "--tokenizer", tiny_tokenizer_dir, "-o", tmp_path / "out")
        replaced = prepare_cli(
            "--train", src, "--tokenizer", tiny_tokenizer_dir, "-o", tmp_path / "out", "--set", "data.max_length=64"
        )
    finally:
        os.umask(previous)
    assert fresh.exit_code == 0 and replaced.exit_code == 0, fresh.output + replaced.output
    # As a directory the user made would be (mkdtemp's 0700 would lock out the group the umask lets in).
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "out" / "train").stat().st_mode) == mode


def test_foreign_output_dir_is_refused(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = prepare_cli("-o", out, "--train", src, "--tokenizer", tiny_tokenizer_dir)
    assert res.exit_code == 2
    assert "not a prmkit prepared dataset" in res.stderr
    assert (out / "notes.txt").read_text() == "keep me"


BAD_LINES = [
    json.dumps(ROWS[0]),
    '{"prompt": "p", "completions": ["a"], "labels": [1, 0]}',
    "{not json",
    json.dumps({"prompt": "p", "completions": ["a", ""], "labels": [1, 1]}),
    json.dumps(ROWS[1]),
]


def test_bad_rows_stop_with_file_line_field_and_reason(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n")
    res = prepare_cli("-o", tmp_path / "out", "--train", src, "--tokenizer", tiny_tokenizer_dir)
    assert res.exit_code == 2
    assert "3 of 5 rows are invalid" in res.stderr
    assert f"{src}: line 2: labels: 2 labels for 1 steps" in res.stderr
    assert f"{src}: line 3: row: malformed JSON" in res.stderr
    assert f"{src}: line 4: completions[1]: empty step" in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_skip_invalid_writes_rejects_and_counts_reconcile(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n")
    res = prepare_cli(
        "-o", tmp_path / "out", "--train", src, "--tokenizer", tiny_tokenizer_dir, "--skip-invalid", "--json"
    )
    assert res.exit_code == 0, res.output
    split = json.loads(res.stdout.strip().splitlines()[-1])["splits"]["train"]
    assert split["rows_in"] == 5 and split["rows_rejected"] == 3 and split["rows_kept"] == 2
    assert split["rows_in"] == split["rows_kept"] + split["rows_rejected"]
    rejects = [json.loads(x) for x in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "labels"), (3, "row"), (4, "completions[1]")]


def test_non_utf8_line(tmp_path, tiny_tokenizer_dir):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    res = prepare_cli("-o", tmp_path / "out", "--train", src, "--tokenizer", tiny_tokenizer_dir)
    assert res.exit_code == 2
    assert f"{src}: line 2: row: not UTF-8" in res.stderr


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.jsonl", "file not found"),
        (lambda p: _write(p / "empty.jsonl", ""), "the file is empty"),
        (lambda p: _write(p / "rows.txt", "x"), "unsupported file type .txt"),
        (lambda p: _write(p / "bad.json", "[{"), "malformed JSON"),
    ],
)
def test_unreadable_sources_get_one_line(tmp_path, tiny_tokenizer_dir, setup, message):
    src = setup(tmp_path)
    res = prepare_cli("-o", tmp_path / "out", "--train", src, "--tokenizer", tiny_tokenizer_dir)
    assert res.exit_code == 2
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_unknown_format(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    res = prepare_cli("-o", tmp_path / "out", "--train", src, "--tokenizer", tiny_tokenizer_dir, "--format", "shepherd")
    assert res.exit_code == 2
    assert "data.format: expected one of" in res.stderr and "did you mean 'math-shepherd'" in res.stderr


def test_undetectable_format(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello"}])
    res = prepare_cli("-o", tmp_path / "out", "--train", src, "--tokenizer", tiny_tokenizer_dir)
    assert res.exit_code == 2 and "cannot detect the data format" in res.stderr


def test_parquet_csv_and_saved_dataset_sources(tmp_path, tiny_tokenizer_dir):
    import datasets

    flat = [{"problem": "P?", "steps": ["a b", "c"], "label": 1}, {"problem": "Q?", "steps": ["d"], "label": -1}]
    ds = datasets.Dataset.from_list(flat)
    ds.to_parquet(str(tmp_path / "pb.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    for src in (tmp_path / "pb.parquet", tmp_path / "saved"):
        prepared = prepare_splits(cfg_for(tiny_tokenizer_dir, src), tok)
        assert prepared.reports["train"].format == "processbench"
        assert prepared.reports["train"].steps == 3
    datasets.Dataset.from_list([{"input": "Q? Step 1: a ки", "label": "Q? Step 1: a +", "task": "t"}]).to_csv(
        str(tmp_path / "ms.csv")
    )
    prepared = prepare_splits(cfg_for(tiny_tokenizer_dir, tmp_path / "ms.csv"), tok)
    assert prepared.reports["train"].format == "math-shepherd" and prepared.reports["train"].labels_positive == 1


def test_hub_dataset_unreachable_is_one_line(tmp_path, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = prepare_cli(
        "-o", tmp_path / "out", "--train", "nobody/no-such-dataset:train[:10%]", "--tokenizer", tiny_tokenizer_dir
    )
    assert res.exit_code == 2
    assert "nobody/no-such-dataset:train[:10%]: could not load" in res.stderr


def test_truncation_losses_are_counted(tmp_path, tiny_tokenizer_dir):
    rows = [
        {"prompt": "So the answer is 42. " * 30, "completions": ["We check: 6 * 7 = 42."] * 3, "labels": [1, 1, 1]},
        ROWS[1],
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = cfg_for(tiny_tokenizer_dir, src, max_length=40, max_prompt_length=None)
    prepared = prepare_splits(cfg, load_tokenizer(str(tiny_tokenizer_dir)))
    report = prepared.reports["train"]
    assert report.rows_dropped_truncated == 1 and report.rows_kept == 1
    assert report.steps_lost_to_truncation == 3


def test_separator_inside_steps_is_counted(tmp_path, tiny_tokenizer_dir):
    rows = [{"prompt": "p", "completions": ["two\nlines", "one"], "labels": [1, 1]}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    prepared = prepare_splits(cfg_for(tiny_tokenizer_dir, src), load_tokenizer(str(tiny_tokenizer_dir)))
    assert prepared.reports["train"].steps_with_separator == 1


def test_num_proc_gives_the_same_result(tmp_path, train_tokenizer_dir, monkeypatch):
    import prmkit.data.tokenized as dataset_mod

    monkeypatch.setattr(dataset_mod, "CHUNK_ROWS", 8)
    rows = [dict(ROWS[i % 3], prompt=f"{ROWS[i % 3]['prompt']} {i}") for i in range(40)]
    rows.append(
        {"prompt": "unicode: café ½", "completions": ["<|endoftext|> inside", "b"], "labels": [1, 0]}
    )  # Rust path
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    tok = load_tokenizer(str(train_tokenizer_dir))
    one = prepare_splits(cfg_for(train_tokenizer_dir, src, num_proc=1), tok, output=tmp_path / "one").load()["train"]
    two = prepare_splits(cfg_for(train_tokenizer_dir, src, num_proc=2), tok, output=tmp_path / "two").load()["train"]
    assert one["input_ids"] == two["input_ids"]
    assert one["labels"] == two["labels"]
    assert (
        len(one) == 41 and one["input_ids"][-1][:3] == tok("unicode: café ½", add_special_tokens=False)["input_ids"][:3]
    )


def test_bundled_examples_prepare(tmp_path, tiny_tokenizer_dir):
    cfg = load_config(
        None,
        None,
        {
            "model.tokenizer": str(tiny_tokenizer_dir),
            "data.train": str(EXAMPLES / "prm800k_samples.jsonl"),
            "data.eval": str(EXAMPLES / "processbench_gsm8k_sample.json"),
        },
    )
    prepared = prepare_splits(cfg, load_tokenizer(str(tiny_tokenizer_dir)))
    assert prepared.reports["train"].format == "prm800k" and prepared.reports["train"].rows_converted == 201
    assert prepared.reports["eval"].format == "processbench" and prepared.reports["eval"].rows_in == 120


@pytest.mark.slow
def test_prepare_as_a_real_subprocess(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "prepare",
            "-o",
            str(tmp_path / "out"),
            "--train",
            str(src),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["splits"]["train"]["rows_kept"] == 3
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "prmkit",
            "prepare",
            "-o",
            str(tmp_path / "o2"),
            "--train",
            str(tmp_path / "nope.jsonl"),
            "--tokenizer",
            str(tiny_tokenizer_dir),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("nope.jsonl: file not found") or "file not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_progress_reports_rows_per_split_up_to_the_total(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import prmkit.data.tokenized as dataset_mod

    monkeypatch.setattr(dataset_mod, "CHUNK_ROWS", 4)
    rows = [dict(ROWS[i % 3], prompt=f"{ROWS[i % 3]['prompt']} {i}") for i in range(10)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    seen = []
    cfg = load_config(
        None, None, {"model.tokenizer": str(tiny_tokenizer_dir), "data.train": str(src), "data.eval": str(src)}
    )
    prepare_splits(
        cfg,
        load_tokenizer(str(tiny_tokenizer_dir)),
        output=tmp_path / "out",
        on_progress=lambda split, done, total: seen.append((split, done, total)),
    )
    assert seen == [
        ("train", 4, 10),
        ("train", 8, 10),
        ("train", 10, 10),
        ("eval", 4, 10),
        ("eval", 8, 10),
        ("eval", 10, 10),
    ]


def test_no_rows_left_is_an_error_not_an_empty_dataset(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    res = prepare_cli("-o", out, "--train", src, "--tokenizer", tiny_tokenizer_dir, "--set", "data.max_length=2")
    assert res.exit_code == 2, res.output
    assert (
        f"{src}: no train rows left: all 3 rows lost every labelled step to truncation (data.max_length=2" in res.stderr
    )
    assert "hint: raise data.max_length" in res.stderr and "Traceback" not in res.output
    assert not out.exists()
    # Every row rejected under --skip-invalid: the reasons are listed, and nothing is written.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a"], "labels": [1, 0]}) + "\n{not json\n")
    res = prepare_cli("-o", out, "--train", bad, "--tokenizer", tiny_tokenizer_dir, "--skip-invalid")
    assert res.exit_code == 2
    assert (
        "no train rows left: all 2 rows were rejected" in res.stderr
        and f"{bad}: line 2: row: malformed JSON" in res.stderr
    )
    assert not out.exists()


@pytest.mark.slow
def test_two_machines_preparing_the_same_data_get_the_same_dataset(tmp_path, train_tokenizer_dir):
    """Multi-node training without a shared cache prepares on each machine (README, "Several machines"): two processes
    (their own hash seeds), working directories and caches, the same data, must give the same cache key and the very
    same Arrow files, so every rank's shard indexes the same rows."""
    from conftest import write_train_rows

    rows = write_train_rows(tmp_path / "train.jsonl", n=20, seed=3, soft=True)
    summaries, files = [], []
    for machine, seed in (("a", "1"), ("b", "2")):
        home = tmp_path / machine
        home.mkdir()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "prmkit",
                "prepare",
                "--train",
                str(rows),
                "--tokenizer",
                str(train_tokenizer_dir),
                "-o",
                str(home / "prepared"),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=home,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "PYTHONHASHSEED": seed,
                "PRMKIT_CACHE": str(home / "cache"),
                "HF_HOME": str(home / "hf"),
            },
        )
        assert proc.returncode == 0, proc.stderr
        summaries.append(json.loads(proc.stdout))
        meta = json.loads((home / "prepared" / METADATA_FILE).read_text())
        arrow = sorted((home / "prepared" / "train").glob("*.arrow"))
        files.append((meta["cache_key"], meta["tokenizer"], [f.read_bytes() for f in arrow]))
    assert summaries[0]["splits"] == summaries[1]["splits"] and summaries[0]["splits"]["train"]["rows_kept"] == 20
    assert files[0] == files[1] and files[0][2]
