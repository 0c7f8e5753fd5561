"""The adapters (TRL, verl, search-and-learn) give the engine's scores, in process and against a served URL, under
the same aggregate and truncation policy as the server."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
from conftest import make_tiny_prm

from prmkit.errors import DataError, UsageError
from prmkit.serve.adapters.backend import connect
from prmkit.serve.adapters.search_and_learn import PRM
from prmkit.serve.adapters.trl import reward_function
from prmkit.serve.adapters.verl import compute_score_fn, dense_scores, step_end_tokens, step_ends

PROBLEM = "Which number is larger, 9.8 or 9.11?"
STEPS = ["11 is greater than 8.", "Hence, 9.11 > 9.8.", "So the answer is 42."]
OTHER = ("Let's call the price of a pencil p.", ["The first equation is 3p + e = 124.", "We check: 6 * 7 = 42."])


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir):
    return make_tiny_prm(tmp_path_factory.mktemp("adapters") / "prm", train_tokenizer_dir, seed=5)


@pytest.fixture(scope="module")
def scorer(prm_dir):
    from prmkit.scoring import StepScorer

    return StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def short(prm_dir, scorer):
    """The same model with room for the first two of STEPS only."""
    from prmkit.scoring import StepScorer

    room = scorer.encode([(PROBLEM, STEPS)])[0].step_positions[1] + 1
    return StepScorer.from_pretrained(prm_dir, dtype="float32", device="cpu", tokenization={"max_length": room})


@pytest.fixture(scope="module")
def url(scorer):
    """A real HTTP server (uvicorn on a thread of this process) serving ``scorer``."""
    pytest.importorskip("fastapi", reason="the serve extra: pip install 'prmkit[serve]'")
    import urllib.request

    import uvicorn

    from prmkit.config.schema import ServeConfig
    from prmkit.serve.app import create_app

    app = create_app(lambda: scorer, replace(ServeConfig(), aggregate="last"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and app.state.prmkit.status == "ready"):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    assert urllib.request.urlopen(address + "/health").status == 200
    yield address
    server.should_exit = True
    thread.join(10)


def test_trl_reward_function_takes_plain_and_conversational_completions(scorer):
    reward = reward_function(scorer)
    assert reward.__name__ == "prmkit_prm"
    plain = reward(
        prompts=[PROBLEM, OTHER[0]],
        completions=["\n".join(STEPS) + "\n", "\n".join(OTHER[1])],
        completion_ids=[[1], [2]],
        trainer_state=None,
    )
    assert plain == [min(scorer.score(PROBLEM, STEPS)), min(scorer.score(*OTHER))]
    chat = reward(
        prompts=[[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBLEM}]],
        completions=[[{"role": "assistant", "content": "\n".join(STEPS)}]],
        completion_ids=[[1]],
    )
    assert chat == plain[:1]
    parts = reward(
        prompts=[[{"role": "user", "content": [{"type": "text", "text": PROBLEM}]}]],
        completions=[[{"role": "assistant", "content": "\n".join(STEPS)}]],
    )
    assert parts == plain[:1]
    assert reward(prompts=[PROBLEM], completions=["\n \n"]) == [0.0]  # no step: no reward
    last = reward_function(scorer, aggregate="last", asynchronous=True)
    assert asyncio.iscoroutinefunction(last)
    assert asyncio.run(last(prompts=[PROBLEM], completions=["\n".join(STEPS)])) == [scorer.score(PROBLEM, STEPS)[-1]]


def test_adapters_follow_the_truncation_policy(short):
    read = short.score(PROBLEM, STEPS)
    assert read[2] is None and None not in read[:2]
    text = "\n".join(STEPS)
    assert reward_function(short)(prompts=[PROBLEM], completions=[text]) == [0.0]
    assert reward_function(short, truncated="read")(prompts=[PROBLEM], completions=[text]) == [min(read[:2])]
    with pytest.raises(DataError, match="cut by the model's max_length after 2 of 3 steps"):
        reward_function(short, truncated="error")(prompts=[PROBLEM], completions=[text])
    split = "\n\n".join(STEPS)
    assert PRM(short).score([PROBLEM], [[split]]) == [[[read[0], read[1], 0.0]]]
    assert PRM(short, truncated="read").score([PROBLEM], [[split]]) == [[read[:2]]]
    with pytest.raises(DataError):
        PRM(short, truncated="error").score([PROBLEM], [[split]])
    answer = asyncio.run(compute_score_fn(short)("gsm8k", text, "42", {"question": PROBLEM}))
    assert answer == {"score": 0.0, "step_scores": read, "truncated": True, "num_steps": 3}


def test_search_and_learn_prm_scores_every_output_of_every_question(scorer):
    prm = PRM(scorer)
    outputs = [["\n\n".join(STEPS), STEPS[0] + "\n\n"], ["\n\n".join(OTHER[1]) + "\n\n", ""]]
    got = prm.score([PROBLEM, OTHER[0]], outputs)
    assert got == [[scorer.score(PROBLEM, STEPS), scorer.score(PROBLEM, STEPS[:1])], [scorer.score(*OTHER), [0.0]]]
    with pytest.raises(ValueError):
        prm.score([PROBLEM], [])


def test_verl_compute_score_and_dense_rewards_at_step_ends(scorer):
    compute_score = compute_score_fn(scorer)
    assert asyncio.iscoroutinefunction(compute_score)
    text = "\n".join(STEPS) + "\n"
    answer = asyncio.run(compute_score("gsm8k", text, "42", extra_info={"question": PROBLEM, "index": 3}))
    want = scorer.score(PROBLEM, STEPS)
    assert answer == {"score": min(want), "step_scores": want, "truncated": False, "num_steps": 3}
    assert asyncio.run(compute_score("gsm8k", "", "42"))["score"] == 0.0
    tok = scorer.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    positions = step_end_tokens(text, ids, tok, "\n")
    ends = step_ends(text, "\n")
    assert ends == [len(STEPS[0]), len(STEPS[0]) + 1 + len(STEPS[1]), len(text) - 1]
    for end, position in zip(ends, positions, strict=True):
        # The token at `position` holds the step's last character, the one before it does not reach it.
        assert len(tok.decode(ids[: position + 1])) >= end > len(tok.decode(ids[:position]))
    row = dense_scores(want, positions, len(ids))
    assert [row[p] for p in positions] == want and sum(x != 0 for x in row) == 3


def test_a_url_scores_as_the_server_does(url, scorer):
    want = scorer.score(PROBLEM, STEPS)
    reward = reward_function(url)
    assert reward.backend.aggregate == "last" and reward.backend.separator == "\n"
    assert reward(prompts=[PROBLEM, PROBLEM], completions=["\n".join(STEPS), " "]) == [want[-1], 0.0]
    assert asyncio.run(reward_function(url, asynchronous=True)(prompts=[PROBLEM], completions=["\n".join(STEPS)])) == [
        want[-1]
    ]
    assert PRM(url).score([PROBLEM], [["\n\n".join(STEPS)]]) == [[want]]
    answer = asyncio.run(compute_score_fn(url)("x", "\n".join(STEPS), None, {"problem": PROBLEM}))
    assert answer["score"] == want[-1] and answer["step_scores"] == want
    with pytest.raises(UsageError, match="server's settings"):
        connect(url, aggregate="min")


def test_an_unreachable_url_is_one_line():
    from prmkit.errors import PrmkitError

    with pytest.raises(PrmkitError, match="cannot reach the server"):
        reward_function("http://127.0.0.1:9")


@pytest.mark.slow
def test_trl_grpo_trainer_runs_two_steps_with_the_reward_function(tmp_path, scorer, train_tokenizer_dir):
    """The adapter passed to TRL 1.13's own GRPOTrainer, on a tiny random policy, for 2 steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    GRPOConfig, GRPOTrainer = _grpo_classes()

    tok = AutoTokenizer.from_pretrained(train_tokenizer_dir)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    seen: list[list[float]] = []
    reward = reward_function(scorer)

    def prmkit_prm(prompts, completions, completion_ids, **kwargs):
        values = reward(prompts, completions, completion_ids, **kwargs)
        seen.append(values)
        return values

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=12,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        bf16=False,
    )
    data = Dataset.from_dict({"prompt": [PROBLEM, OTHER[0], "What is 6 * 7?", "So the answer is 42."]})
    trainer = GRPOTrainer(model=policy, reward_funcs=[prmkit_prm], args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) >= 2
    assert all(len(v) == 2 and all(0.0 <= x <= 1.0 for x in v) for v in seen)
    logged = [h for h in trainer.state.log_history if "rewards/prmkit_prm/mean" in h]
    assert logged and all(0.0 <= h["rewards/prmkit_prm/mean"] <= 1.0 for h in logged)


def _grpo_classes():
    """TRL 1.13's GRPOConfig and GRPOTrainer. Its trainer imports its vLLM client, which imports requests and urllib3
    at module level without declaring them as dependencies. Where they are absent (this project's locked set),
    stand-ins are in sys.modules only while the trainer imports; nothing here uses vLLM, so nothing calls them."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    added = []
    names = {
        "requests": ("requests", "requests.adapters"),
        "urllib3": ("urllib3", "urllib3.util", "urllib3.util.retry"),
    }
    for top, modules in names.items():
        if importlib.util.find_spec(top) is not None:
            continue
        for name in modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            module.HTTPAdapter = module.Retry = module.ConnectionError = type("Unavailable", (Exception,), {})
            sys.modules[name] = module
            added.append(name)
    try:
        from trl import GRPOConfig, GRPOTrainer

        GRPOTrainer.__init__  # noqa: B018 - the lazy module imports the trainer here
        return GRPOConfig, GRPOTrainer
    finally:
        for name in added:
            sys.modules.pop(name, None)
