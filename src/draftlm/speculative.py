"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): exact, faster sampling.

A drafter proposes k tokens; the target scores all of them in one forward pass over its
KV cache; each is kept with probability min(1, p/q); the first rejected one is replaced by
a draw from the residual max(0, p - q), and a fully accepted draft earns one more token
from the target. The output has exactly the target's distribution (the target's greedy
tokens when greedy), whatever the drafter proposes: the drafter only sets the speed.

State between rounds: the target's cache holds every token of the context but the last
one, which each round's verify pass feeds first, followed by the draft. Rejected
positions are forgotten with an O(1) rollback. The host looks at token values once per
round, for the acceptance decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from draftlm.drafters import (
    CrossTokenizerDrafter,
    Draft,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    vocab_compatible,
)
from draftlm.errors import DraftlmError
from draftlm.flags import check_confidence
from draftlm.generate import GenerationResult, OutputTracker
from draftlm.load import LM
from draftlm.model import SMALL_STEP
from draftlm.sampling import SamplingParams, logits_to_probs

__all__ = [
    "CrossTokenizerDrafter", "Draft", "Drafter", "ModelDrafter", "NgramDrafter",
    "acceptance_probability", "build_drafter", "speculative_decode", "verify_draft",
    "verify_greedy",
]


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
    one-hot tensors and drawing from them (~8 ms a round at Qwen's 151936 tokens)."""
    choice = target_logits.argmax(-1)
    k = draft_tokens.shape[0]
    num_accepted = (choice[:k] == draft_tokens).long().cumprod(0).sum()
    return num_accepted, choice[num_accepted]


@torch.inference_mode()
def speculative_decode(
    lm: LM,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    tracker: OutputTracker,
    params: SamplingParams,
    generator: torch.Generator,
    cache_len: int,
) -> GenerationResult:
    """Generate with `drafter` proposing and `lm` verifying; `tracker` decides the end.

    `cache_len` is the target's KV-cache capacity (prompt + new-token budget); drafts are
    shortened so that no verify pass runs past it."""
    if not prompt_ids:
        raise DraftlmError("the prompt is empty")
    model = lm.model
    device = lm.device
    start = time.perf_counter()
    slack = 0
    if model.compiled and drafter.max_draft_length + 1 <= SMALL_STEP:
        # A compiled target verifies through one padded graph of max draft + 1 tokens.
        model.compile_verify(drafter.max_draft_length + 1)
        slack = min(drafter.max_draft_length, model.config.max_seq_len - cache_len)
    model.setup_cache(1, cache_len + slack)
    drafter.begin(prompt_ids, cache_len, device)
    ids = [int(t) for t in prompt_ids]
    if len(ids) > 1:  # the last prompt token goes in with the first draft
        model(torch.tensor([ids[:-1]], device=device), start_pos=0, num_logits=1)
    prefill_s = time.perf_counter() - start
    draft_s = verify_s = 0.0
    num_forwards = num_drafted = num_accepted = 0
    while True:
        tokens_left = tracker.max_new_tokens - len(tracker.token_ids)
        # A round yields up to k + 1 tokens and writes k + 1 cache positions.
        k = min(drafter.draft_length, tokens_left - 1, cache_len - len(ids))
        t0 = time.perf_counter()
        draft = drafter.propose(ids, k, params, generator) if k > 0 else Draft.empty(device)
        t1 = time.perf_counter()
        k = len(draft)
        pos = len(ids) - 1
        last = torch.tensor([ids[-1]], device=device)
        logits = model(torch.cat((last, draft.tokens)).view(1, -1), start_pos=pos)[0]
        if params.greedy:
            accepted, next_token = verify_greedy(draft.tokens, logits)
        else:
            target_probs = logits_to_probs(logits, params)
            accepted, next_token = verify_draft(draft.tokens, draft.probs, target_probs,
                                                generator)
        # The one host sync of the round: acceptance count, next token, drafted tokens.
        values = torch.cat((accepted.view(1), next_token.view(1), draft.tokens)).tolist()
        n = values[0]
        new_tokens = [*values[2 : 2 + n], values[1]]
        model.rollback(pos + 1 + n)
        draft_s += t1 - t0
        verify_s += time.perf_counter() - t1
        num_forwards += 1
        num_drafted += k
        num_accepted += n
        drafter.update(k, n)
        ids.extend(new_tokens)
        if tracker.add(new_tokens):
            break
    elapsed = time.perf_counter() - start
    num_new = len(tracker.token_ids)
    decode_s = elapsed - prefill_s
    stats: dict[str, Any] = {
        "drafter": drafter.name,
        "num_drafted": num_drafted,
        "num_accepted": num_accepted,
        "acceptance_rate": round(num_accepted / num_drafted, 4) if num_drafted else 0.0,
        "target_forwards": num_forwards,
        "tokens_per_target_forward": round(num_new / num_forwards, 3),
        "draft_s": round(draft_s, 4),
        "target_s": round(verify_s + prefill_s, 4),
        "decode_tokens_per_second": round(num_new / decode_s, 3) if decode_s > 0 else 0.0,
    }
    return GenerationResult(
        tracker.text, tracker.token_ids, len(prompt_ids), tracker.finish_reason or "length",
        elapsed, prefill_s, stats,
    )


def build_drafter(
    lm: LM,
    draft: str | None = None,
    ngram: int | None = None,
    num_draft_tokens: int = 5,
    adaptive: bool = True,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    cross_tokenizer: bool = False,
    min_confidence: float | None = None,
    draft_lm: LM | None = None,
    quantize: str = "none",
    compile_step: bool = False,
) -> Drafter:
    """The drafter the CLI flags ask for: `draft` (a model name/path) or `ngram` (size).

    A draft whose vocabulary is not the target's needs `cross_tokenizer`; `draft_lm`
    passes an already loaded draft (benchmarks reuse one across configurations)."""
    if num_draft_tokens < 1:
        raise DraftlmError(f"the number of draft tokens must be >= 1, got {num_draft_tokens}")
    if (draft is None and draft_lm is None) == (ngram is None):
        raise DraftlmError("speculative decoding needs exactly one of --draft or --ngram")
    if min_confidence is not None:
        check_confidence(min_confidence)
        if ngram is not None or cross_tokenizer:
            raise DraftlmError("--draft-confidence applies to a draft model with the target's "
                               "tokenizer (--draft), not to --ngram or cross-tokenizer drafts")
    if ngram is not None:
        if ngram < 1:
            raise DraftlmError(f"--ngram must be >= 1, got {ngram}")
        return NgramDrafter(ngram, num_draft_tokens, adaptive)
    if draft_lm is None:
        draft_lm = load_draft(str(draft), dtype, device, quantize, compile_step)
    if cross_tokenizer:
        return CrossTokenizerDrafter(draft_lm, lm, num_draft_tokens, adaptive)
    if not vocab_compatible(lm.tokenizer, draft_lm.tokenizer):
        raise DraftlmError(
            f"draft {draft_lm.name} has another tokenizer than target {lm.name} "
            f"({draft_lm.tokenizer.vocab_size} vs {lm.tokenizer.vocab_size} tokens); "
            "use cross-tokenizer drafting (--cross-tokenizer)"
        )
    return ModelDrafter(draft_lm, lm, num_draft_tokens, adaptive, min_confidence)


def load_draft(
    draft: str, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
    quantize: str = "none", compile_step: bool = False,
) -> LM:
    """Load a draft model; any failure becomes one line that names the draft."""
    from draftlm.load import load

    try:
        return load(draft, dtype=dtype, device=device, quantize=quantize,
                    compile_step=compile_step)
    except (DraftlmError, OSError, ValueError, KeyError) as err:
        raise DraftlmError(f"cannot load draft model {draft!r}: {err}") from err
