"""One registry per extension point: a PRM kind is declared once in ``prmkit/kinds/registry.py`` and a data format once
in ``prmkit/data/formats.py``; everything else asks them. A name spelled anywhere else fails here, and a kind or format
added to a registry (a throwaway one, in these tests) is picked up by the config, detection, encoding, scoring, eval
and the model card without touching another module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from prmkit.data import formats
from prmkit.data.formats import FORMATS, Format, Options
from prmkit.errors import ConfigError
from prmkit.kinds import registry
from prmkit.kinds.registry import KINDS, Kind, KindCard

PACKAGE = Path(__file__).resolve().parent.parent / "prmkit"
KINDS_HOME = PACKAGE / "kinds" / "registry.py"
FORMATS_HOME = PACKAGE / "data" / "formats.py"
# Modules allowed to spell a name besides its registry (e.g. CLI help listing the choices): none so far.
ALLOWED: dict[str, set[Path]] = {}


def stray_names(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) for every string literal equal to one of ``names`` in ``path``, and every quoted name in its text
    (what `grep -n '"lm-tag"'` finds, docstrings and comments included)."""
    text = path.read_text(encoding="utf-8")
    found = [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]
    for number, line in enumerate(text.splitlines(), 1):
        found += [(number, name) for name in names if f'"{name}"' in line or f"'{name}'" in line]
    return sorted(set(found))


@pytest.mark.parametrize(
    ("names", "home"), [(set(KINDS), KINDS_HOME), (set(FORMATS), FORMATS_HOME)], ids=["kinds", "formats"]
)
def test_names_are_spelled_only_in_their_registry(names, home):
    stray = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == home or path in ALLOWED.get(home.stem, set()):
            continue
        hits = stray_names(path, names)
        if hits:
            stray[str(path.relative_to(PACKAGE.parent))] = hits
    assert stray == {}, "ask the registry (e.g. get_kind(name).trainable, FORMATS[name].scored_as_is) instead"


def test_the_name_check_finds_a_stray_literal(tmp_path):
    module = tmp_path / "stray.py"
    module.write_text('"""Scores an lm-tag model."""\n\nif kind == "lm-tag" or fmt in (\'prm800k\',):\n    pass\n')
    assert stray_names(module, {"lm-tag", "prm800k"}) == [(3, "lm-tag"), (3, "prm800k")]


def test_every_kind_and_format_is_declared_once_under_its_own_name():
    assert [kind.name for kind in KINDS.values()] == list(KINDS)
    assert [fmt.name for fmt in FORMATS.values()] == list(FORMATS)
    assert not set(KINDS) & {registry.AUTO, *FORMATS} and formats.AUTO not in FORMATS
    # Two formats with one signature could never be told apart by `auto`.
    assert len({frozenset(fmt.signature) for fmt in FORMATS.values()}) == len(FORMATS)


def test_every_kind_declares_what_its_layout_and_head_need():
    layouts = {registry.SEPARATOR, registry.TAG_TEXT, registry.TAG_CHAT, registry.CHAT_TURNS}
    heads = {registry.CLASSIFIER, registry.QWEN_PRM_HEAD, registry.REWARD_TOKENS}
    for kind in KINDS.values():
        assert kind.layout in layouts and kind.head in heads, kind.name
        # The engine's own path reads a classifier after the separator; scoring.kinds loads the other two heads.
        assert kind.uses_separator == (kind.head == registry.CLASSIFIER), kind.name
        assert not kind.trainable or kind.card is not None, f"{kind.name}: prmkit trains it, so its card says how"
        assert not kind.uses_step_tag or kind.default_tag, f"{kind.name}: a tag layout needs a default tag"
        assert not kind.causal_signature or kind.summary, f"{kind.name}: the detection hint describes it"
    assert registry.KINDS[registry.DEFAULT_KIND].trainable


def test_the_config_template_documents_every_choice():
    # The comments `prmkit config init` writes come from these docstrings: a new kind or format names itself there.
    from prmkit.config.load import _field_docs
    from prmkit.config.schema import DataConfig, ModelConfig, TrainConfig

    assert all(name in _field_docs(ModelConfig)["kind"] for name in registry.kind_choices())
    assert all(name in _field_docs(TrainConfig)["kind"] for name in registry.train_kind_choices())
    assert all(name in _field_docs(DataConfig)["format"] for name in formats.format_choices())


# --- a throwaway kind and format, registered in the test only ---------------------------------------------------

TOY_CARD = KindCard(
    "text-generation",
    lambda kind: f"the toy head at `{kind.get('step_tag')}`",
    lambda repo, kind, separator, adapter: ["### transformers", "", f"toy usage for {repo}", ""],
)
TOY = Kind(
    "toy-tag",
    layout=registry.TAG_TEXT,
    head=registry.REWARD_TOKENS,
    trainable=True,
    causal_lm=True,
    default_tag="<step>",
    architectures=("ToyForStepReward",),
    card=TOY_CARD,
)


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(KINDS, TOY.name, TOY)
    return TOY


class WordTokenizer:
    """A whitespace tokenizer: enough for a kind's encoder."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.unk_token_id = None
        self.all_special_tokens: list[str] = []

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [self.encode(t) for t in texts]}

    def __len__(self):
        return 1000


def test_a_new_kind_is_a_config_choice_and_is_detected(toy_kind):
    from prmkit.config.load import load_config
    from prmkit.kinds.spec import KindSettings, detect_kind

    cfg = load_config(None, ["model.kind=toy-tag", "train.kind=toy-tag"])
    assert (cfg.model.kind, cfg.train.kind) == ("toy-tag", "toy-tag")
    with pytest.raises(ConfigError, match="expected one of token-classification, lm-tag, toy-tag, got 'nope'"):
        load_config(None, ["train.kind=nope"])
    assert detect_kind({"architectures": ["ToyForStepReward"]}, None, None, KindSettings(), "m") == "toy-tag"
    assert KindSettings(kind="toy-tag").to_dict() == {
        "kind": "toy-tag",
        "step_tag": "<step>",
        "reward_tokens": ["+", "-"],
    }


def test_a_new_kind_encodes_scores_and_gets_its_card(toy_kind):
    from prmkit.evaluation.evaluate import split_kind
    from prmkit.hub.card import build_card
    from prmkit.kinds.encoder import KindEncoder
    from prmkit.kinds.spec import KindSettings

    tok = WordTokenizer()
    encoder = KindEncoder("toy-tag", tok, KindSettings(kind="toy-tag"), None)
    [row] = encoder.encode([("Q ?", ["a b", "c"])])
    tag = tok.vocab["<step>"]
    assert row.step_positions == [i for i, t in enumerate(row.input_ids) if t == tag] == [4, 6]
    assert encoder.settings.to_dict()["reward_token_ids"] == [tok.vocab["+"], tok.vocab["-"]]
    assert split_kind("runs/prm@toy-tag") == ("runs/prm", "toy-tag")  # eval's MODEL@KIND
    card = build_card("me/toy", {"kind": encoder.settings.to_dict()})
    assert "pipeline_tag: text-generation" in card and "the toy head at `<step>`" in card
    assert "toy usage for me/toy" in card
    assert registry.trained_kind({"kind": "toy-tag"}) is TOY  # push checks it loads as a causal LM


TOY_FORMAT = Format(
    "toy-rows",
    ("question", "moves", "marks"),
    lambda r, o: [{"prompt": r["question"], "completions": r["moves"], "labels": r["marks"]}],
)


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setitem(FORMATS, TOY_FORMAT.name, TOY_FORMAT)
    return TOY_FORMAT


def test_a_new_format_is_a_choice_is_detected_and_converts(toy_format, tmp_path):
    from prmkit.config.load import load_config
    from prmkit.data.sources import read_step_rows
    from prmkit.scoring.source import rows_to_score

    assert load_config(None, ["data.format=toy-rows", "score.format=toy-rows"]).data.format == "toy-rows"
    assert formats.detect_format(["question", "moves", "marks", "id"], "x") == "toy-rows"
    record = {"question": "Q", "moves": ["a", "b"], "marks": [1, 0.25]}
    path = tmp_path / "toy.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "marks": [1, 2]}) + "\n")
    rows, split = read_step_rows(str(path), "auto", Options(), "\n", skip_invalid=True)
    assert (split.format, split.rows_in, split.rows_rejected) == ("toy-rows", 2, 1)
    assert (rows.prompts, rows.completions, rows.labels) == (["Q"], [["a", "b"]], [[1, 0.25]])
    [(line, _, steps)] = rows_to_score("toy-rows", record, "line", 7, Options())
    assert line == {"prompt": "Q", "completions": ["a", "b"], "labels": [1, 0.25], "line": 7} and steps == ["a", "b"]
