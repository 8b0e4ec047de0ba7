"""Speculative sampling's acceptance rule (Leviathan et al. 2023, Chen et al. 2023).

Pure functions over probabilities: which prefix of a draft the target keeps and which
token follows it. The output then has exactly the target's distribution whatever the
draft proposed; the distribution tests run many trials of them at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def acceptance_probability(target_p: Tensor, draft_q: Tensor) -> Tensor:
    """Probability of keeping a drafted token: min(1, p(x) / q(x)).

    q(x) > 0 because x was drawn from q. (A module function so the distribution tests can
    swap in a wrong rule and show that they catch it.)"""
    return (target_p / draft_q).clamp(max=1.0)


def verify_draft(
    draft_tokens: Tensor, draft_probs: Tensor | None, target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Accept a prefix of the draft and draw the token that follows it.

    draft_tokens [..., k], draft_probs [..., k, V] (None: point masses on draft_tokens),
    target_probs [..., k + 1, V] (row i: the target's distribution for draft position i,
    row k: after the whole draft). Returns (num_accepted [...], next_token [...]); leading
    dimensions are independent trials, which lets tests run 20k of them at once."""
    *batch, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    trials = math.prod(batch)
    tokens = draft_tokens.reshape(trials, k)
    p = target_probs.reshape(trials, k + 1, vocab).float()
    rows = torch.arange(trials, device=tokens.device)
    if k > 0:
        p_drafted = p[:, :k].gather(-1, tokens[..., None]).squeeze(-1)
        if draft_probs is None:
            q_drafted = torch.ones_like(p_drafted)
        else:
            q = draft_probs.reshape(trials, k, vocab).float()
            q_drafted = q.gather(-1, tokens[..., None]).squeeze(-1)
        u = torch.rand(p_drafted.shape, generator=generator, device=p.device)
        # Leviathan et al. 2023, Algorithm 1 / Chen et al. 2023, Algorithm 2: keep x_i if
        # r_i < min(1, p(x_i) / q(x_i)); at the first rejection n sample from
        # p'(x) = norm(max(0, p_n(x) - q_n(x))); if all k are kept, sample from p_{k+1}.
        kept = u < acceptance_probability(p_drafted, q_drafted)
        num_accepted = kept.long().cumprod(-1).sum(-1)
    else:
        num_accepted = torch.zeros(trials, dtype=torch.long, device=p.device)
    p_next = p[rows, num_accepted]
    rejected = num_accepted < k
    if k > 0:
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            q_next = torch.nn.functional.one_hot(tokens[rows, at], vocab).float()
        else:
            q_next = q[rows, at]
        residual = (p_next - q_next * rejected[:, None]).clamp_min(0.0)
        # A rejection implies p < q somewhere, hence p > q elsewhere: the residual has mass
        # unless rounding ate it, when p itself is the right fallback.
        has_mass = residual.sum(-1, keepdim=True) > 0
        weights = torch.where(has_mass, residual, p_next)
    else:
        weights = p_next
    next_token = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
    return num_accepted.reshape(batch), next_token.reshape(batch)


def verify_greedy(draft_tokens: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """`verify_draft` for greedy decoding, from the target's logits [k + 1, V].

    With a one-hot target distribution a drafted token is kept exactly when it is the
    target's argmax, and the token after the kept prefix is the argmax there, whatever the
    draft's probabilities; this gets there with one argmax instead of building [k + 1, V]
    one-hot tensors and drawing from them, which at Qwen's 151936 tokens costs far more
    than the argmax."""
    choice = target_logits.argmax(-1)
    k = draft_tokens.shape[0]
    num_accepted = (choice[:k] == draft_tokens).long().cumprod(0).sum()
    return num_accepted, choice[num_accepted]
