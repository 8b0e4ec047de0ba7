"""Distillation losses: a draft learns its target's token distributions (DistillSpec).

Zhou et al. 2023 (DistillSpec) train a draft on the target's distributions rather than on
the corpus' next tokens: what speculative decoding accepts is agreement with the target,
sum_x min(p(x), q(x)) = 1 - TVD(p, q), not likelihood of the data. The target's
distributions are stored as their top-k log-probabilities (`training.teacher`), so every
loss here works on the (k + 1)-bucket coarsening of p and q: the k teacher tokens, and one
bucket for the rest of the vocabulary. Coarsening never increases a divergence, so these
are lower bounds of the full ones that become exact as the teacher's tail mass vanishes;
with k = 32 on code the tail holds a few percent of the mass.

A draft may have a truncated head (FR-Spec): `vocab_ids` then lists the target token id of
each draft output, and teacher tokens outside it land in the tail bucket (q is zero
there, and exact verification covers them through the residual distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("fkl", "tvd", "ce")
_EPS = 1e-9


def draft_positions(teacher_ids: Tensor, vocab_ids: Tensor | None,
                    draft_vocab: int) -> tuple[Tensor, Tensor]:
    """Where each teacher token sits in the draft's output: (index [.., k], present [.., k]).

    Without `vocab_ids` the draft's output i is target token i (a vocabulary that is a
    prefix of the target's is allowed: tokens past it are absent)."""
    if vocab_ids is None:
        present = teacher_ids < draft_vocab
        return teacher_ids.clamp(max=draft_vocab - 1), present
    lookup = torch.full((int(vocab_ids.max()) + 1,), -1, dtype=torch.long,
                        device=teacher_ids.device)
    lookup[vocab_ids.to(teacher_ids.device)] = torch.arange(len(vocab_ids),
                                                            device=teacher_ids.device)
    inside = teacher_ids <= int(vocab_ids.max())
    index = torch.where(inside, lookup[teacher_ids.clamp(max=len(lookup) - 1)], -1)
    present = index >= 0
    return index.clamp(min=0), present


def bucketed(draft_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
             vocab_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(p, q) over k + 1 buckets [..., k + 1], float32: the teacher's top-k tokens and the
    rest. Draft logits [..., V_draft]; teacher ids and log-probs [..., k]."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    index, present = draft_positions(teacher_ids, vocab_ids, draft_logits.shape[-1])
    q_top = log_q.gather(-1, index).exp() * present
    p_top = teacher_logprobs.float().exp() * present  # absent tokens: in the tail for both
    p_rest = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)
    q_rest = (1 - q_top.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat((p_top, p_rest), -1), torch.cat((q_top, q_rest), -1)


def distill_loss(kind: str, draft_logits: Tensor, teacher_ids: Tensor,
                 teacher_logprobs: Tensor, next_tokens: Tensor | None = None,
                 vocab_ids: Tensor | None = None) -> Tensor:
    """Mean loss over positions. `fkl`: forward KL(p || q), the draft covers the target's
    modes; `tvd`: total variation, 1 - the expected acceptance of sampled speculation;
    `ce`: cross-entropy on the data's next tokens (`next_tokens`), the non-distilled
    baseline that the comparison in DistillSpec is made against."""
    if kind == "ce":
        if next_tokens is None:
            raise ValueError("the ce loss needs the next tokens")
        logits = draft_logits.float().flatten(0, -2)
        targets = next_tokens.flatten()
        if vocab_ids is not None:
            index, present = draft_positions(targets, vocab_ids, logits.shape[-1])
            targets = torch.where(present, index, -100)  # tokens outside the head: skipped
        return F.cross_entropy(logits, targets, ignore_index=-100)
    p, q = bucketed(draft_logits, teacher_ids, teacher_logprobs, vocab_ids)
    if kind == "fkl":
        return (p * (torch.log(p + _EPS) - torch.log(q + _EPS))).sum(-1).mean()
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1).mean()
    raise ValueError(f"unknown distillation loss {kind!r}; use one of {', '.join(LOSSES)}")
