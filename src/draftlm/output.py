"""What a generation produces, and the one place that decides when it is over.

`OutputTracker` is shared by plain and speculative decoding so that EOS, stop strings,
token limits and streaming behave identically whichever loop produced the tokens;
`GenerationResult` is what both return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from draftlm.tokenizer import StreamDecoder, Tokenizer


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
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        # Called on every chunk, streamed or not: the place to give up (raise) when the
        # caller no longer wants the output, even while a stop string holds text back.
        self.on_step = on_step
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
        if self.on_step is not None:
            self.on_step()
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
