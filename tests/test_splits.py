"""Split syntax on local files (`rows.jsonl[:300]`), and an eval split held out of the training data
(`data.eval_fraction`)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.config.load import load_config
from prmkit.core.filenames import METADATA_FILE
from prmkit.data.prepare import prepare_splits
from prmkit.data.sources import iter_records, resolve_source
from prmkit.errors import ConfigError, DataError
from prmkit.models.loading import load_tokenizer

runner = CliRunner()


def rows(n: int, per_prompt: int = 1) -> list[dict]:
    """``n`` stepwise rows; every ``per_prompt`` consecutive ones share a prompt (one problem, several solutions)."""
    return [
        {
            "prompt": f"Problem {i // per_prompt}: what is {i // per_prompt} + 1?",
            "completions": [f"{i // per_prompt} + 1 = {i // per_prompt + 1}.", f"Solution {i}."],
            "labels": [True, i % 3 != 0],
        }
        for i in range(n)
    ]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def prompts_of(spec: str) -> list[str]:
    return [rec.record["prompt"] for rec in iter_records(resolve_source(spec))]


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the Hub (prmkit's lookup, or datasets loading a Hub id)."""
    import datasets

    import prmkit.core.locate

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    monkeypatch.setattr(prmkit.core.locate, "_on_hub", refuse)
    real = datasets.load_dataset

    def local_only(path, *args, **kwargs):
        if path not in ("json", "parquet", "csv"):
            refuse(path, *args, **kwargs)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_only)


def test_local_split_syntax_selects_rows_as_datasets_does_and_never_asks_the_hub(tmp_path, monkeypatch, no_hub):
    import datasets

    items = rows(20)
    write_jsonl(tmp_path / "rows.jsonl", items)
    (tmp_path / "rows.json").write_text(json.dumps(items), encoding="utf-8")
    datasets.Dataset.from_list(items).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(items[:10]), "test": datasets.Dataset.from_list(items[10:])}
    ).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    want = [r["prompt"] for r in items]
    assert prompts_of("rows.jsonl[:3]") == want[:3]
    assert prompts_of("./rows.jsonl[:3]") == want[:3]  # the second spelling: "file not found"
    assert prompts_of(str(tmp_path / "rows.jsonl") + "[10%:20%]") == want[2:4]
    assert prompts_of("rows.json[-2:]") == want[-2:]
    assert prompts_of("rows.parquet:train[5:7]") == want[5:7]
    assert prompts_of("saved:test[:2]") == want[10:12]
    assert prompts_of("rows.jsonl:train[:1]+train[-1:]") == [want[0], want[-1]]
    # Line numbers stay the file's, so a message names the line an editor shows.
    assert [rec.number for rec in iter_records(resolve_source("rows.jsonl[-2:]"))] == [19, 20]

    for spec, says in (
        ("rows.jsonl[abc]", "cannot read the split"),
        ("missing.jsonl[:3]", "file not found"),
        ("rows.jsonl:test[:3]", "a file holds one split"),
        ("saved:dev", "no split 'dev'"),
    ):
        with pytest.raises(DataError, match=says):
            list(iter_records(resolve_source(spec)))


def test_slices_are_part_of_the_cache_key_and_the_metadata(tmp_path, tiny_tokenizer_dir, no_hub):
    src = write_jsonl(tmp_path / "rows.jsonl", rows(12))
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    made = {}
    for piece in ("[:4]", "[4:10]", "[:4]"):
        cfg = load_config(None, None, {"model.tokenizer": str(tiny_tokenizer_dir), "data.train": f"{src}{piece}"})
        made.setdefault(piece, []).append(prepare_splits(cfg, tok))
    first, second = made["[:4]"][0], made["[4:10]"][0]
    assert first.path != second.path and first.metadata["cache_key"] != second.metadata["cache_key"]
    assert (first.reports["train"].rows_in, second.reports["train"].rows_in) == (4, 6)
    assert made["[:4]"][1].cache_hit and made["[:4]"][1].path == first.path
    assert first.metadata["data"]["sources"]["train"].endswith("rows.jsonl[:4]")


def test_eval_fraction_holds_out_whole_problems_seeded_and_recorded(tmp_path, tiny_tokenizer_dir):
    import datasets

    src = write_jsonl(tmp_path / "rows.jsonl", rows(60, per_prompt=3))  # 20 problems, 3 solutions each
    tok = load_tokenizer(str(tiny_tokenizer_dir))

    def split(seed: int, out: str) -> tuple[dict, set[str], set[str]]:
        cfg = load_config(
            None,
            [f"train.seed={seed}"],
            {"model.tokenizer": str(tiny_tokenizer_dir), "data.train": str(src), "data.eval_fraction": 0.25},
        )
        prepared = prepare_splits(cfg, tok, output=tmp_path / out)
        dsd = datasets.load_from_disk(str(prepared.path))
        source = [r["prompt"] for r in rows(60, per_prompt=3)]
        sides = [{source[n - 1] for n in dsd[name]["row"]} for name in ("train", "eval")]
        return prepared.metadata, sides[0], sides[1]

    meta, train, held = split(7, "a")
    assert not train & held and len(train | held) == 20  # no problem on both sides, none lost
    assert meta["data"]["eval_split"] == {
        "fraction": 0.25,
        "seed": 7,
        "grouped_by": "prompt",
        "train_rows": 45,
        "eval_rows": 15,
        "train_problems": 15,
        "eval_problems": 5,
    }
    assert meta["splits"]["eval"]["rows_kept"] == 15 and meta["splits"]["train"]["rows_kept"] == 45
    assert json.loads((tmp_path / "a" / METADATA_FILE).read_text())["data"]["eval_split"]["seed"] == 7
    assert split(7, "b")[2] == held  # seeded: the same problems again
    assert split(8, "c")[2] != held

    both = load_config(
        None,
        None,
        {
            "model.tokenizer": str(tiny_tokenizer_dir),
            "data.train": str(src),
            "data.eval": str(src),
            "data.eval_fraction": 0.25,
        },
    )
    with pytest.raises(ConfigError, match=r"data.eval .* and data.eval_fraction \(0.25\) both choose"):
        prepare_splits(both, tok)
    with pytest.raises(ConfigError, match="data.eval_fraction: 1.5 is out of range"):
        load_config(None, ["data.eval_fraction=1.5"])


def test_eval_fraction_from_the_command_line(tmp_path, tiny_tokenizer_dir):
    src = write_jsonl(tmp_path / "rows.jsonl", rows(8, per_prompt=2))
    res = runner.invoke(
        app,
        [
            "prepare",
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "--train",
            str(src),
            "-o",
            str(tmp_path / "out"),
            "--set",
            "data.eval_fraction=0.5",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["splits"]["train"]["rows_kept"], summary["splits"]["eval"]["rows_kept"]) == (4, 4)
    assert "held out: data.eval_fraction=0.5" in summary["splits"]["eval"]["source"]


def test_the_example_holds_out_a_fraction_instead_of_its_eval_file(tmp_path):
    from prmkit.training.example import apply_example

    cfg = load_config(None, ["data.eval_fraction=0.1", f"data.cache_dir={tmp_path}"], {"train.example": True})
    apply_example(cfg)
    assert cfg.data.train and cfg.data.eval is None and cfg.data.eval_fraction == 0.1
