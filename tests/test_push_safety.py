"""What push must never publish or read: secrets, files outside the model directory, local paths, huge files.

Each test reproduces a defect of issue #10 against the loopback Hub (tests/hub_server.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from push_fixtures import (  # noqa: F401 - fixtures register by being imported
    FIGURES,
    PUSHED,
    REPO,
    TOKEN,
    _assert_one_line_error,
    _loopback_only,
    _metadata,
    base_model_dir_fixture,
    hub_fixture,
    model_dir_fixture,
    push,
)
from typer.testing import CliRunner

from prmkit.cli.app import app
from prmkit.models.model_dir import write_metadata


def _uploaded(hub) -> dict[str, bytes]:
    return hub.files(REPO) if REPO in hub.repos else {}


def _no_leak(hub, *needles: str) -> None:
    for path, data in _uploaded(hub).items():
        for needle in needles:
            assert needle.encode() not in data, (path, needle)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Secrets: redacted where prmkit saves them, and never uploaded


def test_token_in_an_existing_config_is_uploaded_redacted_and_said(hub, model_dir):
    # prmkit_config.yaml as `train --set train.hub_token=...` wrote it before redaction, plus other secret spellings
    # and credentials inside URLs.
    (model_dir / "prmkit_config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "Qwen/Qwen2-0.5B"},
                "data": {"train": "https://bob:s3cretPass@data.example.com/train.jsonl?token=qwertyuiop&split=train"},
                "train": {
                    "hub_token": TOKEN,
                    "wandb_api_key": "wandbKey123456",
                    "db_password": "hunter2hunter2",
                    "learning_rate": 1e-5,
                    "batch_tokens": 2048,
                },
            }
        )
    )
    result = push(str(model_dir), "--repo-id", REPO, "--license", "mit", "--json")
    assert result.exit_code == 0, result.stderr
    assert "uploading it redacted" in result.stderr and "train.hub_token" in result.stderr
    published = yaml.safe_load(_uploaded(hub)["prmkit_config.yaml"])
    assert published["train"] == {
        "hub_token": "***",
        "wandb_api_key": "***",
        "db_password": "***",
        "learning_rate": 1e-5,
        "batch_tokens": 2048,
    }
    assert published["data"]["train"] == "https://***@data.example.com/train.jsonl?token=***&split=train"
    _no_leak(hub, TOKEN, "s3cretPass", "qwertyuiop", "wandbKey123456", "hunter2hunter2")
    assert TOKEN not in result.output and "hunter2hunter2" not in result.output
    files = {f["path"]: f for f in json.loads(result.stdout)["files"]}
    assert "secrets redacted" in files["prmkit_config.yaml"]["note"]


@pytest.mark.parametrize("where", ["tokenizer_config.json", "README.md", "model.safetensors", "chat_template.jinja"])
def test_a_file_holding_the_token_in_use_is_refused_by_name(hub, model_dir, where, monkeypatch):
    path = model_dir / where
    if where == "model.safetensors":
        from safetensors.torch import load_file, save_file

        save_file(load_file(path), path, metadata={"format": "pt", "note": f"pushed with {TOKEN}"})
    elif where == "tokenizer_config.json":
        cfg = json.loads(path.read_text())
        path.write_text(json.dumps({**cfg, "auth": TOKEN}))
    else:
        path.write_text("x" * (3 << 20) + f" {TOKEN} ")  # past the first chunk: the scan reads it all, in pieces
    # --token is the token in use, even when HF_TOKEN names another.
    monkeypatch.setenv("HF_TOKEN", "hf_SomeOtherToken000000000")
    result = push(str(model_dir), "--repo-id", REPO, "--token", TOKEN)
    _assert_one_line_error(result, where, "your Hub token", code=2)
    assert TOKEN not in result.output
    assert hub.commits == []
    dry = push(str(model_dir), "--repo-id", REPO, "--dry-run", "--token", TOKEN)  # a dry run says so too
    _assert_one_line_error(dry, where, code=2)


def test_redact_unit_values():
    from prmkit.core.redact import is_secret_key, mask, redact

    for key in (
        "hub_token",
        "token",
        "HF_TOKEN",
        "accessToken",
        "push_to_hub_token",
        "password",
        "db_passwd",
        "client_secret",
        "api_key",
        "apiKey",
        "aws_secret_access_key",
        "private_key",
        "use_auth_token",
    ):
        assert is_secret_key(key), key
    for key in (
        "tokenizer",
        "tokenization",
        "pad_token",
        "bos_token_id",
        "additional_special_tokens",
        "author",
        "cache_key",
        "step_separator",
        "max_length",
        "reward_tokens",
        "tokens_per_second",
    ):
        assert not is_secret_key(key), key
    assert mask("git+https://x-access-token:ghp_abc@github.com/o/r") == "git+https://***@github.com/o/r"
    assert (
        mask("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=def&v=1")
        == "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***&v=1"
    )
    assert mask("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert mask("export HF_TOKEN=hf_" + "a1" * 17) == "export HF_TOKEN=***"
    assert (
        mask("see https://huggingface.co/alice/prm?revision=main")
        == "see https://huggingface.co/alice/prm?revision=main"
    )
    # Counts, flags and null under secret-sounding keys stay; strings and structures under them go.
    assert redact(
        {
            "batch_tokens": 2048,
            "use_auth_token": True,
            "hub_token": None,
            "token": "tokvalue-9f8e7d",
            "credentials": {"user": "bob", "key": "k3y-k3y-k3y"},
            "pad_token": "<pad>",
            "reward_tokens": ["+", "-"],
        }
    ) == {
        "batch_tokens": 2048,
        "use_auth_token": True,
        "hub_token": None,
        "token": "***",
        "credentials": {"user": "***", "key": "***"},
        "pad_token": "<pad>",
        "reward_tokens": ["+", "-"],
    }
    assert mask("later: tokvalue-9f8e7d and k3y-k3y-k3y") == "later: *** and ***"  # redacted values are remembered


def test_every_saved_config_and_metadata_is_redacted(tmp_path):
    """prmkit_config.yaml (dump_config), prmkit.json (write_metadata), report.json and score state are redacted."""
    from prmkit.config.load import dump_config, load_config
    from prmkit.evaluation.report import make_report
    from prmkit.evaluation.write import write_report
    from prmkit.scoring.resume import write_state
    from prmkit.training.run_dir import run_identity

    url = "https://bob:pAssw0rd99@example.com/train.jsonl"
    cfg = load_config(None, ["train.hub_token=hf_SavedSecretToken12345", f"data.train={url}"])
    text = dump_config(cfg)
    saved = yaml.safe_load(text)
    assert saved["train"]["hub_token"] == "***"
    assert saved["data"]["train"] == "https://***@example.com/train.jsonl"
    assert "SavedSecret" not in text and "pAssw0rd99" not in text
    # A saved (redacted) run is still the same run as the one that wrote it.
    assert run_identity(cfg.to_dict()) == run_identity(saved)

    write_metadata(
        tmp_path,
        {
            "base_model": url,
            "training": {"hub_token": "hf_SavedSecretToken12345"},
            "notes": {"api_secret": "topsecretvalue"},
        },
    )
    write_report(make_report({url: {**FIGURES, "model": url}}), tmp_path / "eval", plots=False)
    write_state(tmp_path / "state.json", {"input_spec": url + "?sig=abcdef", "model": {"name": url}})
    for path in (
        tmp_path / "prmkit.json",
        tmp_path / "eval" / "report.json",
        tmp_path / "eval" / "report.md",
        tmp_path / "state.json",
    ):
        data = path.read_text()
        assert "pAssw0rd99" not in data and "SavedSecret" not in data and "abcdef" not in data, path
        assert "topsecretvalue" not in data, path
        assert "https://***@example.com/train.jsonl" in data, path


def test_prepare_metadata_and_rejects_mask_credentials_in_a_source_name(tmp_path, tiny_tokenizer_dir):
    # A download directory named after a signed URL keeps its query: the name is a credential like any other.
    src = tmp_path / "dl?token=SeCrEtSiGnAtUrE1234" / "rows.jsonl"
    src.parent.mkdir()
    rows = [
        {"prompt": "2 + 3?", "completions": ["2 + 3 = 5.", "So 5."], "labels": [True, True]},
        {"prompt": "bad row", "completions": ["one step"], "labels": []},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            "--train",
            str(src),
            "--tokenizer",
            str(tiny_tokenizer_dir),
            "-o",
            str(tmp_path / "prepared"),
            "--skip-invalid",
        ],
    )
    assert result.exit_code == 0, result.output
    written = [tmp_path / "prepared" / name for name in ("prmkit_dataset.json", "rejects.jsonl")]
    for path in written:
        text = path.read_text()
        assert "SeCrEtSiGnAtUrE1234" not in text and "token=***" in text, path
    assert "SeCrEtSiGnAtUrE1234" not in result.output


def test_config_show_masks_secrets():
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "--set", "train.hub_token=hf_ShownSecret987654321"])
    as_json = runner.invoke(app, ["config", "show", "--json", "--set", "train.hub_token=hf_ShownSecret987654321"])
    for result in (shown, as_json):
        assert result.exit_code == 0, result.output
        assert "ShownSecret" not in result.output and "***" in result.output
    assert json.loads(as_json.stdout)["train"]["hub_token"] == "***"


# ---------------------------------------------------------------------------------------------------------------------
# 2. Links out of the model directory


@pytest.mark.parametrize("link", ["README.md", "chat_template.jinja", "prmkit.json", "tokenizer_config.json"])
def test_a_link_out_of_the_model_dir_is_refused_by_name(hub, model_dir, tmp_path, link):
    outside = tmp_path / "id_rsa"
    outside.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot for the Hub\n")
    (model_dir / link).unlink(missing_ok=True)
    (model_dir / link).symlink_to(outside)
    for args in (["--dry-run"], []):
        result = push(str(model_dir), "--repo-id", REPO, *args)
        line = _assert_one_line_error(result, "outside the model directory", f"{link} -> {outside}", code=2)
        assert "PRIVATE KEY" not in result.output, line
    assert hub.commits == []


def test_linked_directories_out_of_the_model_dir_are_refused(hub, base_model_dir, model_dir, tmp_path):
    # An adapter directory that is a link to elsewhere, named by prmkit.json's adapter_dir or found as adapter/.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (elsewhere / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (model_dir / "adapter").symlink_to(elsewhere, target_is_directory=True)
    result = push(str(model_dir), "--repo-id", REPO, "--adapter", "--dry-run")
    _assert_one_line_error(result, "outside the model directory", "adapter/adapter_config.json", code=2)
    (model_dir / "adapter").unlink()
    write_metadata(model_dir, {**_metadata(), "adapter_dir": str(elsewhere)})
    result = push(str(model_dir), "--repo-id", REPO, "--adapter", "--dry-run")
    _assert_one_line_error(result, "outside the model directory", str(elsewhere / "adapter_config.json"), code=2)
    # A directory transformers reads while checking the tokenizer, and whose templates go up with it.
    write_metadata(model_dir, _metadata())
    (model_dir / "additional_chat_templates").symlink_to(elsewhere, target_is_directory=True)
    result = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    _assert_one_line_error(result, "outside the model directory", "additional_chat_templates", code=2)
    # The eval report quoted in the card by default.
    (model_dir / "additional_chat_templates").unlink()
    (model_dir / "report.json").unlink()
    (model_dir / "report.json").symlink_to(base_model_dir / "report.json")
    result = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    _assert_one_line_error(result, "report.json", "outside the model directory", code=2)
    assert hub.requests == []


def test_links_inside_the_model_dir_are_fine_and_the_dry_run_shows_the_real_file(hub, model_dir, tmp_path):
    (model_dir / "docs").mkdir()
    card = "---\nlicense: mit\n---\n\n# Linked card\n"
    (model_dir / "docs" / "card.md").write_text(card)
    (model_dir / "README.md").symlink_to(Path("docs") / "card.md")
    # A hard link is a file of the directory like any other, wherever its other names are.
    shared = tmp_path / "shared-tokenizer.json"
    (model_dir / "tokenizer.json").rename(shared)
    os.link(shared, model_dir / "tokenizer.json")
    dry = push(str(model_dir), "--repo-id", REPO, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    sources = {f["path"]: f["source"] for f in json.loads(dry.stdout)["files"]}
    assert sources["README.md"] == "docs/card.md" and sources["model.safetensors"] == "model.safetensors"
    table = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    assert "docs/card.md" in table.stdout
    result = push(str(model_dir), "--repo-id", REPO)
    assert result.exit_code == 0, result.stderr
    assert _uploaded(hub)["README.md"] == card.encode()
    assert _uploaded(hub)["tokenizer.json"] == shared.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# 3. The token in printed output and in --debug tracebacks


def _env(server: HubServer, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE", "PRMKIT_DEBUG"))
    }
    env.update(
        HF_ENDPOINT=server.url,
        HF_HUB_DISABLE_TELEMETRY="1",
        HOME=str(home),
        HF_HOME=str(home / "hf"),
        XDG_CACHE_HOME=str(home / "cache"),
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


@pytest.mark.slow
def test_token_masked_in_debug_traceback(model_dir, tmp_path):
    """The Hub quotes the token back in its error; --debug shows the traceback, with the token masked."""
    with HubServer(token=TOKEN, user="alice") as server:
        server.canned["/api/whoami-v2"] = (500, {"error": f"internal error while checking token {TOKEN}"})
        cmd = [sys.executable, "-m", "prmkit", "--debug", "push", str(model_dir), "--repo-id", REPO, "--token", TOKEN]
        proc = subprocess.run(cmd, env=_env(server, tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "the Hub failed (500)" in proc.stderr, proc.stderr[-2000:]
    assert TOKEN not in proc.stdout + proc.stderr
    assert "checking token ***" in proc.stderr


def test_token_masked_in_one_line_errors_and_warnings(hub, model_dir):
    hub.canned["/api/whoami-v2"] = (403, {"error": f"token {TOKEN} lacks a scope"})
    result = push(str(model_dir), "--repo-id", REPO)
    line = _assert_one_line_error(result, "403")
    assert TOKEN not in result.output and "***" in line


# ---------------------------------------------------------------------------------------------------------------------
# 4. Local paths stay local


def test_published_metadata_carries_no_local_paths(hub, model_dir):
    root = str(model_dir.resolve())
    meta = _metadata("/")  # a separator that looks like a path is left alone
    meta["base_model"] = "/home/alice/models/qwen2-base"
    meta["tokenizer"] = {"name_or_path": "/home/alice/models/qwen2-base", "class": "Qwen2Tokenizer"}
    meta["data"]["sources"] = {"train": "/home/alice/data/train.jsonl", "eval": "trl-lib/math_shepherd"}
    meta["data"]["splits"]["train"]["source"] = "~/data/train.jsonl"
    meta["training"]["deepspeed"] = "C:\\Users\\alice\\ds.json"
    meta["adapter_dir"] = f"{root}/adapter"
    write_metadata(model_dir, meta)
    (model_dir / "prmkit_config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "/home/alice/models/qwen2-base", "tokenizer": "../tok"},
                "data": {
                    "train": "/home/alice/data/train.jsonl",
                    "eval": ["a.jsonl", "/srv/b.json"],
                    "step_separator": "/",
                    "cache_dir": "/home/alice/.cache/prmkit",
                },
                "train": {"output_dir": root, "logging_dir": f"{root}/logs", "learning_rate": 1e-5},
            },
            sort_keys=False,
        )
    )
    local = {name: (model_dir / name).read_bytes() for name in ("prmkit.json", "prmkit_config.yaml")}
    result = push(str(model_dir), "--repo-id", REPO, "--license", "mit")
    assert result.exit_code == 0, result.stderr
    files = _uploaded(hub)
    _no_leak(hub, "/home/alice", root, "C:\\\\Users", "~/data")
    published = json.loads(files["prmkit.json"])
    assert published["base_model"] == "qwen2-base" and published["tokenizer"]["name_or_path"] == "qwen2-base"
    assert published["data"]["sources"] == {"train": "train.jsonl", "eval": "trl-lib/math_shepherd"}
    assert published["data"]["splits"]["train"]["source"] == "train.jsonl"
    assert published["training"]["deepspeed"] == "ds.json" and published["adapter_dir"] == "adapter"
    assert published["tokenization"]["step_separator"] == "/"
    config = yaml.safe_load(files["prmkit_config.yaml"])
    assert config["model"] == {"name_or_path": "qwen2-base", "tokenizer": "tok"}
    assert config["data"] == {
        "train": "train.jsonl",
        "eval": ["a.jsonl", "b.json"],
        "step_separator": "/",
        "cache_dir": "prmkit",
    }
    assert config["train"] == {"output_dir": ".", "logging_dir": "logs", "learning_rate": 1e-5}
    assert "local model `qwen2-base`" in files["README.md"].decode()
    # The model directory keeps the full paths: score, eval and LoRA loading use them here.
    assert {name: (model_dir / name).read_bytes() for name in local} == local


def test_adapter_config_base_path_is_published_as_a_name(hub, base_model_dir, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    d = tmp_path / "lora_run"
    model = AutoModelForTokenClassification.from_pretrained(base_model_dir)
    lora = get_peft_model(model, LoraConfig(task_type=TaskType.TOKEN_CLS, r=2, lora_alpha=4, target_modules=["q_proj"]))
    lora.save_pretrained(d)  # records base_model_name_or_path as the absolute local directory
    for name in ("tokenizer.json", "tokenizer_config.json", "prmkit.json"):
        (d / name).write_bytes((base_model_dir / name).read_bytes())
    assert str(base_model_dir) in (d / "adapter_config.json").read_text()
    result = push(str(d), "--repo-id", REPO, "--adapter", "--license", "mit")
    assert result.exit_code == 0, result.stderr
    published = json.loads(_uploaded(hub)["adapter_config.json"])
    assert published["base_model_name_or_path"] == base_model_dir.name
    _no_leak(hub, str(base_model_dir), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# 13. Huge files are refused before they are read


def test_huge_readme_is_refused_without_reading_it(hub, model_dir):
    readme = model_dir / "README.md"
    with open(readme, "wb") as fh:  # sparse: 256 MB on paper, nothing on disk
        fh.truncate(256 << 20)
    import tracemalloc

    tracemalloc.start()
    result = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    _assert_one_line_error(result, "README.md", "256.0 MB", "too large for a model card", code=2)
    assert "--overwrite-card" in result.stderr
    assert peak < 64 << 20, peak
    ok = push(str(model_dir), "--repo-id", REPO, "--overwrite-card")  # the generated card needs none of it
    assert ok.exit_code == 0, ok.stderr
    assert len(_uploaded(hub)["README.md"]) < 100_000


def test_huge_metadata_file_is_refused(hub, model_dir):
    with open(model_dir / "prmkit.json", "wb") as fh:
        fh.truncate(64 << 20)
    result = push(str(model_dir), "--repo-id", REPO, "--dry-run")
    _assert_one_line_error(result, "prmkit.json", "too large", code=2)


# ---------------------------------------------------------------------------------------------------------------------
# 9 (the Hub part). An answer that is not the Hub's


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/api/whoami-v2", "<html><body>Proxy login required</body></html>", "is not JSON"),
        (f"/api/models/{REPO}", "<html>maintenance</html>", "is not JSON"),
        (f"/api/models/{REPO}", {"unexpected": True}, "is not what the Hub sends"),
        ("/api/whoami-v2", ["not", "an", "account"], "not an account"),
    ],
)
def test_a_response_that_is_not_the_hubs_is_one_line(hub, model_dir, path, body, needle):
    hub.add_repo(REPO)
    hub.canned[path] = (200, body)
    result = push(str(model_dir), "--repo-id", REPO)
    _assert_one_line_error(result, needle, code=1)
    assert "hint:" in result.stderr and "HF_ENDPOINT" in result.stderr
    assert hub.commits == []
