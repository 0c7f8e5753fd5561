"""The prepared-data cache is verified before use: damaged entries are rebuilt, and nothing is left behind."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import load_config
from prmkit.core.filenames import METADATA_FILE
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


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 20), encoding="utf-8")
    return path


def prepare(tok_dir: Path, src: Path, output=None, overwrite=False):
    cfg = load_config(None, None, {"model.tokenizer": str(tok_dir), "data.train": str(src)})
    return prepare_splits(cfg, load_tokenizer(str(tok_dir)), output=output, overwrite=overwrite)


def rows_of(prepared) -> list[dict]:
    return prepared.load()["train"].to_list()


def arrow_file(path: Path) -> Path:
    [arrow] = sorted((path / "train").glob("*.arrow"))
    return arrow


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_metadata_records_size_and_checksum_of_every_file(source, tiny_tokenizer_dir):
    import hashlib

    first = prepare(tiny_tokenizer_dir, source)
    files = json.loads((first.path / METADATA_FILE).read_text())["files"]
    arrow = arrow_file(first.path)
    rel = arrow.relative_to(first.path).as_posix()
    assert files[rel] == {"size": arrow.stat().st_size, "sha256": hashlib.sha256(arrow.read_bytes()).hexdigest()}
    assert "dataset_dict.json" in files and METADATA_FILE not in files
    assert prepare(tiny_tokenizer_dir, source).cache_hit


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete_split"])
def test_damaged_cache_is_rebuilt_with_a_notice(source, tiny_tokenizer_dir, caplog, damage):
    first = prepare(tiny_tokenizer_dir, source)
    expected = rows_of(first)
    arrow = arrow_file(first.path)
    data = arrow.read_bytes()
    if damage == "truncate":
        arrow.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        # Same size, zeroed bytes in the middle of the token ids: Arrow still loads it, with altered rows.
        middle = len(data) // 2
        arrow.write_bytes(data[:middle] + bytes(64) + data[middle + 64 :])
    else:
        import shutil

        shutil.rmtree(first.path / "train")
    caplog.set_level(logging.INFO, logger="prmkit")
    again = prepare(tiny_tokenizer_dir, source)
    assert not again.cache_hit and again.path == first.path
    reason = {
        "truncate": f"has {len(data) // 2} bytes, but {len(data)} were written",
        "zero": "does not match the checksum recorded when it was written",
        "delete_split": "is missing",
    }[damage]
    [notice] = warnings(caplog)
    assert notice.startswith(f"{first.path}: train/") and reason in notice and notice.endswith("; rebuilding it")
    assert rows_of(again) == expected
    assert prepare(tiny_tokenizer_dir, source).cache_hit


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_cache_entry_without_readable_metadata_is_rebuilt(source, tiny_tokenizer_dir, caplog, damage):
    first = prepare(tiny_tokenizer_dir, source)
    meta = first.path / METADATA_FILE
    meta.unlink() if damage == "delete" else meta.write_text('{"cache_key": ')
    caplog.set_level(logging.INFO, logger="prmkit")
    again = prepare(tiny_tokenizer_dir, source)
    assert not again.cache_hit and rows_of(again) == rows_of(first)
    assert warnings(caplog) == [f"{first.path}: cache entry without a readable {METADATA_FILE}; rebuilding it"]


def test_output_without_metadata_needs_overwrite_and_overwrite_cleans_up(tmp_path, source, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    args = ["prepare", "--train", str(source), "--tokenizer", str(tiny_tokenizer_dir), "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    (out / METADATA_FILE).unlink()
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and f"{out} exists and is not a prmkit prepared dataset" in res.stderr
    assert "hint: pass --overwrite" in res.stderr
    res = runner.invoke(app, [*args, "--overwrite", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["cache_hit"] is False
    assert (out / METADATA_FILE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "rows.jsonl"]
    # A damaged output that still has its metadata is rebuilt without --overwrite.
    arrow = arrow_file(out)
    arrow.write_bytes(arrow.read_bytes()[:100])
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["cache_hit"] is False
    assert "does not match" in res.stderr or "bytes, but" in res.stderr


def test_overwrite_replaces_a_file_at_the_output_path(tmp_path, source, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    out.write_text("a file, not a directory")
    args = ["prepare", "--train", str(source), "--tokenizer", str(tiny_tokenizer_dir), "-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "is not a prmkit prepared dataset" in res.stderr and "Traceback" not in res.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "rows.jsonl"]


@pytest.mark.slow
def test_killed_prepare_leaves_a_temp_dir_that_the_next_run_removes(tmp_path, source, tiny_tokenizer_dir):
    out = tmp_path / "prepared"
    # A real kill -9 in the middle of writing the dataset.
    script = (
        "import os, signal, datasets\n"
        "real = datasets.DatasetDict.save_to_disk\n"
        "def save(self, path, *a, **k):\n"
        "    real(self, path, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "datasets.DatasetDict.save_to_disk = save\n"
        "from prmkit.cli.app import main\n"
        "main()\n"
    )
    env = {**os.environ, "PRMKIT_CACHE": str(tmp_path / "cache")}
    args = ["prepare", "--train", str(source), "--tokenizer", str(tiny_tokenizer_dir), "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".prepared.")]
    assert left.is_dir() and any(left.rglob("*.arrow")) and not out.exists()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "removed 1 temporary directory" in res.stderr and "left in" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "rows.jsonl"]


def test_a_running_prepare_keeps_its_temp_dir(tmp_path, source, tiny_tokenizer_dir):
    from prmkit.core.atomic import TEMP_SUFFIX, temp_prefix

    out = tmp_path / "prepared"
    live = tmp_path / f"{temp_prefix(out.name)}abcd{TEMP_SUFFIX}"  # this process is alive
    live.mkdir()
    prepare(tiny_tokenizer_dir, source, output=out)
    assert live.is_dir()


@pytest.mark.slow
def test_train_rebuilds_a_damaged_cache(tmp_path, source, tiny_qwen2_config_dir):
    from conftest import write_train_rows

    rows = write_train_rows(tmp_path / "train.jsonl", n=8)
    args = [
        "train",
        "-m",
        str(tiny_qwen2_config_dir),
        "--train",
        str(rows),
        "--set",
        "model.init_from_config=true",
        "--max-steps",
        "1",
        "--set",
        "train.per_device_train_batch_size=4",
    ]
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "a")]).exit_code == 0
    [entry] = (Path(os.environ["PRMKIT_CACHE"]) / "prepared").iterdir()
    arrow = arrow_file(entry)
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) - 40])
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "rebuilding it" in res.stderr and "Traceback" not in res.output
    assert arrow.read_bytes() == data


def test_cached_example_model_is_verified_and_rebuilt(tmp_path, caplog):
    from prmkit.training.example import MANIFEST_FILE, example_base_dir

    first = example_base_dir(str(tmp_path / "cache"))
    assert (
        json.loads((first / MANIFEST_FILE).read_text())["config.json"]["size"] == (first / "config.json").stat().st_size
    )
    assert example_base_dir(str(tmp_path / "cache")) == first
    good = (first / "tokenizer.json").read_bytes()
    (first / "tokenizer.json").write_bytes(good[:-10])
    caplog.set_level(logging.INFO, logger="prmkit")
    again = example_base_dir(str(tmp_path / "cache"))
    assert again == first and (again / "tokenizer.json").read_bytes() == good
    assert any("tokenizer.json has" in m and m.endswith("; rebuilding it") for m in warnings(caplog))
    assert [p.name for p in first.parent.iterdir()] == [first.name]
