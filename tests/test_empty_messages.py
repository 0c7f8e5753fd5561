"""An exception with an empty message still becomes a one-line error (it used to raise IndexError from
``str(e).splitlines()[0]``), and the one dtype resolver keeps both of its uses' contracts."""

from __future__ import annotations

import logging

import pytest
import torch

from prmkit.errors import ConfigError, UsageError, first_line, named_first_line


def test_first_line_helpers_on_empty_and_multiline_messages():
    assert first_line(OSError()) == "OSError"
    assert first_line(ValueError("  \n")) == "ValueError"
    assert first_line(ValueError("bad\nmore")) == "bad"
    assert named_first_line(ImportError()) == "ImportError"
    assert named_first_line(ImportError("no flash_attn\ndetails")) == "ImportError: no flash_attn"


def test_a_tokenizer_error_without_a_message(monkeypatch, tmp_path):
    import transformers

    from prmkit.models.loading import load_tokenizer

    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(UsageError) as info:
        load_tokenizer(str(tmp_path))
    assert str(info.value) == f"tokenizer {str(tmp_path)!r} could not be loaded: OSError"


def test_a_lora_error_without_a_message(monkeypatch):
    import peft

    from prmkit.models import lora

    def fail(model, config):
        raise ValueError("")

    monkeypatch.setattr(peft, "get_peft_model", fail)
    monkeypatch.setattr(lora, "lora_config", lambda *a: None)
    with pytest.raises(ConfigError) as info:
        lora.apply_lora(object(), {"r": 8})
    assert str(info.value) == "train.lora: ValueError"


def test_an_attention_fallback_without_a_message(caplog):
    from prmkit.scoring.loading import load_model

    calls = []

    class Model:
        @classmethod
        def from_pretrained(cls, name, **kwargs):
            calls.append(kwargs.get("attn_implementation"))
            if "attn_implementation" in kwargs:
                raise ImportError()
            return "loaded"

    with caplog.at_level(logging.INFO, logger="prmkit"):
        assert load_model(Model, "m", {}, "flash_attention_2", fall_back=True) == "loaded"
    assert calls == ["flash_attention_2", None]
    assert "flash_attention_2 unavailable for m (ImportError); using padded batches" in caplog.text


def test_one_dtype_resolver_for_training_and_scoring():
    from prmkit.models.loading import resolve_dtype

    assert resolve_dtype("auto") == "auto"  # training: transformers reads the checkpoint's dtype
    assert resolve_dtype(None) == "auto"
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32  # scoring on a CPU: exact and fast
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ConfigError, match=r"^model.dtype: expected auto, float32, bfloat16 or float16, got 'float8'$"):
        resolve_dtype("float8")
    with pytest.raises(ConfigError, match=r"^dtype: "):
        resolve_dtype("int8", torch.device("cpu"), key="dtype")
