"""Perplexity and bits-per-byte of text files, with a sliding window over long texts.

A text longer than the window is scored in windows of `max_seq_len` tokens that move
`stride` tokens at a time; each window scores only the tokens no earlier window scored, so
every token is predicted once, with at least `max_seq_len - stride + 1` tokens of context
(HF's "perplexity of fixed-length models" recipe). Unlike that recipe, a window's input
ends one token before its last target, so stride == max_seq_len loses no token at the
window seams, and the last window also reaches back a full `max_seq_len`: with
stride == max_seq_len this is exactly lm-evaluation-harness's rolling log-likelihood.

Perplexity is per token, so it depends on the tokenizer; bits-per-byte (total NLL in bits
over the text's UTF-8 bytes) does not, and compares models with different vocabularies.
Every text token is scored: the text is preceded by BOS, or by EOS for models without one
(as lm-evaluation-harness does for rolling log-likelihoods).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track

from draftlm.errors import DraftlmError
from draftlm.eval import eval_subparsers
from draftlm.load import LM, load
from draftlm.model import Transformer
from draftlm.options import LoadOptions, add_flags

# Scores in float32 unless told otherwise: a score should not depend on the machine's dtype.
FLOAT32 = LoadOptions(dtype="float32")


@dataclass
class TextScore:
    """Summed negative log-likelihood of a text and what it is measured against."""

    name: str
    num_tokens: int
    num_bytes: int
    nll_nats: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.num_tokens) if self.num_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.num_bytes if self.num_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": round(self.perplexity, 4),
                "bits_per_byte": round(self.bits_per_byte, 5)}


def check_window(max_seq_len: int, stride: int, context: int) -> None:
    if not 1 <= stride <= max_seq_len:
        raise DraftlmError(f"need 1 <= --stride <= --max-seq-len, got stride={stride}, "
                           f"max_seq_len={max_seq_len}")
    if max_seq_len > context:
        raise DraftlmError(f"--max-seq-len {max_seq_len} exceeds the model's context {context}")


@torch.inference_mode()
def token_nlls(model: Transformer, ids: Sequence[int], max_seq_len: int, stride: int
               ) -> torch.Tensor:
    """NLL (nats, float32) of ids[1:], each predicted once by the sliding window."""
    check_window(max_seq_len, stride, model.config.max_seq_len)
    device = model.embed_tokens.weight.device
    seq = torch.tensor(ids, dtype=torch.long, device=device)
    last = len(ids) - 1  # targets are seq[1..last]
    out: list[torch.Tensor] = []
    scored = 0  # targets seq[1..scored] are done
    while scored < last:
        # The first window scores all it sees; later ones the next `stride` targets, each
        # window ending at its last target and reaching back a full `max_seq_len`.
        end = min(max_seq_len if scored == 0 else scored + stride, last)
        begin = max(0, end - max_seq_len)  # input seq[begin:end], targets seq[begin+1:end+1]
        logits = model(seq[None, begin:end])[0].float()
        nll = F.cross_entropy(logits, seq[begin + 1 : end + 1], reduction="none")
        out.append(nll[scored - end :])
        scored = end
    if not out:
        return torch.zeros(0)
    return torch.cat(out).cpu()


def context_prefix(lm: LM) -> int:
    """The token that every text is scored after: BOS where the model starts texts with it,
    else EOS (the document separator such models were trained with)."""
    tokenizer = lm.tokenizer
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        return tokenizer.bos_id
    candidates = (*tokenizer.eos_ids, *lm.config.eos_ids, tokenizer.bos_id)
    found = [t for t in candidates if t is not None]
    if not found:
        raise DraftlmError(f"{lm.name} has neither BOS nor EOS to start a text with")
    return found[0]


def score_text(lm: LM, text: str, max_seq_len: int, stride: int, name: str = "") -> TextScore:
    ids = [context_prefix(lm), *lm.tokenizer.encode(text, add_bos=False)]
    nlls = token_nlls(lm.model, ids, max_seq_len, stride)
    return TextScore(name, len(ids) - 1, len(text.encode("utf-8")), float(nlls.double().sum()))


def cmd_perplexity(
    model: str,
    files: Sequence[str],
    max_seq_len: int = 1024,
    stride: int = 512,
    out: str | None = None,
    load_options: LoadOptions = FLOAT32,
) -> dict[str, Any]:
    """`draftlm eval perplexity`: perplexity and bits-per-byte of `model` on `files`."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise DraftlmError(f"no file {path}; pass text files to score")
    lm = load(model, dtype=load_options.dtype, device=load_options.device,
              quantize=load_options.quantize)
    check_window(max_seq_len, stride, lm.config.max_seq_len)
    start = time.perf_counter()
    scores = []
    for path in track(paths, description=f"perplexity {lm.name}", transient=True):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DraftlmError(f"{path} is not UTF-8 text") from err
        scores.append(score_text(lm, text, max_seq_len, stride, name=str(path)))
    elapsed = time.perf_counter() - start
    total = TextScore("total", sum(s.num_tokens for s in scores),
                      sum(s.num_bytes for s in scores), sum(s.nll_nats for s in scores))
    report = {
        "model": lm.name, "max_seq_len": max_seq_len, "stride": stride, "dtype": str(lm.dtype),
        "quantize": lm.quantization,
        **{k: v for k, v in total.to_dict().items() if k != "name"},
        "num_files": len(scores), "elapsed_s": round(elapsed, 3),
        "tokens_per_second": round(total.num_tokens / elapsed, 1) if elapsed > 0 else 0.0,
        "files": [s.to_dict() for s in scores],
    }
    if out is not None:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "files"}, indent=2))
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `draftlm eval perplexity`."""
    p = eval_subparsers(subparsers).add_parser(
        "perplexity", help="perplexity and bits-per-byte of text files")
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF folder")
    p.add_argument("--max-seq-len", type=int, default=1024, help="tokens per window")
    p.add_argument("--stride", type=int, default=512, help="new tokens scored per window")
    p.add_argument("--out", help="write the report (with per-file figures) to this JSON file")
    add_flags(p, LoadOptions, "load_options", defaults={"dtype": FLOAT32.dtype},
              skip=("compile_mode",))
    p.set_defaults(func=cmd_perplexity)
