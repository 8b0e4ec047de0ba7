"""Command-line flags shared by the commands that load a model and maybe a drafter.

`generate`, `serve`, `bench` and `eval` take the same loading and drafting flags; they are
declared once here so that their names, defaults and help never drift apart.
"""

from __future__ import annotations

import argparse

from draftlm.errors import DraftlmError
from draftlm.quant.layers import QUANTIZE_MODES

# Which models get a compiled one-token step (`Transformer.compile_decode_step`). "draft"
# keeps the target eager, so greedy speculative output stays bit-identical to eager AR;
# "all" also speeds up the target's own AR decoding, whose logits then match eager ones to
# float rounding only.
COMPILE_MODES = ("none", "draft", "all")


def add_load_flags(p: argparse.ArgumentParser, dtype: str = "auto",
                   compile_flag: bool = True) -> None:
    """--dtype, --device, --quantize (and --compile for commands that decode)."""
    p.add_argument("--dtype", default=dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="quantize the linear layers (CPU int8 / int4 kernels)")
    if compile_flag:
        p.add_argument("--compile", dest="compile_mode", default="none", choices=COMPILE_MODES,
                       help="torch.compile the one-token decode step of the draft model or of "
                            "all models (the first run on a machine compiles for minutes)")


def add_draft_flags(p: argparse.ArgumentParser) -> None:
    """--draft or --ngram, and how the drafter runs."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--draft", help="draft model for speculative decoding")
    group.add_argument("--ngram", type=int, help="prompt-lookup drafting with n-grams of this size")
    p.add_argument("--num-draft-tokens", type=int, default=5, help="draft length k")
    p.add_argument("--fixed", dest="adaptive", action="store_false",
                   help="keep the draft length fixed (default: adaptive)")
    p.add_argument("--draft-dtype", help="dtype of the draft model (default: --dtype)")
    p.add_argument("--draft-quantize", choices=QUANTIZE_MODES,
                   help="quantization of the draft model (default: --quantize)")
    p.add_argument("--cross-tokenizer", action="store_true",
                   help="the draft has another tokenizer: draft through re-tokenized text")
    add_confidence_flag(p)


def add_confidence_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-confidence", dest="min_confidence", type=float, metavar="P",
                   help="stop a draft once the draft model's top probability falls under P "
                        "(a token it is unsure of is likely rejected; default: never)")


def check_confidence(p: float) -> None:
    """A --draft-confidence is a probability strictly between 0 and 1."""
    if not 0 < p < 1:
        raise DraftlmError(f"--draft-confidence must be between 0 and 1, got {p}")


def check_compile_mode(compile_mode: str, draft: str | None,
                       min_confidence: float | None = None) -> None:
    """Reject --compile (and --draft-confidence) values that would do nothing, before any
    model loads."""
    if compile_mode not in COMPILE_MODES:
        raise DraftlmError(f"unknown --compile {compile_mode!r}; use one of "
                           f"{', '.join(COMPILE_MODES)}")
    if compile_mode == "draft" and draft is None:
        raise DraftlmError("--compile draft needs a draft model (--draft)")
    if min_confidence is not None:
        check_confidence(min_confidence)
        if draft is None:
            raise DraftlmError("--draft-confidence needs a draft model (--draft)")
