"""Autoregressive generation: prefill, then one token at a time from the KV cache.

`generate` is the one entry point for users; with a `drafter` it hands the loop to
speculative decoding, which shares `OutputTracker` so that EOS, stop strings, token
limits and streaming behave identically whichever loop produced the tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from draftlm.errors import DraftlmError
from draftlm.sampling import SamplingParams, make_generator, next_token
from draftlm.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from draftlm.load import LM
    from draftlm.speculative import Drafter


@dataclass
class GenerationResult:
    """What one call to `generate` produced, with the figures that describe its speed."""

    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    elapsed_s: float
    prefill_s: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the whole call's wall time, prefill included."""
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_new_tokens": self.num_new_tokens,
            "finish_reason": self.finish_reason,
            "elapsed_s": round(self.elapsed_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            **self.stats,
        }


class OutputTracker:
    """Collects generated tokens and decides when generation is over.

    `add` takes a chunk of tokens (one from plain decoding, several from an accepted
    draft), keeps those up to the first EOS, stop string or token limit, streams the text
    that can no longer turn into a stop string, and returns True once finished."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int],
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._decoder = StreamDecoder(tokenizer, prompt_ids)
        self._text = ""  # decoded text of token_ids (complete characters only)
        self._streamed = 0  # characters of _text already passed to on_text
        self._final_text: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._final_text if self._final_text is not None else self._text

    def add(self, tokens: Sequence[int]) -> bool:
        """Append `tokens`; returns True when generation must stop."""
        if self.done:
            return True
        for token in tokens:
            if token in self.eos_ids:
                self._finish("stop")
                return True
            self.token_ids.append(int(token))
            old_len = len(self._text)
            self._text += self._decoder.push([int(token)])
            cut = self._stop_index(old_len)
            if cut is not None:
                self._final_text = self._text[:cut]
                self._finish("stop")
                return True
            if len(self.token_ids) >= self.max_new_tokens:
                self._finish("length")
                return True
        self._stream(final=False)
        return False

    def _stop_index(self, old_len: int) -> int | None:
        # A new match must end in the new text, so start looking one stop length before it.
        found = [
            i for s in self.stop if (i := self._text.find(s, max(0, old_len - len(s) + 1))) >= 0
        ]
        return min(found) if found else None

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self._final_text is None:
            self._text += self._decoder.flush()
            self._final_text = self._text
        self._stream(final=True)

    def _stream(self, final: bool) -> None:
        if self.on_text is None:
            return
        text = self.text
        end = len(text)
        if not final:
            # Hold back a tail that could still grow into a stop string.
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        if end > self._streamed:
            self.on_text(text[self._streamed : end])
            self._streamed = end


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
    max_context: int | None = None,
) -> GenerationResult:
    """Generate a continuation of `prompt` (text or token ids) with `lm`.

    With `drafter`, speculative decoding produces the same distribution (the same tokens
    when greedy) in fewer target passes. `on_text` receives streamed text deltas.
    `max_context` caps the KV cache below the model's context (memory)."""
    params = SamplingParams(temperature, top_k, top_p)
    prompt_ids = encode_prompt(lm, prompt, chat)
    context = min(lm.config.max_seq_len, max_context or lm.config.max_seq_len)
    budget = check_context(len(prompt_ids), max_new_tokens, context)
    eos_ids = tuple(dict.fromkeys((*lm.config.eos_ids, *lm.tokenizer.eos_ids)))
    tracker = OutputTracker(lm.tokenizer, prompt_ids, budget, eos_ids, stop, on_text)
    device = lm.model.embed_tokens.weight.device
    generator = make_generator(seed, device)

    if drafter is not None:
        from draftlm.speculative import speculative_decode

        return speculative_decode(
            lm, drafter, prompt_ids, tracker, params, generator,
            cache_len=len(prompt_ids) + budget,
        )

    model = lm.model
    start = time.perf_counter()
    model.setup_cache(1, min(context, len(prompt_ids) + budget))
    ids = torch.tensor([prompt_ids], device=device)
    # The prompt minus its last token in one pass, then the last token as a decode step:
    # exactly the calls speculative decoding makes, so that both fill the KV cache with the
    # same values (bit for bit with batch-invariant quantized layers) and greedy outputs
    # stay equal. The extra step costs one token of decoding.
    if len(prompt_ids) > 1:
        model(ids[:, :-1], start_pos=0, num_logits=1)
    logits = model(ids[:, -1:], start_pos=len(prompt_ids) - 1)[:, -1]
    token = next_token(logits, params, generator)
    prefill_s = time.perf_counter() - start
    pos = len(prompt_ids)
    while not tracker.add([int(token)]):  # .item(): the EOS check needs the host anyway
        logits = model(token.view(1, 1), start_pos=pos)[:, -1]
        token = next_token(logits, params, generator)
        pos += 1
    elapsed = time.perf_counter() - start
    decode_s = elapsed - prefill_s
    stats: dict[str, Any] = {"target_forwards": pos - len(prompt_ids) + 1}
    if decode_s > 0 and pos > len(prompt_ids):
        stats["decode_tokens_per_second"] = round((pos - len(prompt_ids)) / decode_s, 3)
    return GenerationResult(
        tracker.text, tracker.token_ids, len(prompt_ids), tracker.finish_reason or "length",
        elapsed, prefill_s, stats,
    )
