"""`prmkit push` against a loopback Hub (tests/hub_server.py): no test opens a connection beyond 127.0.0.1.

Most tests run the CLI in-process with ``huggingface_hub.constants.ENDPOINT`` pointed at the loopback server: every
request huggingface_hub makes reads that constant when it is sent, so patching it is reliable even though another
test imported huggingface_hub first. One test runs ``python -m prmkit push`` in a subprocess with ``HF_ENDPOINT`` set
before import, the way a user's shell does it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, git_blob_sha1
from push_fixtures import (  # noqa: F401 - fixtures register by being imported
    FIGURES,
    PUSHED,
    QWEN2_TOKENIZER,
    REPO,
    REPORT,
    TOKEN,
    _assert_one_line_error,
    _front_matter,
    _loopback_only,
    _metadata,
    _save_tiny_model,
    base_model_dir_fixture,
    hub_fixture,
    model_dir_fixture,
    push,
)

from prmkit.evaluation.report import make_report
from prmkit.models.model_dir import build_metadata, write_metadata
from prmkit.tokenization import TokenizationParams, encode_solutions

# ---------------------------------------------------------------------------------------------------------------------
# Pushing


def test_push_uploads_byte_identical_files_in_one_commit_and_repush_is_a_no_op(hub, model_dir):
    result = push(str(model_dir), "--repo-id", REPO, "--license", "apache-2.0", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["no_op"] is False and out["commit_oid"]

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert set(commit["files"]) == PUSHED
    assert commit["deleted"] == [] and commit["revision"] == "main"
    for name in PUSHED - {"README.md", "prmkit.json"}:
        assert commit["files"][name] == (model_dir / name).read_bytes(), name
    # prmkit.json goes up with the local eval file's path reduced to its name; the local copy keeps the path.
    local = json.loads((model_dir / "prmkit.json").read_text())
    assert local["data"]["sources"]["eval"] == "/data/local/processbench.json"
    local["data"]["sources"]["eval"] = "processbench.json"
    assert json.loads(commit["files"]["prmkit.json"]) == local
    assert not hub.repos[REPO].private
    assert sorted(out["skipped"]) == ["checkpoint-10/", "rejects.jsonl", "report.json", "training_args.bin"]

    card = commit["files"]["README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "token-classification"
    assert meta["tags"] == ["prm", "process-reward-model", "reward-model", "prmkit"]
    assert meta["base_model"] == "Qwen/Qwen2-0.5B"
    assert meta["datasets"] == ["trl-lib/math_shepherd"]  # the local eval file is not a Hub dataset
    assert meta["license"] == "apache-2.0"
    results = meta["model-index"][0]["results"]
    assert [(r["dataset"]["split"], r["metrics"][0]["value"]) for r in results] == [("gsm8k", 0.6), ("math", 0.48)]
    assert "**0.540**" in card  # mean first-error F1
    assert "| gsm8k | 0.600 | 0.500 | 0.750 | 0.812 | 0.740 | 0.610 |" in card
    assert '| step_separator | `"\\n"` |' in card  # the separator shown escaped, not as a line break
    assert "| learning_rate | `2e-05` |" in card and "| seed | `42` |" in card
    assert "report_to" not in card and "save_steps" not in card  # how a run logged, not how it trained
    assert "| train loss | 0.61 |" in card and "| seconds | 12.5 |" in card
    assert "(math-shepherd, 1,200 rows, 5,400 steps)" in card
    assert "local file `processbench.json`" in card and "/data/local" not in card
    assert 'StepScorer.from_pretrained("alice/tiny-prm")' in card

    again = push(str(model_dir), "--repo-id", REPO, "--license", "apache-2.0")
    assert again.exit_code == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert len(hub.commits) == 1


def test_push_model_library_call_and_changed_file(hub, model_dir):
    from prmkit.hub import push_model

    first = push_model(model_dir, REPO, license="mit", token=TOKEN)
    assert {f.status for f in first.files} == {"new"} and first.commit_oid
    (model_dir / "prmkit_config.yaml").write_text("model:\n  name_or_path: Qwen/Qwen2-1.5B\n")
    second = push_model(model_dir, REPO, license="mit", token=TOKEN)
    status = {f.path: f.status for f in second.files}
    assert status.pop("prmkit_config.yaml") == "changed"
    assert set(status.values()) == {"unchanged"}
    assert len(hub.commits) == 2 and set(hub.commits[1]["files"]) == {"prmkit_config.yaml"}
    remote = hub.files(REPO)
    assert set(remote) == PUSHED
    assert remote["prmkit_config.yaml"] == (model_dir / "prmkit_config.yaml").read_bytes()


def test_dry_run_lists_files_and_contacts_nothing(hub, model_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no login either
    result = push(str(model_dir), "--repo-id", REPO, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dry_run"] is True
    sizes = {f["path"]: f["size"] for f in out["files"]}
    assert set(sizes) == PUSHED
    for name in PUSHED - {"README.md", "prmkit.json"}:
        assert sizes[name] == (model_dir / name).stat().st_size
    notes = {f["path"]: f["note"] for f in out["files"] if f["note"]}
    assert notes == {"prmkit.json": "local paths made relative"}
    assert out["total_bytes"] == sum(sizes.values())
    assert hub.requests == [] and hub.commits == []

    table = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    assert table.exit_code == 0
    assert "model.safetensors" in table.stdout and "nothing uploaded (dry run)" in table.stdout
    assert hub.requests == []


def test_named_chat_templates_go_up_with_the_tokenizer(hub, model_dir):
    # transformers saves a tokenizer's extra named templates as additional_chat_templates/NAME.jinja and reads them
    # from there: without them a pushed model's apply_chat_template(chat_template="tool_use") fails.
    from transformers import AutoTokenizer

    templates = model_dir / "additional_chat_templates"
    templates.mkdir()
    tool_use = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (templates / "tool_use.jinja").write_text(tool_use)
    (templates / "notes.txt").write_text("not a template")
    result = push(str(model_dir), "--repo-id", REPO, "--json")
    assert result.exit_code == 0, result.stderr
    files = hub.commits[0]["files"]
    assert set(files) == PUSHED | {"additional_chat_templates/tool_use.jinja"}
    assert files["additional_chat_templates/tool_use.jinja"] == tool_use.encode()
    assert "additional_chat_templates/" not in json.loads(result.stdout)["skipped"]
    # What went up loads back with the named template, as transformers reads a repo.
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="tool_use", tokenize=False)
        == "[user] hi\n"
    )


def test_token_never_printed_or_written(hub, model_dir, monkeypatch):
    ok = push(str(model_dir), "--repo-id", REPO, "--token", TOKEN)
    assert ok.exit_code == 0, ok.stderr
    assert "shell history" in ok.stderr  # --token is discouraged
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_" + TOKEN)
    bad = push(str(model_dir), "--repo-id", "alice/other", "--json")
    assert bad.exit_code == 1
    for result in (ok, bad):
        assert TOKEN not in result.output
    for path in model_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for data in hub.files(REPO).values():
        assert TOKEN.encode() not in data


# ---------------------------------------------------------------------------------------------------------------------
# Clean errors


def test_invalid_token_is_a_clean_401(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    result = push(str(model_dir), "--repo-id", REPO)
    _assert_one_line_error(result, "rejected the token", "401")
    assert "hf_not_the_right_one" not in result.output
    assert hub.commits == []


def test_not_logged_in(hub, model_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = push(str(model_dir), "--repo-id", REPO)
    _assert_one_line_error(result, "not logged in")
    assert "hf auth login" in result.stderr
    assert hub.requests == []


def test_no_write_access_is_a_clean_403(hub, model_dir):
    hub.add_repo("bob/prm", private=False)  # readable, not writable by alice
    result = push(str(model_dir), "--repo-id", "bob/prm")
    _assert_one_line_error(result, "no write access to bob/prm", "403")
    assert hub.commits == []


def test_unknown_organisation_and_foreign_namespace(hub, model_dir):
    result = push(str(model_dir), "--repo-id", "no-such-org/prm")
    _assert_one_line_error(result, "'no-such-org' not found")
    hub.existing_orgs.add("globex")
    result = push(str(model_dir), "--repo-id", "globex/prm")
    _assert_one_line_error(result, "no write access to 'globex'", "not a member")
    assert hub.commits == [] and not any(path == "/api/repos/create" for _, path in hub.requests)


def test_existing_repo_with_other_visibility_is_refused(hub, model_dir):
    hub.add_repo("alice/secret", private=True)
    result = push(str(model_dir), "--repo-id", "alice/secret")
    _assert_one_line_error(result, "exists and is private")
    assert "--private" in result.stderr
    assert hub.commits == []
    result = push(str(model_dir), "--repo-id", "alice/secret", "--private")
    assert result.exit_code == 0, result.stderr
    assert len(hub.commits) == 1

    hub.add_repo("acme/open", private=False)
    result = push(str(model_dir), "--repo-id", "acme/open", "--private")
    _assert_one_line_error(result, "exists and is public")


def test_network_unreachable(hub, model_dir, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    result = push(str(model_dir), "--repo-id", REPO)
    _assert_one_line_error(result, "cannot reach the Hub", f"127.0.0.1:{port}")


# ---------------------------------------------------------------------------------------------------------------------
# What is pushed


def test_pickle_weights_refused_unless_allowed(hub, model_dir):
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really weights")
    result = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    _assert_one_line_error(result, "pickle", "pytorch_model.bin", code=2)
    assert "--allow-pickle" in result.stderr
    allowed = push(str(model_dir), "--repo-id", REPO, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.stderr
    assert hub.files(REPO)["pytorch_model.bin"] == (model_dir / "pytorch_model.bin").read_bytes()
    assert "training_args.bin" not in hub.files(REPO)  # Trainer's pickled arguments never go


def test_existing_readme_kept_unless_overwrite_card(hub, model_dir):
    mine = b"---\nlicense: mit\n---\n\n# My own card\n"
    (model_dir / "README.md").write_bytes(mine)
    assert push(str(model_dir), "--repo-id", REPO).exit_code == 0
    assert hub.files(REPO)["README.md"] == mine
    result = push(str(model_dir), "--repo-id", REPO, "--overwrite-card", "--license", "apache-2.0")
    assert result.exit_code == 0, result.stderr
    card = hub.files(REPO)["README.md"].decode()
    assert _front_matter(card)["library_name"] == "transformers" and "# My own card" not in card
    assert (model_dir / "README.md").read_bytes() == mine  # the user's file is not touched
    assert len(hub.commits) == 2 and set(hub.commits[1]["files"]) == {"README.md"}


def test_eval_report_option_and_missing_prmkit_json(hub, model_dir, tmp_path):
    (model_dir / "report.json").unlink()
    (model_dir / "prmkit.json").unlink()
    # A model trained elsewhere (TRL) has neither file; prmkit_config.yaml alone means an unfinished prmkit run.
    (model_dir / "prmkit_config.yaml").unlink(missing_ok=True)
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps(make_report({"runs/tiny": {**FIGURES, "mean_f1": 0.777}})))
    result = push(str(model_dir), "--repo-id", REPO, "--eval-report", str(other))
    assert result.exit_code == 0, result.stderr
    assert "no prmkit.json" in result.stderr  # a warning, not a failure
    card = hub.files(REPO)["README.md"].decode()
    assert "**0.777**" in card and "base_model" not in _front_matter(card)
    missing = push(str(model_dir), "--repo-id", REPO, "--eval-report", str(tmp_path / "nope.json"))
    assert missing.exit_code == 2


def test_stale_shards_are_removed_in_the_same_commit(hub, model_dir):
    hub.add_repo(
        REPO,
        files={
            "model-00001-of-00002.safetensors": b"old",
            "model-00002-of-00002.safetensors": b"old",
            "model.safetensors.index.json": b"{}",
            "adapter_config.json": b"{}",
            "notes.txt": b"keep me",
        },
    )
    result = push(str(model_dir), "--repo-id", REPO, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["deleted"] == [
        "adapter_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert len(hub.commits) == 1
    assert set(hub.files(REPO)) == PUSHED | {"notes.txt"}


def test_revision_branch_and_pull_request(hub, model_dir):
    assert push(str(model_dir), "--repo-id", REPO, "--revision", "v2").exit_code == 0
    assert hub.commits[-1]["revision"] == "v2" and hub.files(REPO, "main") == {}
    result = push(str(model_dir), "--repo-id", REPO, "--create-pr", "--commit-message", "try it", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["pr_url"].endswith("/discussions/1")
    assert hub.commits[-1]["revision"] == "refs/pr/1" and hub.commits[-1]["summary"] == "try it"


def test_settings_from_config_push_section(hub, model_dir, tmp_path):
    cfg = tmp_path / "prmkit.yaml"
    cfg.write_text(f"push:\n  repo_id: {REPO}\n  license: mit\n  private: true\n")
    result = push(str(model_dir), "--config", str(cfg), "--set", "push.commit_message=from config")
    assert result.exit_code == 0, result.stderr
    assert hub.repos[REPO].private and hub.commits[0]["summary"] == "from config"
    assert _front_matter(hub.files(REPO)["README.md"].decode())["license"] == "mit"
    no_repo = push(str(model_dir))
    assert no_repo.exit_code == 2 and "--repo-id" in no_repo.stderr
    bare = push(str(model_dir), "--repo-id", "tiny-prm", "--dry-run")
    assert bare.exit_code == 2 and "namespace/name" in bare.stderr


def test_preflight_refuses_truncated_or_mismatched_weights(hub, model_dir):
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    del state["score.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    _assert_one_line_error(push(str(model_dir), "--repo-id", REPO, "--dry-run"), "missing", "score.weight", code=2)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    _assert_one_line_error(push(str(model_dir), "--repo-id", REPO, "--dry-run"), "truncated or corrupt", code=2)
    weights.unlink()
    _assert_one_line_error(push(str(model_dir), "--repo-id", REPO, "--dry-run"), "no safetensors weights", code=2)
    assert hub.requests == []


def test_weight_check_matches_keys_without_reading_a_tensor(model_dir, monkeypatch):
    """The pre-flight model check builds the model on the meta device (transformers 5.25 kernelizes by default, and
    no kernel takes the meta device: every push failed there). Reading a tensor would make push as slow as the model
    is large, so safetensors' tensor readers are made to fail: the check must not need them."""
    import safetensors

    from prmkit.hub.checks import check_model_loads

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("the weight check read a tensor")

    monkeypatch.setattr(safetensors.safe_open, "get_tensor", no_tensor_reads, raising=False)
    warnings: list[str] = []
    model = check_model_loads(model_dir, warnings)
    params = dict(model.named_parameters())
    assert "score.weight" in params and {p.device.type for p in params.values()} == {"meta"}
    assert warnings == []


@pytest.mark.parametrize("layout", ["adapter", "."], ids=["merged-run-adapter-subdir", "unmerged-run-top-level"])
def test_adapter_push(hub, base_model_dir, tmp_path, layout):
    """train writes the adapter to adapter/ beside merged weights, or at the top when lora_merge is false."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    d = tmp_path / "lora_run"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_model_dir / name, d / name)
    write_metadata(
        d, {**_metadata(), "lora": {"r": 4, "alpha": 8, "merged": layout == "adapter"}, "adapter_dir": layout}
    )
    model = AutoModelForTokenClassification.from_pretrained(base_model_dir)
    lora = get_peft_model(
        model, LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    adapter_dir = d / layout
    lora.save_pretrained(adapter_dir)  # records the local base dir; name a Hub model as a real run would
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({**adapter_config, "base_model_name_or_path": "Qwen/Qwen2-0.5B"})
    )
    if layout == "adapter":
        lora.merge_and_unload().save_pretrained(d)

    if layout == ".":
        assert "[More Information Needed]" in (d / "README.md").read_text()  # PEFT's blank template: replaced
        full = push(str(d), "--repo-id", REPO, "--dry-run")
        _assert_one_line_error(full, "no safetensors weights", code=2)
        assert "--adapter" in full.stderr
    hub.add_repo(REPO, files={"model.safetensors": b"full weights stay: they do not mix with an adapter"})
    result = push(str(d), "--repo-id", REPO, "--adapter", "--license", "apache-2.0", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["mode"] == "adapter" and out["deleted"] == []
    sources = {f["path"]: f["source"] for f in out["files"]}
    assert sources["adapter_model.safetensors"] == str(Path(layout) / "adapter_model.safetensors")
    files = hub.files(REPO)
    assert set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "prmkit.json",
        "README.md",
        "model.safetensors",
    }
    assert files["adapter_model.safetensors"] == (adapter_dir / "adapter_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "Qwen/Qwen2-0.5B"
    assert "AutoPeftModelForTokenClassification.from_pretrained(repo)" in card
    assert "| r | `4` |" in card


def test_card_from_the_briefs_metadata_layout_and_random_init():
    from prmkit.hub import build_card

    meta = build_metadata(
        TokenizationParams(step_separator="\n\n"),
        "Qwen/Qwen2-0.5B",
        data={"train": "trl-lib/prm800k", "eval": "Qwen/ProcessBench:gsm8k", "format": "prm800k"},
        extra={
            "training": {"hyperparameters": {"learning_rate": 1e-4, "num_train_epochs": 3}},
            "lora": {"r": 16, "alpha": 32},
            "model": {"init_from_config": True},
        },
    )
    card = build_card(REPO, meta, license="mit")
    front = _front_matter(card)
    assert front["datasets"] == ["Qwen/ProcessBench", "trl-lib/prm800k"]
    assert "base_model" not in front  # random weights are not a fine-tune of Qwen2-0.5B
    assert "random weights" in card
    assert '| step_separator | `"\\n\\n"` |' in card
    assert "separator = '\\n\\n'" in card  # a Python literal in the snippet
    assert "| learning_rate | `0.0001` |" in card and "| r | `16` |" in card


# ---------------------------------------------------------------------------------------------------------------------
# The card's transformers snippet places labels where training did


def _snippet(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    code = [b for b in blocks if "AutoModelForTokenClassification" in b]
    assert len(code) == 1
    return code[0]


def _run_snippet(card: str, repo_id: str, local_dir: Path) -> dict:
    code = _snippet(card)
    assert f'repo = "{repo_id}"' in code
    code = code.replace(f'repo = "{repo_id}"', f"repo = {str(local_dir)!r}").replace("print(step_scores)", "")
    namespace: dict = {}
    exec(compile(code, "<card snippet>", "exec"), namespace)
    return namespace


def _check_snippet_against_encode_solutions(model_dir: Path, separator: str) -> dict:
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from prmkit.hub import build_card

    card = build_card(REPO, _metadata(separator))
    ns = _run_snippet(card, REPO, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = TokenizationParams(step_separator=separator, max_length=None, max_prompt_length=None)
    [enc] = encode_solutions(tok, [ns["prompt"]], [ns["steps"]], params)
    assert ns["input_ids"] == enc.input_ids
    assert ns["positions"] == enc.step_positions
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([enc.input_ids])).logits[0].softmax(-1)[:, 1]
    assert ns["step_scores"] == pytest.approx(probs[enc.step_positions].tolist(), abs=1e-6)
    return ns


def test_card_snippet_matches_encode_solutions(base_model_dir):
    from transformers import AutoTokenizer

    ns = _check_snippet_against_encode_solutions(base_model_dir, "\n")
    # Why the card warns against joining strings: '.\n' merges into one token and the positions move.
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    joined = tok(ns["prompt"] + "\n" + "\n".join(ns["steps"]) + "\n", add_special_tokens=False)["input_ids"]
    assert [tok.bos_token_id, *joined] != ns["input_ids"]


def test_card_snippet_with_a_multi_token_separator(base_model_dir):
    _check_snippet_against_encode_solutions(base_model_dir, "\n\n## ")


@pytest.mark.slow
@pytest.mark.skipif(not QWEN2_TOKENIZER.exists(), reason=f"needs ../shared ({QWEN2_TOKENIZER} is missing)")
def test_card_snippet_with_qwen2_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    tok.save_pretrained(tmp_path)
    _save_tiny_model(tmp_path, len(tok))
    ns = _check_snippet_against_encode_solutions(tmp_path, "\n")
    assert tok.bos_token_id is None
    assert (
        tok("5.\n", add_special_tokens=False)["input_ids"]
        != tok("5.", add_special_tokens=False)["input_ids"] + tok("\n", add_special_tokens=False)["input_ids"]
    )
    assert len(ns["positions"]) == len(ns["steps"])


# ---------------------------------------------------------------------------------------------------------------------
# The real thing: HF_ENDPOINT set before huggingface_hub is imported, in a fresh process


@pytest.mark.slow
def test_subprocess_with_hf_endpoint(model_dir, tmp_path):
    with HubServer(token=TOKEN, user="alice") as server:
        home = tmp_path / "home"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE", "PRMKIT_DEBUG"))
        }
        env.update(
            HF_ENDPOINT=server.url,
            HF_TOKEN=TOKEN,
            HF_HUB_DISABLE_TELEMETRY="1",
            HOME=str(home),
            HF_HOME=str(home / "hf"),
            XDG_CACHE_HOME=str(home / "cache"),
            NO_PROXY="127.0.0.1,localhost",
        )
        cmd = [sys.executable, "-m", "prmkit", "push", str(model_dir), "--repo-id", REPO, "--license", "mit"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "committed" in proc.stdout and TOKEN not in proc.stdout + proc.stderr
        assert len(server.commits) == 1
        published = {
            p: git_blob_sha1(d) for p, d in server.files(REPO).items() if p not in ("README.md", "prmkit.json")
        }
        assert published == {
            p: git_blob_sha1((model_dir / p).read_bytes()) for p in PUSHED - {"README.md", "prmkit.json"}
        }
        assert b"/data/local" not in server.files(REPO)["prmkit.json"]
        # Every request went to the loopback server; none elsewhere (the process had no other endpoint).
        assert ("GET", "/api/whoami-v2") in server.requests
        home_files = [p for p in home.rglob("*") if p.is_file()]
        assert all(TOKEN.encode() not in p.read_bytes() for p in home_files)


def test_card_says_which_subsets_the_mean_f1_leaves_out():
    from prmkit.hub import build_card

    report = {
        **REPORT,
        "mean_f1": 0.6,
        "mean_f1_subsets": ["gsm8k"],
        "mean_f1_left_out": {"math": "no erroneous samples (label != -1), so the error accuracy is undefined"},
    }
    card = build_card(REPO, _metadata(), report=report)
    assert (
        "Mean first-error F1 (ProcessBench's metric, unweighted over subsets): **0.600** at threshold 0.5.\n"
        "It averages gsm8k only; left out: math (no erroneous samples (label != -1), so the error accuracy is "
        "undefined)."
    ) in card
    assert "It averages" not in build_card(REPO, _metadata(), report=REPORT)
