"""The drafter that `DraftOptions` ask for: a draft model (same or another tokenizer) or
prompt lookup. Every command builds its drafter here, so a draft model loads, and its
tokenizer is checked against the target's, in one way only."""

from __future__ import annotations

from pathlib import Path

import torch

from draftlm.errors import DraftlmError
from draftlm.load import LM, load
from draftlm.options import LOAD_DEFAULTS, DraftOptions, LoadOptions
from draftlm.speculative.drafters import (
    CrossTokenizerDrafter,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    vocab_compatible,
)
from draftlm.speculative.feature_head import (
    FeatureDrafter,
    is_feature_head,
    load_feature_head,
)


def load_with_drafter(
    model: str, load_options: LoadOptions, draft_options: DraftOptions
) -> tuple[LM, Drafter | None]:
    """Load the target and the drafter the options ask for (None: plain decoding).

    `--compile draft` without a draft model fails before either loads."""
    load_options.check_draft_model(draft_options.draft)
    lm = load(model, dtype=load_options.dtype, device=load_options.device,
              quantize=load_options.quantize, compile_step=load_options.compile_target,
              cuda_graphs=load_options.cuda_graphs)
    return lm, drafter_from_options(lm, draft_options, load_options)


def drafter_from_options(
    lm: LM,
    draft_options: DraftOptions,
    load_options: LoadOptions = LOAD_DEFAULTS,
    draft_lm: LM | None = None,
) -> Drafter | None:
    """The drafter `draft_options` ask for, or None for plain decoding.

    A draft model loads like the target (`load_options`) unless the options give it its
    own dtype or quantization; `draft_lm` passes one already loaded (benchmarks reuse one
    across configurations). A draft whose vocabulary is not the target's needs
    `cross_tokenizer`."""
    if draft_options.ngram is not None:
        return NgramDrafter(draft_options.ngram, draft_options.num_draft_tokens,
                            draft_options.adaptive)
    if draft_options.draft is None:
        return None
    if draft_lm is None and is_feature_head(draft_options.draft):
        if draft_options.cross_tokenizer:
            raise DraftlmError("a feature head drafts from its target's features: it cannot "
                               "use --cross-tokenizer")
        quantize = draft_options.draft_quantize or load_options.quantize
        head = load_feature_head(draft_options.draft, lm, quantize)
        return FeatureDrafter(head, lm, draft_options.num_draft_tokens, draft_options.adaptive,
                              draft_options.min_confidence,
                              name=Path(draft_options.draft).name)
    if draft_lm is None:
        draft_lm = load_draft_model(draft_options.draft, load_options,
                                    draft_options.draft_dtype, draft_options.draft_quantize)
    if draft_options.cross_tokenizer:
        return CrossTokenizerDrafter(draft_lm, lm, draft_options.num_draft_tokens,
                                     draft_options.adaptive)
    check_same_tokenizer(lm, draft_lm, "--cross-tokenizer")
    return ModelDrafter(draft_lm, lm, draft_options.num_draft_tokens, draft_options.adaptive,
                        draft_options.min_confidence)


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
    """A drafter from keyword arguments, for Python callers: `draft` (a model name/path),
    `draft_lm` (a loaded draft model) or `ngram` (size), checked as `DraftOptions` are.

    `dtype`, `device`, `quantize` and `compile_step` say how `draft` loads."""
    if (draft is None and draft_lm is None) == (ngram is None):
        raise DraftlmError("speculative decoding needs exactly one of --draft or --ngram")
    options = DraftOptions(
        draft=draft_lm.name if draft_lm is not None else draft, ngram=ngram,
        num_draft_tokens=num_draft_tokens, adaptive=adaptive, cross_tokenizer=cross_tokenizer,
        min_confidence=min_confidence,
    )
    load_options = LoadOptions(dtype="auto" if dtype is None else dtype, device=device,
                               quantize=quantize, compile_mode="draft" if compile_step else "none")
    drafter = drafter_from_options(lm, options, load_options, draft_lm=draft_lm)
    assert drafter is not None  # a draft or an n-gram size was given
    return drafter


def check_same_tokenizer(lm: LM, draft_lm: LM, remedy: str) -> None:
    """A draft model proposes the target's token ids only if it shares its vocabulary;
    `remedy` is the flag that drafts through text instead."""
    if not vocab_compatible(lm.tokenizer, draft_lm.tokenizer):
        raise DraftlmError(
            f"draft {draft_lm.name} has another tokenizer than target {lm.name} "
            f"({draft_lm.tokenizer.vocab_size} vs {lm.tokenizer.vocab_size} tokens); "
            f"use cross-tokenizer drafting ({remedy})"
        )


def load_draft_model(draft: str, load_options: LoadOptions, dtype: str | None = None,
                     quantize: str | None = None) -> LM:
    """A draft model on the target's device, in the target's dtype and quantization unless
    `dtype` / `quantize` say otherwise, its step compiled under --compile draft or all."""
    return load_draft(draft, load_options.dtype if dtype is None else dtype,
                      load_options.device, load_options.quantize if quantize is None else quantize,
                      compile_step=load_options.compile_drafts,
                      cuda_graphs=load_options.cuda_graphs)


def load_draft(
    draft: str, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
    quantize: str = "none", compile_step: bool = False, cuda_graphs: bool = False,
) -> LM:
    """Load a draft model; any failure becomes one line that names the draft."""
    try:
        return load(draft, dtype=dtype, device=device, quantize=quantize,
                    compile_step=compile_step, cuda_graphs=cuda_graphs)
    except (DraftlmError, OSError, ValueError, KeyError) as err:
        raise DraftlmError(f"cannot load draft model {draft!r}: {err}") from err
