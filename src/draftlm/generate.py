"""Autoregressive generation: prefill, then one token at a time from the KV cache.

`generate` is the one entry point for users; with a `drafter` it hands the loop to
speculative decoding, which shares `OutputTracker` so that EOS, stop strings, token
limits and streaming behave identically whichever loop produced the tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from draftlm.errors import DraftlmError
from draftlm.load import LM
from draftlm.output import GenerationResult, OutputTracker
from draftlm.sampling import SamplingParams, check_finite, make_generator, next_token
from draftlm.speculative import Drafter, speculative_decode


def encode_prompt(lm: LM, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
    """Prompt token ids; a chat prompt goes through the model's chat template first."""
    if isinstance(prompt, str):
        if chat:
            rendered = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            # The template writes BOS itself when the model wants one.
            return lm.tokenizer.encode(rendered, add_bos=False)
        return lm.tokenizer.encode(prompt)
    return [int(t) for t in prompt]


def check_context(num_prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """Validate the prompt length; return how many new tokens fit in the context."""
    if max_new_tokens < 1:
        raise DraftlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_prompt_tokens == 0:
        raise DraftlmError("the prompt is empty")
    if num_prompt_tokens >= context:
        raise DraftlmError(
            f"prompt is {num_prompt_tokens} tokens but the model's context is {context}; "
            "shorten the prompt"
        )
    return min(max_new_tokens, context - num_prompt_tokens)


@torch.inference_mode()
def generate(
    lm: LM,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = False,
    drafter: Drafter | None = None,
    on_text: Callable[[str], None] | None = None,
    on_step: Callable[[], None] | None = None,
    max_context: int | None = None,
) -> GenerationResult:
    """Generate a continuation of `prompt` (text or token ids) with `lm`.

    With `drafter`, speculative decoding produces the same distribution (the same tokens
    when greedy) in fewer target passes. `on_text` receives streamed text deltas; `on_step`
    is called at every step (an exception it raises ends the generation: a server's check
    that its client is still there).
    `max_context` caps the KV cache below the model's context (memory)."""
    params = SamplingParams(temperature, top_k, top_p)
    prompt_ids = encode_prompt(lm, prompt, chat)
    context = min(lm.config.max_seq_len, max_context or lm.config.max_seq_len)
    budget = check_context(len(prompt_ids), max_new_tokens, context)
    eos_ids = tuple(dict.fromkeys((*lm.config.eos_ids, *lm.tokenizer.eos_ids)))
    tracker = OutputTracker(lm.tokenizer, prompt_ids, budget, eos_ids, stop, on_text, on_step)
    device = lm.device
    generator = make_generator(seed, device)

    if drafter is not None:
        return speculative_decode(
            lm, drafter, prompt_ids, tracker, params, generator,
            cache_len=len(prompt_ids) + budget,
        )

    decoder = lm.decoder
    start = time.perf_counter()
    decoder.setup_cache(1, min(context, len(prompt_ids) + budget))
    ids = torch.tensor([prompt_ids], device=device)
    # The prompt minus its last token in one pass, then the last token as a decode step:
    # exactly the calls speculative decoding makes, so that both fill the KV cache with the
    # same values (bit for bit with batch-invariant quantized layers) and greedy outputs
    # stay equal. The extra step costs one token of decoding.
    if len(prompt_ids) > 1:
        decoder(ids[:, :-1], start_pos=0, num_logits=1)
    logits = decoder(ids[:, -1:], start_pos=len(prompt_ids) - 1)[:, -1]
    check_finite(logits, lm.name)
    token = next_token(logits, params, generator)
    prefill_s = time.perf_counter() - start
    start_pos = len(prompt_ids)
    while not tracker.add([int(token)]):  # .item(): the EOS check needs the host anyway
        logits = decoder(token.view(1, 1), start_pos=start_pos)[:, -1]
        token = next_token(logits, params, generator)
        start_pos += 1
    elapsed = time.perf_counter() - start
    decode_s = elapsed - prefill_s
    num_steps = start_pos - len(prompt_ids)
    stats: dict[str, Any] = {"target_forwards": num_steps + 1}
    if decode_s > 0 and num_steps > 0:
        stats["decode_tokens_per_second"] = round(num_steps / decode_s, 3)
    return GenerationResult(
        tracker.text, tracker.token_ids, len(prompt_ids), tracker.finish_reason or "length",
        elapsed, prefill_s, stats,
    )
