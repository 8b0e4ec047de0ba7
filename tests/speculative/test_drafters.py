"""Drafters: draft-length policy, prompt lookup, vocabulary checks, a draft whose vocabulary
is a prefix of the target's, cross-tokenizer drafting (exact for greedy, point-mass
proposals exact for sampling), and the one-line errors of `build_drafter`."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    PROMPT,
    byte_tokenizer,
    chi_square_p_value,
    no_eos_lm,
    noisy_copy,
    permuted_byte_tokenizer,
    permuted_draft,
)
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.generate import generate
from draftlm.load import LM
from draftlm.model import Transformer
from draftlm.sampling import SamplingParams
from draftlm.speculative import build_drafter, verify_draft
from draftlm.speculative.drafters import (
    CrossTokenizerDrafter,
    DraftLengthPolicy,
    ModelDrafter,
    NgramDrafter,
    vocab_compatible,
)
from draftlm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adaptive_policy_grows_on_full_acceptance_and_shrinks_on_rejection() -> None:
    policy = DraftLengthPolicy(5, adaptive=True)
    assert policy.length == 5
    for drafted, accepted, length in [(5, 2, 4), (4, 0, 3), (3, 1, 2), (2, 0, 1), (1, 0, 1),
                                      (1, 1, 3), (3, 3, 5), (5, 5, 5), (0, 0, 5)]:
        policy.update(drafted, accepted)
        assert policy.length == length
    policy.reset()
    assert policy.length == 5
    fixed = DraftLengthPolicy(4, adaptive=False)
    fixed.update(4, 0)
    assert fixed.length == 4


def test_ngram_lookup_takes_the_latest_longest_match() -> None:
    drafter = NgramDrafter(max_ngram=3, num_draft_tokens=4)
    #          0  1  2  3  4  5  6  7  8  9 10
    context = [1, 2, 3, 9, 9, 7, 2, 3, 8, 5, 2, 3]
    assert drafter.lookup(context, 4) == [8, 5, 2, 3]  # "2 3" last seen at 6
    assert drafter.lookup([*context[:-1], 7, 2, 3], 2) == [8, 5]  # "7 2 3" wins
    assert drafter.lookup([4, 5, 6], 3) == []
    assert drafter.lookup([4], 3) == []
    assert drafter.lookup([6, 6, 6, 6], 5) == [6]  # continuation stops at the context end


def test_vocab_compatibility() -> None:
    byte = byte_tokenizer()
    assert vocab_compatible(byte, byte_tokenizer())
    extended = byte_tokenizer()
    extended.backend.add_special_tokens(["<fim>", "<pad>"])
    assert vocab_compatible(extended, byte)  # a draft vocab that is a prefix: fine
    assert not vocab_compatible(byte, extended)
    assert not vocab_compatible(byte, permuted_byte_tokenizer())


def test_prefix_vocab_draft_is_padded_and_exact() -> None:
    """Like AMD-Llama-135M (32000 tokens) drafting for CodeLlama (32016)."""
    target = no_eos_lm(0, vocab_size=258)
    target.tokenizer.backend.add_special_tokens(["<fim>", "<pad>"])
    small = noisy_copy(target)
    config = small.config.with_(vocab_size=256)
    model = Transformer(config)
    state = {k: v[:256] if v.shape[0] == 258 else v for k, v in small.model.state_dict().items()}
    model.load_state_dict(state)
    draft = LM(model.eval(), byte_tokenizer(), config, "small-vocab")
    expected = generate(target, PROMPT, max_new_tokens=30)
    result = generate(target, PROMPT, max_new_tokens=30, drafter=ModelDrafter(draft, target, 3))
    assert result.token_ids == expected.token_ids
    assert result.stats["num_accepted"] > 0
    sampled = generate(target, PROMPT, max_new_tokens=30, temperature=1.0, seed=0,
                       drafter=ModelDrafter(draft, target, 3))
    assert len(sampled.token_ids) == 30


def test_confidence_threshold_shortens_drafts_not_answers() -> None:
    """--draft-confidence: the draft stops at a token it is unsure of; greedy output stays
    the target's, with fewer drafted tokens than without the threshold."""
    target = no_eos_lm(0)
    draft = noisy_copy(target)
    expected = generate(target, PROMPT, max_new_tokens=30)
    plain = generate(target, PROMPT, max_new_tokens=30,
                     drafter=ModelDrafter(draft, target, 6, adaptive=False))
    careful = generate(target, PROMPT, max_new_tokens=30,
                       drafter=ModelDrafter(draft, target, 6, adaptive=False,
                                            min_confidence=0.9))
    assert plain.token_ids == careful.token_ids == expected.token_ids
    per_round = [r.stats["num_drafted"] / r.stats["target_forwards"] for r in (plain, careful)]
    assert per_round[1] < per_round[0]


def test_point_mass_proposal_keeps_the_target_distribution() -> None:
    """The cross-tokenizer sampling rule: a deterministic proposal, kept with probability
    p(x), else a draw from p without x, leaves exactly p."""
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(12, generator=generator) * 2, -1)
    trials = 20_000
    tokens = torch.full((trials, 2), int(p.argmin()))  # even a poor guess
    accepted, next_token = verify_draft(tokens, None, p.expand(trials, 3, 12), generator)
    first = torch.where(accepted > 0, tokens[:, 0], next_token)
    assert chi_square_p_value(torch.bincount(first, minlength=12), p) > 0.01
    assert 0 < accepted.float().mean() < 0.5


# ---- cross-tokenizer drafting -----------------------------------------------------------
def bpe_draft(seed: int = 5) -> LM:
    """A random draft over a byte-level BPE with merges: token boundaries differ."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel
                                  .alphabet(), show_progress=False)
    backend.train_from_iterator([PROMPT * 3, "def sub(a, b):\n    return a - b\n"] * 5,
                                trainer)
    tokenizer = Tokenizer(backend)
    config = ModelConfig.from_name("tiny").with_(vocab_size=tokenizer.vocab_size, eos_ids=())
    model = Transformer(config)
    model.init_weights(std=0.5, generator=torch.Generator().manual_seed(seed))
    return LM(model.eval(), tokenizer, config, "bpe")


def ascii_target() -> LM:
    """A random target that writes ASCII: text bridging needs whole characters, and random
    bytes are mostly invalid UTF-8."""
    target = no_eos_lm(0)
    with torch.no_grad():
        target.model.lm_head.weight[128:] = 0.0
    return target


@pytest.mark.parametrize("k", [1, 3, 6])
def test_cross_tokenizer_greedy_equals_plain_greedy(k: int) -> None:
    target = ascii_target()
    draft = permuted_draft(target, noise=0.02)
    assert not vocab_compatible(target.tokenizer, draft.tokenizer)
    expected = generate(target, PROMPT, max_new_tokens=40).token_ids
    result = generate(target, PROMPT, max_new_tokens=40,
                      drafter=CrossTokenizerDrafter(draft, target, k))
    assert result.token_ids == expected
    assert 0 < result.stats["num_accepted"] < result.stats["num_drafted"]


def test_cross_tokenizer_with_other_token_boundaries_is_exact() -> None:
    target = no_eos_lm(0)
    target.model.init_weights(std=0.02, generator=torch.Generator().manual_seed(3))
    draft = bpe_draft()
    for prompt in (PROMPT, "def sub(a, b):\n    return"):
        expected = generate(target, prompt, max_new_tokens=30).token_ids
        result = generate(target, prompt, max_new_tokens=30,
                          drafter=CrossTokenizerDrafter(draft, target, 4))
        assert result.token_ids == expected
    sampled = generate(target, PROMPT, max_new_tokens=20, temperature=1.0, seed=1,
                       drafter=CrossTokenizerDrafter(draft, target, 4))
    assert len(sampled.token_ids) == 20


def test_cross_tokenizer_drafter_keeps_its_cache_across_rounds() -> None:
    target = ascii_target()
    draft = permuted_draft(target, noise=0.0)
    drafter = CrossTokenizerDrafter(draft, target, 4, adaptive=False)
    generate(target, PROMPT, max_new_tokens=20, drafter=drafter)
    fed: list[int] = []
    forward = draft.model.forward

    def counting(ids, start_pos=None, num_logits=None):
        fed.append(ids.shape[1])
        return forward(ids, start_pos=start_pos, num_logits=num_logits)

    draft.model.forward = counting
    generate(target, PROMPT, max_new_tokens=20, drafter=drafter)
    prefill = len(PROMPT)
    assert fed[0] == prefill  # a new generation starts from scratch ...
    assert max(fed[1:]) <= 6  # ... then each round feeds only what changed


# ---- bad input ---------------------------------------------------------------------------
def test_build_drafter_errors_are_one_line(tmp_path) -> None:
    target = no_eos_lm(0)
    other = permuted_draft(target, 0.0)
    with pytest.raises(DraftlmError, match="cross-tokenizer"):
        build_drafter(target, draft_lm=other)
    assert isinstance(build_drafter(target, draft_lm=other, cross_tokenizer=True),
                      CrossTokenizerDrafter)
    for k in (0, -2):
        with pytest.raises(DraftlmError, match="draft tokens must be >= 1"):
            build_drafter(target, ngram=2, num_draft_tokens=k)
    with pytest.raises(DraftlmError, match="exactly one of"):
        build_drafter(target)
    with pytest.raises(DraftlmError, match="exactly one of"):
        build_drafter(target, draft="x", ngram=2)
    with pytest.raises(DraftlmError, match="--ngram must be >= 1"):
        build_drafter(target, ngram=0)
    with pytest.raises(DraftlmError, match="cannot load draft model") as err:
        build_drafter(target, draft=str(tmp_path / "missing.gguf"))
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(DraftlmError, match="cannot load draft model"):
        build_drafter(target, draft=str(broken))
    assert isinstance(build_drafter(target, draft_lm=noisy_copy(target)), ModelDrafter)
    assert isinstance(build_drafter(target, ngram=3), NgramDrafter)


def test_truncated_head_draft_is_exact_and_proposes_only_its_tokens() -> None:
    """A draft whose head covers some tokens (FR-Spec) drafts only those, and greedy
    speculative output stays the target's own."""
    from draftlm.training.draft import prune

    target = no_eos_lm(seed=0)
    plain = generate(target, PROMPT, max_new_tokens=24)
    # The head holds most of what the target writes, not all of it (the first token of its
    # answer is left out), and nothing else beyond the lower-case letters.
    kept = set(plain.token_ids[1:]) - {plain.token_ids[0]}
    ids = torch.tensor(sorted(kept | set(range(97, 123))))
    draft_model = prune(noisy_copy(target, 0.05).model, None, ids)
    draft = LM(draft_model.eval(), target.tokenizer, draft_model.config, "truncated")
    drafter = ModelDrafter(draft, target, num_draft_tokens=4)
    fast = generate(target, PROMPT, max_new_tokens=24, drafter=drafter)
    assert fast.token_ids == plain.token_ids
    assert fast.stats["num_accepted"] > 0
    with torch.inference_mode():
        drafter.begin(target.tokenizer.encode(PROMPT), 256, torch.device("cpu"))
        proposal = drafter.propose(target.tokenizer.encode(PROMPT), 4, SamplingParams(1.0),
                                   torch.Generator().manual_seed(0))
    assert set(proposal.tokens.tolist()) <= set(ids.tolist())
    assert proposal.probs is not None
    outside = torch.ones(256, dtype=torch.bool)
    outside[ids] = False
    assert proposal.probs[:, outside].sum() == 0
    torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(len(proposal)))
