"""What a benchmark is asked to run (`BenchOptions`), each row of it (`BenchConfig`), and
what a row measured (`BenchRow`).

Shared by the bench command and the peer baselines (HF transformers, llama.cpp), which
report their rows in the same form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from draftlm.errors import DraftlmError
from draftlm.load import DTYPES
from draftlm.options import DraftOptions, check_confidence, check_dtype, check_quantize, flag
from draftlm.quant.layers import QUANTIZE_MODES

PEERS = ("hf", "llama.cpp")


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

    def draft_options(self, draft_dtype: str | None = None,
                      draft_quantize: str | None = None) -> DraftOptions:
        """The drafter of one of our speculative rows (draft, ngram, cross)."""
        if self.kind not in ("draft", "ngram", "cross"):
            raise ValueError(f"a {self.kind} row has no drafter of ours")
        return DraftOptions(
            draft=None if self.kind == "ngram" else self.source,
            ngram=int(str(self.source)) if self.kind == "ngram" else None,
            num_draft_tokens=self.num_draft_tokens, adaptive=self.adaptive,
            draft_dtype=draft_dtype, draft_quantize=draft_quantize,
            cross_tokenizer=self.kind == "cross", min_confidence=self.min_confidence,
        )


def plan(
    drafts: Sequence[str], ngrams: Sequence[int], cross_drafts: Sequence[str],
    ks: Sequence[int], policies: Sequence[bool], confidences: Sequence[float] = (),
) -> list[BenchConfig]:
    """AR first (the baseline), then every drafter x k x policy (x each confidence
    threshold, and none, for draft models)."""
    configs = [BenchConfig("ar")]
    sources = [("draft", d) for d in drafts] + [("ngram", str(n)) for n in ngrams]
    sources += [("cross", d) for d in cross_drafts]
    for kind, source in sources:
        thresholds = [None, *confidences] if kind == "draft" else [None]
        for threshold in thresholds:
            for adaptive in policies:
                configs += [BenchConfig(kind, source, k, adaptive, threshold) for k in ks]
    return configs


@dataclass(frozen=True)
class ARVariant:
    """An extra AR row of the target: its dtype, quantization, and compiled decode step."""

    dtype: str
    quantize: str = "none"
    compiled: bool = False

    @property
    def label(self) -> str:
        parts = [self.dtype] + [self.quantize] * (self.quantize != "none")
        return "+".join(parts + ["compile"] * self.compiled)


def parse_variant(variant: str, default_dtype: str) -> ARVariant:
    """`bfloat16`; `int8` (default dtype); `float32+int4`; `int8+compile` (compiled step)."""
    dtype, quantize, compiled = default_dtype, "none", False
    for part in variant.split("+"):
        if part in QUANTIZE_MODES:
            quantize = part
        elif part in DTYPES or part == "auto":
            dtype = part
        elif part == "compile":
            compiled = True
        else:
            raise DraftlmError(f"--also-ar {variant!r}: {part!r} is neither a dtype "
                               f"({', '.join(DTYPES)}), a quantization "
                               f"({', '.join(QUANTIZE_MODES)}) nor 'compile'")
    return ARVariant(dtype, quantize, compiled)


def parse_ks(k: str | Sequence[int]) -> list[int]:
    try:
        ks = [int(x) for x in k.split(",")] if isinstance(k, str) else [int(x) for x in k]
    except ValueError as err:
        raise DraftlmError(f"--k takes comma-separated integers, got {k!r}") from err
    if not ks or min(ks) < 1:
        raise DraftlmError(f"draft lengths must be >= 1, got {k!r}")
    return ks


@dataclass
class BenchOptions:
    """What `draftlm bench` runs beside plain decoding of the target: which drafters at
    which draft lengths, on which prompts, and which extra rows (AR at other precisions,
    peers). How the target loads is `LoadOptions`."""

    drafts: Sequence[str] = field(default=(), metadata=flag("--draft", action="append"))
    """draft model (repeatable)"""
    ngrams: Sequence[int] = field(default=(), metadata=flag("--ngram", action="append",
                                                             type=int))
    """prompt-lookup drafting with this n-gram size (repeatable)"""
    cross_drafts: Sequence[str] = field(default=(), metadata=flag("--cross-draft",
                                                                   action="append"))
    """draft model with another tokenizer (repeatable)"""
    draft_lengths: str | Sequence[int] = field(default="1,3,5,8", metadata=flag("--k"))
    """draft lengths, comma-separated (a tuple of ints once checked)"""
    fixed: bool = False
    """run fixed draft lengths"""
    adaptive: bool = False
    """run adaptive draft lengths (the default; with --fixed: both)"""
    draft_confidences: Sequence[float] = field(default=(), metadata=flag(
        "--draft-confidence", action="append", type=float, metavar="P"))
    """also run each --draft stopping its draft once the draft's top probability falls
    under P (repeatable)"""
    limit: int | None = field(default=None, metadata=flag(type=int))
    """first N prompts (default: 5 HumanEval prompts, all of --prompts)"""
    prompts: str | None = None
    """.jsonl/.json prompts file instead of HumanEval"""
    max_new_tokens: int = field(default=128, metadata=flag(type=int))
    """new tokens per prompt"""
    temperature: float = field(default=0.0, metadata=flag(type=float))
    """0 = greedy"""
    seed: int = field(default=0, metadata=flag(type=int))
    """sampling seed of every row"""
    draft_dtype: str | None = None
    """dtype of the draft models (default: --dtype)"""
    draft_quantize: str | None = field(default=None, metadata=flag(choices=QUANTIZE_MODES))
    """quantization of the draft models (default: --quantize)"""
    also_ar: Sequence[str] = field(default=(), metadata=flag(action="append",
                                                             metavar="VARIANT"))
    """an extra AR row of the target at another precision: DTYPE, QUANT or DTYPE+QUANT,
    +compile for a compiled decode step (e.g. bfloat16, int8, float32+int4, int8+compile);
    repeatable"""
    peers: Sequence[str] = field(default=(), metadata=flag("--peer", action="append",
                                                           choices=PEERS))
    """add a peer's rows to the same run: hf (transformers' plain and assisted generation),
    llama.cpp (llama-cpp-python on the same GGUF); repeatable"""
    out: str = "runs/bench"
    """folder for JSON, markdown, PNG"""
    threads: int | None = field(default=None, metadata=flag(type=int))
    """torch intra-op threads (default: torch's)"""

    def __post_init__(self) -> None:
        # Flags arrive as lists, Python callers may pass tuples: the same options compare
        # equal either way.
        self.draft_lengths = tuple(parse_ks(self.draft_lengths))
        for name in ("drafts", "ngrams", "cross_drafts", "draft_confidences", "also_ar",
                     "peers"):
            setattr(self, name, tuple(getattr(self, name)))
        for threshold in self.draft_confidences:
            check_confidence(threshold)
        if self.draft_confidences and not self.drafts:
            raise DraftlmError("--draft-confidence needs a draft model (--draft)")
        if self.max_new_tokens < 1:
            raise DraftlmError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise DraftlmError(f"--threads must be >= 1, got {self.threads}")
        for name in self.peers:
            if name not in PEERS:
                raise DraftlmError(f"--peer takes {' or '.join(PEERS)}, got {name!r}")
        check_dtype(self.draft_dtype, "--draft-dtype")
        check_quantize(self.draft_quantize, "--draft-quantize")
        for variant in self.also_ar:
            parse_variant(variant, "auto")
        # Each drafter row's own checks (n-gram size ...), before the first (long) run.
        for config in self.configs()[1:]:
            config.draft_options(self.draft_dtype, self.draft_quantize)

    @property
    def draft_models(self) -> list[str]:
        """Every draft model to load once: same-tokenizer and cross-tokenizer ones."""
        return list(dict.fromkeys([*self.drafts, *self.cross_drafts]))

    @property
    def prompt_limit(self) -> int | None:
        """5 HumanEval prompts by default, every prompt of a --prompts file."""
        return 5 if self.limit is None and self.prompts is None else self.limit

    @property
    def policies(self) -> list[bool]:
        """Adaptive (True) unless only --fixed, both with --fixed --adaptive."""
        return [True] * (self.adaptive or not self.fixed) + [False] * self.fixed

    def configs(self) -> list[BenchConfig]:
        return plan(self.drafts, self.ngrams, self.cross_drafts, self.draft_lengths,
                    self.policies, self.draft_confidences)


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
    error: str | None = None  # a peer that crashed: why its row is empty

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

    def count_same(self, other: BenchRow) -> int | None:
        """Prompts on which `other` produced exactly this row's tokens (None: `other` has
        no outputs, a peer that crashed)."""
        if other.error is not None:
            return None
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
            **({"error": self.error} if self.error else {}),
        }
