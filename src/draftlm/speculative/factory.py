"""The drafter a command's flags ask for: a draft model (same or another tokenizer) or
prompt lookup, checked before anything slow happens."""

from __future__ import annotations

import torch

from draftlm.errors import DraftlmError
from draftlm.load import LM, load
from draftlm.options import check_confidence
from draftlm.speculative.drafters import (
    CrossTokenizerDrafter,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    vocab_compatible,
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
    try:
        return load(draft, dtype=dtype, device=device, quantize=quantize,
                    compile_step=compile_step)
    except (DraftlmError, OSError, ValueError, KeyError) as err:
        raise DraftlmError(f"cannot load draft model {draft!r}: {err}") from err


def drafter_from_flags(
    lm: LM,
    draft: str | None,
    ngram: int | None,
    num_draft_tokens: int = 5,
    adaptive: bool = True,
    dtype: str = "auto",
    draft_dtype: str | None = None,
    quantize: str = "none",
    draft_quantize: str | None = None,
    device: str = "cpu",
    cross_tokenizer: bool = False,
    compile_mode: str = "none",
    min_confidence: float | None = None,
) -> Drafter | None:
    """The drafter the flags ask for, or None for plain decoding (commands check
    `compile_mode` and `min_confidence` with `check_compile_mode` before loading anything)."""
    if draft is None and ngram is None:
        return None
    return build_drafter(
        lm, draft=draft, ngram=ngram, num_draft_tokens=num_draft_tokens, adaptive=adaptive,
        dtype=draft_dtype or dtype, device=device, cross_tokenizer=cross_tokenizer,
        quantize=draft_quantize or quantize, compile_step=compile_mode in ("draft", "all"),
        min_confidence=min_confidence,
    )
