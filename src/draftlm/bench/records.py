"""One benchmark row: what was run (`BenchConfig`) and what it measured (`BenchRow`).

Shared by the bench command and the peer baselines (HF transformers, llama.cpp), which
report their rows in the same form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark. kind: ar | ar-variant | draft | ngram | cross | hf |
    hf-assisted. An `ar-variant` row decodes the target at another precision (its source,
    e.g. `bfloat16` or `float32+int8`)."""

    kind: str
    source: str | None = None  # draft model name/path, or the n-gram size
    num_draft_tokens: int = 0
    adaptive: bool = False
    min_confidence: float | None = None  # a draft model stops under this top probability

    @property
    def _confidence(self) -> str:
        return "" if self.min_confidence is None else f" conf {self.min_confidence:g}"

    @property
    def label(self) -> str:
        if self.kind in ("ar", "hf", "llama.cpp"):
            return self.kind
        if self.kind == "ar-variant":
            return f"ar {self.source}"
        policy = "adaptive" if self.adaptive else "fixed"
        if self.kind == "hf-assisted":
            return f"hf-assisted {self.source}"
        return f"{self.kind} {self.source} k={self.num_draft_tokens} {policy}{self._confidence}"

    @property
    def series(self) -> str:
        """The line this row belongs to in the plot (one per drafter and policy)."""
        policy = "adaptive" if self.adaptive else "fixed"
        return f"{self.kind} {self.source} {policy}{self._confidence}"


@dataclass
class BenchRow:
    config: BenchConfig
    num_prompts: int = 0
    num_new_tokens: int = 0
    elapsed_s: float = 0.0
    num_drafted: int = 0
    num_accepted: int = 0
    target_forwards: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0
    same_as_ar: int | None = None
    outputs: list[list[int]] = field(default_factory=list)
    # Plain decoding rows (ours, llama.cpp): time until each prompt's first new token.
    first_token_s: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first per second after the first: decoding without the prompt's
        prefill (known for plain decoding rows only)."""
        if self.first_token_s is None or self.elapsed_s <= self.first_token_s:
            return None
        return (self.num_new_tokens - self.num_prompts) / (self.elapsed_s - self.first_token_s)

    def count_same(self, other: BenchRow) -> int:
        """Prompts on which `other` produced exactly this row's tokens."""
        return sum(a == b for a, b in zip(self.outputs, other.outputs, strict=True))

    def summary(self, ar_tokens_per_second: float) -> dict[str, Any]:
        spec = self.config.kind in ("draft", "ngram", "cross")
        return {
            "label": self.config.label,
            **asdict(self.config),
            "num_prompts": self.num_prompts,
            "num_new_tokens": self.num_new_tokens,
            "elapsed_s": round(self.elapsed_s, 3),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 3)
            if self.decode_tokens_per_second is not None else None,
            "speedup": round(self.tokens_per_second / ar_tokens_per_second, 3)
            if ar_tokens_per_second > 0 else None,
            "acceptance_rate": round(self.num_accepted / self.num_drafted, 4)
            if spec and self.num_drafted else None,
            "tokens_per_target_forward": round(self.num_new_tokens / self.target_forwards, 3)
            if spec and self.target_forwards else None,
            "num_drafted": self.num_drafted if spec else None,
            "num_accepted": self.num_accepted if spec else None,
            "draft_s": round(self.draft_s, 3) if spec else None,
            "target_s": round(self.target_s, 3) if spec else None,
            "same_as_ar": self.same_as_ar,
        }
