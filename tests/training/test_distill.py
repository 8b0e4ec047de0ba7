"""Distillation losses on the teacher's top-k: exact where the top-k holds all the mass,
zero only when the draft matches, and truncated draft heads mapped correctly."""

from __future__ import annotations

import pytest
import torch

from draftlm.training.distill import bucketed, distill_loss, draft_positions


def full_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.log_softmax(logits, -1).topk(k, -1)
    return top.indices, top.values


def test_with_the_whole_vocabulary_the_losses_are_the_full_divergences() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher, draft = torch.randn(3, 5, 11, generator=gen), torch.randn(3, 5, 11, generator=gen)
    ids, logprobs = full_topk(teacher, 11)
    p, q = teacher.softmax(-1), draft.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    tvd = 0.5 * (p - q).abs().sum(-1).mean()
    assert distill_loss("fkl", draft, ids, logprobs) == pytest.approx(float(kl), abs=1e-5)
    assert distill_loss("tvd", draft, ids, logprobs) == pytest.approx(float(tvd), abs=1e-5)


def test_top_k_losses_are_lower_bounds_and_zero_for_the_teacher_itself() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher, draft = torch.randn(4, 50, generator=gen) * 3, torch.randn(4, 50, generator=gen)
    ids, logprobs = full_topk(teacher, 8)
    full_ids, full_lp = full_topk(teacher, 50)
    for kind in ("fkl", "tvd"):
        coarse = distill_loss(kind, draft, ids, logprobs)
        assert 0 < coarse <= distill_loss(kind, draft, full_ids, full_lp) + 1e-6
        assert distill_loss(kind, teacher, ids, logprobs) == pytest.approx(0.0, abs=1e-5)


def test_buckets_are_distributions() -> None:
    gen = torch.Generator().manual_seed(2)
    ids, logprobs = full_topk(torch.randn(6, 30, generator=gen), 5)
    p, q = bucketed(torch.randn(6, 30, generator=gen), ids, logprobs)
    assert p.shape == q.shape == (6, 6)
    torch.testing.assert_close(p.sum(-1), torch.ones(6))
    torch.testing.assert_close(q.sum(-1), torch.ones(6))


def test_truncated_head_maps_teacher_tokens_and_puts_the_rest_in_the_tail() -> None:
    vocab_ids = torch.tensor([7, 2, 9])  # draft output i is target token vocab_ids[i]
    index, present = draft_positions(torch.tensor([[2, 9, 5, 7, 40]]), vocab_ids, 3)
    assert present.tolist() == [[True, True, False, True, False]]
    assert index[present].tolist() == [1, 2, 0]
    # A draft head over 3 of 10 tokens that puts exactly the teacher's mass on them.
    target_logits = torch.tensor([[0.0, -9, 2.0, -9, -9, -9, -9, 1.0, -9, 0.5]])
    ids, logprobs = full_topk(target_logits, 10)
    draft_logits = target_logits[:, vocab_ids]
    p, q = bucketed(draft_logits, ids, logprobs, vocab_ids)
    probs = target_logits.softmax(-1)[0]
    inside = float(probs[vocab_ids].sum())
    # Teacher tokens the head cannot produce join the tail bucket: q has no mass there (the
    # draft spends it all on its head), p has exactly the mass outside the head.
    assert float(q[0, -1]) == pytest.approx(0.0, abs=1e-6)
    assert float(p[0, -1]) == pytest.approx(1 - inside, abs=1e-5)
    assert float(q[0, :-1].sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(p[0, :-1].sum()) == pytest.approx(inside, abs=1e-5)
    # On the head's own tokens the draft matches the target's conditional exactly, so the
    # divergence is only the mass the head cannot hold.
    tvd = float(distill_loss("tvd", draft_logits, ids, logprobs, vocab_ids=vocab_ids))
    assert tvd == pytest.approx(1 - inside, abs=1e-4)


def test_a_prefix_vocabulary_draft_never_sees_the_targets_extra_tokens() -> None:
    index, present = draft_positions(torch.tensor([3, 31999, 32005]), None, 32000)
    assert present.tolist() == [True, True, False]
    assert index.tolist()[:2] == [3, 31999]


def test_cross_entropy_baseline_and_unknown_kind() -> None:
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(3))
    nxt = torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), nxt.flatten())
    ids, lp = full_topk(logits, 3)
    assert distill_loss("ce", logits, ids, lp, next_tokens=nxt) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_loss("kl2", logits, ids, lp)


def test_losses_train_a_draft_towards_the_teacher() -> None:
    """A few steps of gradient descent on each loss move a random draft's distribution
    closer to the teacher's (total variation falls)."""
    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(16, 40, generator=gen) * 2
    ids, lp = full_topk(teacher, 8)
    for kind in ("fkl", "tvd"):
        draft = torch.randn(16, 40, generator=gen).requires_grad_()
        before = float(distill_loss("tvd", draft.detach(), ids, lp))
        opt = torch.optim.Adam([draft], lr=0.1)
        for _ in range(50):
            opt.zero_grad()
            distill_loss(kind, draft, ids, lp).backward()
            opt.step()
        assert float(distill_loss("tvd", draft.detach(), ids, lp)) < 0.5 * before
