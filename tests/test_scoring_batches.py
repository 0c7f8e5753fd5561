"""Batches, packing, out-of-memory splits and timings: the engine's GPU logic, checked on a CPU.

In float32 on a CPU a row's scores are the same bits whatever batch it lands in: the budget, an out-of-memory split and
a resumed run change nothing. Packed rows read by the varlen attention function (on a CPU, one
scaled_dot_product_attention per sequence) and by FlexAttention agree with padded batches within float32 rounding.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_prm
from test_scoring import prmkit_log

from prmkit.errors import PrmkitError
from prmkit.scoring import StepScorer, attention, score_file
from prmkit.scoring.engine import PAD_MULTIPLE, padded_width
from prmkit.scoring.timings import STAGES, Timings, process_age

WORDS = [
    "apples",
    "pears",
    "plus",
    "minus",
    "equals",
    "twice",
    "half",
    "total",
    "left",
    "each",
    "so",
    "then",
    "we",
    "have",
    "the",
    "answer",
    "is",
]


def solutions(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Distinct solutions of 5 to about 150 tokens, so batches differ in width and count."""
    rng = random.Random(seed)
    return [
        (
            f"Q{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 50))) + "?",
            [
                f"{rng.randint(0, 99)} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 20))) + "."
                for _ in range(rng.randint(1, 5))
            ],
        )
        for i in range(n)
    ]


ITEMS = solutions(30)


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, train_tokenizer_dir) -> Path:
    return make_tiny_prm(tmp_path_factory.mktemp("batches") / "prm", train_tokenizer_dir, seed=11)


@pytest.fixture(scope="module")
def scorer(prm_dir) -> StepScorer:
    return StepScorer.from_pretrained(prm_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(scorer) -> list[list[float | None]]:
    return scorer.score_batch(ITEMS)


def like(scorer: StepScorer, **kwargs) -> StepScorer:
    return StepScorer(scorer.model, scorer.tokenizer, scorer.params, **kwargs)


def test_padded_width_depends_on_the_row_alone():
    assert [padded_width(n) for n in (1, 15, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, 48]
    assert PAD_MULTIPLE == 16


def test_scores_are_the_same_bits_whatever_the_budget(scorer, reference):
    widths = {padded_width(len(e.input_ids)) for e in scorer.encode(ITEMS)}
    assert len(widths) > 3  # rows of several widths, so budgets really cut different batches
    for budget in (1, 300, 100_000):
        assert like(scorer, batch_tokens=budget).score_batch(ITEMS) == reference, budget


def inject_out_of_memory(monkeypatch, model, above: int, error=None) -> list[tuple[int, int]]:
    """Make the model's forward pass fail like a full GPU on batches of more than ``above`` tokens; returns the
    (rows, width) of every batch that went through."""
    real = model.forward
    shapes: list[tuple[int, int]] = []

    def forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        if ids.numel() > above:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        shapes.append(tuple(ids.shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return shapes


def test_an_out_of_memory_batch_is_split_and_retried_with_the_same_scores(monkeypatch, scorer, reference):
    wide = like(scorer, batch_tokens=100_000)  # the whole window in a few batches, one per width
    n_seqs = len(wide._plan(wide._sequences(ITEMS)[1]))
    assert n_seqs < len(ITEMS)
    shapes = inject_out_of_memory(monkeypatch, scorer.model, above=400)
    with prmkit_log() as records:
        got = wide.score_batch(ITEMS)
    assert got == reference  # the same bits: every row keeps its width, only the number of rows changed
    assert sum(rows for rows, _ in shapes) == len(ITEMS)  # each solution scored once: none lost, none twice
    assert all(rows * width <= 400 for rows, width in shapes)
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert warnings and all("out of cpu memory on a batch of" in w and "two halves" in w for w in warnings)
    assert wide.batch_tokens < 100_000  # later batches start smaller instead of failing the same way


def test_a_lone_sequence_that_does_not_fit_is_a_clear_error(monkeypatch, scorer):
    inject_out_of_memory(monkeypatch, scorer.model, above=0)
    with pytest.raises(PrmkitError, match=r"out of cpu memory scoring a single sequence of \d+ tokens"):
        like(scorer, batch_tokens=100_000).score_batch(ITEMS[:3])


def test_other_errors_and_other_out_of_memory_spellings(monkeypatch, scorer, reference):
    # MPS and older torch raise a RuntimeError that says so: split and retried as well.
    inject_out_of_memory(monkeypatch, scorer.model, above=300, error=RuntimeError("MPS backend out of memory"))
    assert like(scorer, batch_tokens=100_000).score_batch(ITEMS) == reference
    monkeypatch.undo()
    # Any other error is not a memory problem: it goes through unchanged, on the first attempt.
    shapes = inject_out_of_memory(monkeypatch, scorer.model, above=0, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        like(scorer, batch_tokens=100_000).score_batch(ITEMS)
    assert shapes == []


def write_rows(path: Path, items) -> Path:
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": p, "completions": s}) + "\n" for i, (p, s) in enumerate(items)),
        encoding="utf-8",
    )
    return path


def test_a_file_job_with_out_of_memory_splits_writes_the_same_bytes(monkeypatch, tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl", solutions(60, seed=5))
    score_file(like(scorer, batch_tokens=4096), str(src), str(tmp_path / "plain.jsonl"), sort_window=25)
    inject_out_of_memory(monkeypatch, scorer.model, above=500)
    with prmkit_log() as records:
        summary = score_file(like(scorer, batch_tokens=4096), str(src), str(tmp_path / "split.jsonl"), sort_window=25)
    assert any("two halves" in r.getMessage() for r in records)
    assert summary.counts.rows_out == 60
    assert (tmp_path / "split.jsonl").read_bytes() == (tmp_path / "plain.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# Packing


def test_packed_inputs_mark_every_sequence():
    kwargs = attention.packed_inputs([3, 5, 2], "varlen")
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 3, 8, 10]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 5
    # A mask built by transformers from position_ids needs nothing else.
    assert set(attention.packed_inputs([3, 5], "flex")) == {"position_ids"}


@pytest.fixture(scope="module")
def varlen_scorer(prm_dir) -> StepScorer:
    return StepScorer.from_pretrained(prm_dir, device="cpu", dtype="float32", attn_implementation=attention.VARLEN)


def test_packed_varlen_scores_equal_padded_ones(varlen_scorer, reference):
    assert (varlen_scorer.kernel, varlen_scorer.packing) == ("varlen", True)
    packed = varlen_scorer.score_batch(ITEMS)
    diffs = [abs(a - b) for x, y in zip(packed, reference) for a, b in zip(x, y)]
    assert len(diffs) == sum(len(s) for _, s in ITEMS) and max(diffs) < 1e-6
    # Packed rows too are the same bits whatever the budget: each sequence's attention covers it alone.
    for budget in (1, 100_000):
        assert like(varlen_scorer, batch_tokens=budget).score_batch(ITEMS) == packed, budget
    # The varlen function reads packed rows only.
    with pytest.raises(Exception, match="packed"):
        like(varlen_scorer, packing=False)


@pytest.mark.slow
def test_packed_flex_attention_scores_equal_padded_ones(prm_dir, reference):
    # FlexAttention compiles its kernel at the first batch (tens of seconds on two cores): one batch only.
    flex = StepScorer.from_pretrained(
        prm_dir, device="cpu", dtype="float32", attn_implementation="flex_attention", batch_tokens=100_000, packing=True
    )
    assert flex.kernel == "flex"
    got = flex.score_batch(ITEMS[:12])
    diffs = [abs(a - b) for x, y in zip(got, reference[:12]) for a, b in zip(x, y)]
    assert len(diffs) == sum(len(s) for _, s in ITEMS[:12]) and max(diffs) < 1e-5


def fake_varlen(signature: str):
    """torch's varlen_attn as each release spelled it, computed per sequence so the result can be checked."""
    import torch.nn.functional as F

    calls = []

    def compute(q, k, v, cu, causal, scale=None, gqa=False):
        if k.shape[1] != q.shape[1]:
            assert gqa, "grouped-query attention needs enable_gqa or repeated heads"
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for s, e in itertools.pairwise(bounds):
            qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa
            ).transpose(0, 1)
        return out

    if signature == "2.10":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            calls.append({"is_causal": is_causal})
            return compute(query, key, value, cu_seq_q, is_causal)
    elif signature == "2.11":

        def varlen_attn(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
        ):
            calls.append({"window_size": window_size, "scale": scale})
            return compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)
    else:

        def varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
            seqused_k=None,
            block_table=None,
            num_splits=None,
        ):
            calls.append({"window_size": window_size, "scale": scale, "enable_gqa": enable_gqa})
            return compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale, enable_gqa)

    return varlen_attn, calls


@pytest.mark.parametrize("signature", ["2.10", "2.11", "2.12"])
def test_torch_varlen_is_called_the_way_each_torch_release_spells_it(signature):
    varlen, calls = fake_varlen(signature)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 8, generator=gen)
    k, v = torch.randn(10, 2, 8, generator=gen), torch.randn(10, 2, 8, generator=gen)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    for scaling in (8**-0.5, 0.2):  # the default scale, and one only a scale argument (or scaled q) gives
        got = attention._torch_varlen_call(varlen, q, k, v, cu, 5, scaling)
        want = attention._per_sequence(q, k, v, cu, scaling)
        assert torch.allclose(got, want, atol=1e-6), (signature, scaling)
    assert len(calls) == 2
    if signature == "2.10":
        assert calls[0] == {"is_causal": True}
    else:
        assert calls[0]["window_size"] == (-1, 0) and calls[1]["scale"] == 0.2
    if signature == "2.12":
        assert calls[0]["enable_gqa"] is True


def test_torch_varlen_is_checked_before_it_is_trusted():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    # The kernel as torch 2.12 spells it passes; checked on the CPU in float32 here (half precision on a GPU).
    assert attention.probe_torch_varlen(cfg, "float32", "cpu", fake_varlen("2.12")[0]) is None

    def not_causal(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
    ):
        return fake_varlen("2.12")[0](
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, enable_gqa=enable_gqa
        )  # ignores the causal window

    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    assert "relative error" in attention.probe_torch_varlen(cfg, "float32", "cpu", not_causal)
    assert attention.probe_torch_varlen(cfg, "float32", "cpu", broken) == (
        "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    )


def test_the_packing_kernel_is_chosen_by_what_is_installed(monkeypatch):
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    have = {"flash": True, "varlen": True, "flex": True}
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: have["flash"])
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: have["varlen"])
    monkeypatch.setattr(attention, "flex_available", lambda: have["flex"])
    monkeypatch.setattr(attention, "register_varlen_attention", lambda: None)
    monkeypatch.setattr(attention, "probe_torch_varlen", lambda config, dtype: None)
    choose = attention.choose_attention
    assert choose("cuda", "bfloat16", True, cfg) == "flash_attention_2"
    assert choose("cpu", "float32", True, cfg) is None  # a CPU keeps padded batches
    assert choose("cuda", "bfloat16", False, cfg) is None  # a bidirectional model is never packed
    have["flash"] = False
    assert choose("cuda", "bfloat16", True, cfg) == attention.VARLEN
    assert choose("cuda", "float32", True, cfg) == "flex_attention"  # flash kernels take half precision only
    sliding = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=0,
    )
    assert choose("cuda", "bfloat16", True, sliding) == "flex_attention"
    # A varlen kernel that fails its check on this machine is not used.
    monkeypatch.setattr(attention, "probe_torch_varlen", lambda config, dtype: "RuntimeError: no kernel image")
    with prmkit_log() as records:
        assert choose("cuda", "bfloat16", True, cfg) == "flex_attention"
    assert any("failed a check (RuntimeError: no kernel image)" in r.getMessage() for r in records)
    have["varlen"] = have["flex"] = False
    assert choose("cuda", "bfloat16", True, cfg) is None


# ---------------------------------------------------------------------------------------------------------------------
# Timings


def test_timings_add_up_and_refuse_unknown_stages():
    t = Timings(origin=time.perf_counter() - 10.0)
    t.add("forward", 4.0)
    with t.stage("write"):
        time.sleep(0.01)
    d = t.to_dict()
    assert list(d) == ["startup", *STAGES]
    assert d["forward"] == 4.0 and d["write"] >= 0.01
    assert sum(d.values()) == pytest.approx(10.0, abs=0.05)
    with pytest.raises(ValueError, match="unknown stage"):
        t.add("lunch", 1.0)
    age = process_age()
    assert age is None or 0 < age < 24 * 3600


@pytest.mark.slow
def test_the_json_summary_says_where_the_time_went(tmp_path, prm_dir):
    src = write_rows(tmp_path / "in.jsonl", solutions(30, seed=2))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prmkit", "score", str(prm_dir), str(src), "-o", str(tmp_path / "out.jsonl"), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    timings = summary["timings"]
    assert list(timings) == ["startup", "model_load", "tokenize", "forward", "write"]
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert timings["forward"] > 0 and timings["model_load"] > 0 and timings["startup"] > 0.2  # imports at least
    # From the process's start to the summary: all of the wall time but the exit.
    total = sum(timings.values())
    assert total <= wall + 0.05
    assert wall - total < max(3.0, 0.25 * wall), (wall, timings)
    # The engine's own seconds hold the tokenizing, forward passes and writing, and little else.
    engine = timings["tokenize"] + timings["forward"] + timings["write"]
    assert engine <= summary["seconds"] + 0.01


def test_the_tokenizer_loads_in_a_thread_while_the_weights_load(monkeypatch, prm_dir, scorer, reference):
    # On CUDA only by default; here the CPU takes the same path.
    import threading

    import prmkit.models.loading
    from prmkit.scoring import engine
    from prmkit.tokenization import tokenizer_fingerprint

    loaded_in = []
    real = prmkit.models.loading.load_tokenizer

    def recording(*args):
        loaded_in.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(engine, "OVERLAP_TOKENIZER_ON", ("cpu",))
    monkeypatch.setattr(prmkit.models.loading, "load_tokenizer", recording)
    overlapped = StepScorer.from_pretrained(prm_dir, device="cpu", dtype="float32")
    assert len(loaded_in) == 1 and loaded_in[0].startswith("prmkit-load")
    assert tokenizer_fingerprint(overlapped.tokenizer) == tokenizer_fingerprint(scorer.tokenizer)
    assert overlapped.score_batch(ITEMS) == reference
    assert not [t for t in threading.enumerate() if t.name.startswith("prmkit-load")]

    # A tokenizer that cannot be loaded is the same one-line error as without the thread.
    with pytest.raises(PrmkitError, match="tokenizer .*could not be loaded|no such"):
        StepScorer.from_pretrained(prm_dir, device="cpu", dtype="float32", tokenizer=str(prm_dir / "missing"))


def test_a_finished_command_exits_at_once_with_its_code_output_and_exit_handlers(tmp_path, prm_dir):
    src = write_rows(tmp_path / "in.jsonl", solutions(40, seed=5))
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys; atexit.register(lambda path=sys.argv[1]: open(path, 'w').write('ran')); "
        "sys.argv = ['prmkit', *sys.argv[2:]]; from prmkit.cli.app import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(marker), "score", str(prm_dir), str(src), "-o", "-"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 40 and all(len(json.loads(line)["step_scores"]) >= 1 for line in lines)
    assert marker.read_text() == "ran"
    missing = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(marker),
            "score",
            str(prm_dir),
            str(tmp_path / "nope.jsonl"),
            "-o",
            str(tmp_path / "out.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr


def test_a_resumed_run_keeps_the_budget_it_derived_at_the_start(tmp_path, scorer):
    src = write_rows(tmp_path / "in.jsonl", solutions(40, seed=9))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    score_file(like(scorer, batch_tokens=256), str(src), str(ref), sort_window=10)

    def derived(budget: int) -> StepScorer:
        sc = like(scorer, batch_tokens=budget)
        sc.batch_tokens_source = "9.5 GiB free on cuda"  # as if sized to a GPU's free memory
        return sc

    class Crash(Exception):
        pass

    def crash_after_two_windows(info):
        if info["lines"] >= 20:
            raise Crash

    with pytest.raises(Crash):
        score_file(derived(256), str(src), str(out), sort_window=10, on_progress=crash_after_two_windows)
    # Less memory free this time: another budget derived. The run goes on with the first one, to the same bytes.
    again = derived(128)
    with prmkit_log() as records:
        summary = score_file(again, str(src), str(out), sort_window=10)
    assert summary.resumed_at_line == 20 and summary.batch_tokens == again.batch_tokens == 256
    assert any("batch budget the run started with (256 tokens, not 128)" in r.getMessage() for r in records)
    assert out.read_bytes() == ref.read_bytes()
