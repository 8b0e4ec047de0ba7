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

import time
from collections.abc import Sequence
from typing import Any

import torch

from draftlm.attention import SMALL_STEP
from draftlm.compile import CompiledDecoder
from draftlm.errors import DraftlmError
from draftlm.load import LM
from draftlm.output import GenerationResult, OutputTracker
from draftlm.sampling import SamplingParams, check_finite, logits_to_probs
from draftlm.speculative.drafters import Draft, Drafter
from draftlm.speculative.verify import verify_draft, verify_greedy


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
    decoder = lm.decoder
    device = lm.device
    start = time.perf_counter()
    slack = 0
    # A feature drafter reads the target's hidden states: its passes run as `features` +
    # head on the model itself (eager) and hand the features over.
    features = drafter.wants_features
    if (isinstance(decoder, CompiledDecoder) and not features
            and drafter.max_draft_length + 1 <= SMALL_STEP):
        # A compiled target verifies through one padded graph of max draft + 1 tokens.
        decoder.compile_verify(drafter.max_draft_length + 1)
        slack = min(drafter.max_draft_length, lm.config.max_seq_len - cache_len)
    decoder.setup_cache(1, cache_len + slack)
    drafter.begin(prompt_ids, cache_len, device)
    ids = [int(t) for t in prompt_ids]
    if len(ids) > 1:  # the last prompt token goes in with the first draft
        prompt = torch.tensor([ids[:-1]], device=device)
        if features:
            drafter.observe(0, lm.model.features(prompt, start_pos=0)[0])
        else:
            decoder(prompt, start_pos=0, num_logits=1)
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
        start_pos = len(ids) - 1
        last = torch.tensor([ids[-1]], device=device)
        fed = torch.cat((last, draft.tokens)).view(1, -1)
        if features:
            hidden = lm.model.features(fed, start_pos=start_pos)[0]
            logits = lm.model.lm_head(hidden)
        else:
            logits = decoder(fed, start_pos=start_pos)[0]
        if num_forwards == 0:
            check_finite(logits[:1], lm.name)
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
        decoder.rollback(start_pos + 1 + n)
        if features:
            drafter.observe(start_pos, hidden[: n + 1])
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
