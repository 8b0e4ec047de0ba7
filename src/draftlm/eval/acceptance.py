"""How often a draft model's guesses would survive its target, measured without generating.

Every position of held-out text (tokenized with the target's tokenizer) is scored by one
teacher-forced forward pass of each model per window, and the two next-token
distributions are compared there: the target's p and the draft's q.

- greedy match: argmax q == argmax p, the chance that greedy speculative decoding keeps a
  drafted token;
- alpha = sum_x min(p(x), q(x)) = 1 - total variation(p, q), the chance that speculative
  sampling keeps a token drawn from q, at temperature 1 and at a chosen temperature;
- from an acceptance rate a and the draft's cost c per token (one cached decode step of
  the draft over one of the target), the expected tokens per verify round and speedup
  for k drafted tokens, as if every position were accepted independently with rate a.

Windows do not overlap: a position's context is what precedes it in its window, so the
first positions of a window see little (as at the start of a short prompt). A text is
preceded by the token perplexity scores it after (BOS, or EOS for models without one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor

from draftlm.errors import DraftlmError
from draftlm.eval import eval_subparsers
from draftlm.eval.perplexity import context_prefix
from draftlm.load import LM, load
from draftlm.model import Transformer
from draftlm.options import add_load_flags
from draftlm.quant.layers import QUANTIZE_MODES
from draftlm.sampling import SamplingParams, logits_to_probs
from draftlm.speculative import load_draft
from draftlm.speculative.drafters import fit_vocab, vocab_compatible
from draftlm.speculative.feature_head import (
    FeatureHead,
    HeadStep,
    is_feature_head,
    load_feature_head,
)

# The figures per position, in the order `position_acceptance` stacks them.
RATES = ("greedy_match", "alpha", "alpha_at_temperature")

# Logit rows compared at once: bounds the float32 temporaries (p, q, their minimum) to a
# few hundred MB even for a 150k-token vocabulary.
CHUNK_ELEMENTS = 1 << 25


# ---- metrics: pure functions over logits ---------------------------------------------
def expected_acceptance(p: Tensor, q: Tensor) -> Tensor:
    """sum_x min(p(x), q(x)) over the last dimension."""
    # Leviathan et al. 2023, section 3.1: a token x ~ q is kept with probability
    # min(1, p(x)/q(x)), so beta = E_q[min(1, p/q)] = sum_x min(p(x), q(x)) = 1 - D_TV(p, q).
    return torch.minimum(p, q).sum(-1)


def position_acceptance(target_logits: Tensor, draft_logits: Tensor, temperature: float,
                        head_token_ids: Tensor | None = None) -> Tensor:
    """[..., 3] per position: greedy match (0/1), alpha at temperature 1, alpha at
    `temperature` (p and q both at it; 0 is greedy, where alpha is the greedy match).
    `head_token_ids`: the draft's truncated head (see `fit_vocab`)."""
    draft_logits = fit_vocab(draft_logits, target_logits.shape[-1], head_token_ids)
    p, q = target_logits.float().softmax(-1), draft_logits.float().softmax(-1)
    greedy = (p.argmax(-1) == q.argmax(-1)).float()
    alpha = expected_acceptance(p, q)
    del p, q
    params = SamplingParams(temperature=temperature)
    alpha_t = expected_acceptance(logits_to_probs(target_logits, params),
                                  logits_to_probs(draft_logits, params))
    return torch.stack((greedy, alpha, alpha_t), dim=-1)


def acceptance_sums(target_logits: Tensor, draft_logits: Tensor, temperature: float,
                    head_token_ids: Tensor | None = None) -> Tensor:
    """`position_acceptance` summed over the positions of [T, V] logits: float64 [3], on
    their device (no host sync), computed a chunk of rows at a time."""
    rows = max(1, CHUNK_ELEMENTS // target_logits.shape[-1])
    total = torch.zeros(len(RATES), dtype=torch.float64, device=target_logits.device)
    for start in range(0, target_logits.shape[0], rows):
        per_position = position_acceptance(target_logits[start : start + rows],
                                           draft_logits[start : start + rows], temperature,
                                           head_token_ids)
        total += per_position.sum(0, dtype=torch.float64)
    return total


def tokens_per_round(rate: float, num_draft_tokens: int) -> float:
    """Expected tokens a verify round yields with k drafted tokens, each accepted with
    probability `rate` independently of the others: (1 - a^(k+1)) / (1 - a)."""
    k = num_draft_tokens
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def expected_speedup(rate: float, num_draft_tokens: int, cost_ratio: float) -> float:
    """Leviathan et al.'s walltime improvement (1 - a^(k+1)) / ((1 - a)(k c + 1)): a round
    costs k draft steps and one target pass, taken to cost one target decode step."""
    return tokens_per_round(rate, num_draft_tokens) / (num_draft_tokens * cost_ratio + 1.0)


# ---- measuring ------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_step_seconds(models: Sequence[Transformer], contexts: Sequence[Tensor],
                        num_steps: int = 10, num_warmup: int = 3) -> list[float]:
    """Median wall time of each model's one-token cached decode step that feeds the last
    of its context [T] after the others: the same position each time (rolled back in
    O(1)), after `num_warmup` untimed steps. The models take turns step by step, so that a
    machine busy with other work slows them alike and their ratio stays fair."""
    if num_steps < 1:
        raise DraftlmError(f"need at least one timed step, got {num_steps}")
    times: list[list[float]] = [[] for _ in models]
    try:
        for model, ids in zip(models, contexts, strict=True):
            model.setup_cache(1, ids.numel())
            model(ids[None, :-1], start_pos=0)
        for i in range(num_warmup + num_steps):
            for model, ids, seconds in zip(models, contexts, times, strict=True):
                n = ids.numel()
                model.rollback(n - 1)
                synchronize(ids.device)
                start = time.perf_counter()
                model(ids[None, -1:], start_pos=n - 1)
                synchronize(ids.device)
                if i >= num_warmup:
                    seconds.append(time.perf_counter() - start)
    finally:
        for model in models:
            model.clear_cache()
    return [statistics.median(seconds) for seconds in times]


@dataclass
class FileAcceptance:
    """Summed figures of one text: divide by `num_positions` for the rates."""

    name: str
    num_positions: int
    sums: list[float]  # in the order of RATES

    def rates(self) -> dict[str, float]:
        return {r: s / self.num_positions for r, s in zip(RATES, self.sums, strict=True)}


def draft_logits(draft: Transformer | FeatureHead, ids: Tensor, target_features: Tensor) -> Tensor:
    """The draft's logits [T, V_draft] at every position of `ids` [1, T], teacher-forced. A
    feature head's position j reads the target's feature h_{j-1} (zeros at the window's
    first position, which has none) and token x_j, so it predicts what the target's
    position j predicts: x_{j+1}."""
    if isinstance(draft, FeatureHead):
        previous = torch.cat((torch.zeros_like(target_features[:, :1]),
                              target_features[:, :-1]), dim=1)
        return draft(ids, previous)[1][0]
    return draft(ids)[0]


@torch.inference_mode()
def score_ids(target: Transformer, draft: Transformer | FeatureHead, ids: Sequence[int],
              window: int, temperature: float, progress: Progress | None = None,
              description: str = "acceptance") -> Tensor:
    """Acceptance sums ([3], see `acceptance_sums`) over the positions after each of `ids`,
    one forward pass of each model per window of `window` ids."""
    device = target.embed_tokens.weight.device
    seq = torch.tensor(ids, dtype=torch.long, device=device)
    # A target-only id (beyond a prefix vocabulary) reaches the draft as token 0, as in
    # ModelDrafter.
    draft_seq = seq.masked_fill(seq >= draft.config.vocab_size, 0)
    total = torch.zeros(len(RATES), dtype=torch.float64, device=device)
    task = progress.add_task(description, total=len(ids)) if progress is not None else None
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        features = target.features(seq[None, start:end])
        target_logits = target.lm_head(features)[0]
        total += acceptance_sums(target_logits,
                                 draft_logits(draft, draft_seq[None, start:end], features),
                                 temperature, draft.head_token_ids)
        if progress is not None and task is not None:
            progress.advance(task, end - start)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return total


def read_texts(files: Sequence[str]) -> list[tuple[str, str]]:
    texts = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise DraftlmError(f"no file {path}; pass text files to score")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DraftlmError(f"{path} is not UTF-8 text") from err
        if not text.strip():
            raise DraftlmError(f"{path} holds no text to score")
        texts.append((str(path), text))
    return texts


def check_arguments(window: int, max_tokens: int | None, temperature: float,
                    timing_steps: int, timing_context: int, max_draft_tokens: int) -> None:
    if window < 1:
        raise DraftlmError(f"--window must be >= 1, got {window}")
    if max_tokens is not None and max_tokens < 1:
        raise DraftlmError(f"--max-tokens must be >= 1 (positions to score), got {max_tokens}")
    if timing_steps < 0:
        raise DraftlmError(f"--timing-steps must be >= 0, got {timing_steps}")
    if timing_context < 2:
        raise DraftlmError(f"--timing-context must be >= 2, got {timing_context}")
    if max_draft_tokens < 1:
        raise DraftlmError(f"--max-draft-tokens must be >= 1, got {max_draft_tokens}")
    SamplingParams(temperature=temperature)  # a negative temperature is a one-line error


def check_pair(target: LM, draft: LM, window: int) -> None:
    if not vocab_compatible(target.tokenizer, draft.tokenizer):
        raise DraftlmError(
            f"draft {draft.name} has another tokenizer than target {target.name} "
            f"({draft.tokenizer.vocab_size} vs {target.tokenizer.vocab_size} tokens); "
            "teacher-forced acceptance needs a draft with the target's vocabulary")
    for lm in (target, draft):
        if window > lm.config.max_seq_len:
            raise DraftlmError(f"--window {window} exceeds the context of {lm.name} "
                               f"({lm.config.max_seq_len})")


def acceptance_report(target: LM, draft: LM | FeatureHead, texts: Sequence[tuple[str, str]],
                      window: int, max_tokens: int | None = None, temperature: float = 0.7,
                      timing_steps: int = 10, timing_context: int = 256,
                      max_draft_tokens: int = 8, show_progress: bool = True,
                      draft_name: str = "feature-head") -> dict[str, Any]:
    """The figures of `draftlm eval acceptance` for loaded models and (name, text) pairs.
    `draft` is a draft model or a feature head loaded on `target` (`draft_name` names it);
    a head's figures are those of its first drafted token (read from true features)."""
    check_arguments(window, max_tokens, temperature, timing_steps, timing_context,
                    max_draft_tokens)
    if isinstance(draft, FeatureHead):
        draft_model: Transformer | FeatureHead = draft
        timed: Transformer | HeadStep = HeadStep(draft)
        draft_quantization = getattr(draft, "quantization", "none")
        check_pair(target, target, window)
    else:
        check_pair(target, draft, window)
        draft_model = timed = draft.model
        draft_name, draft_quantization = draft.name, draft.quantization
    prefix = context_prefix(target)
    remaining = max_tokens
    files: list[FileAcceptance] = []
    start = time.perf_counter()
    with Progress(transient=True, disable=not show_progress) as progress:
        for name, text in texts:
            if remaining == 0:
                break
            # The positions after the prefix and every text token but the last: each
            # predicts a token of the text.
            ids = [prefix, *target.tokenizer.encode(text, add_bos=False)][:-1]
            ids = ids[:remaining]
            sums = score_ids(target.model, draft_model, ids, window, temperature, progress,
                             description=Path(name).name)
            files.append(FileAcceptance(name, len(ids), sums.tolist()))
            if remaining is not None:
                remaining -= len(ids)
    scoring_s = time.perf_counter() - start
    num_positions = sum(f.num_positions for f in files)
    rates = {r: sum(f.sums[i] for f in files) / num_positions for i, r in enumerate(RATES)}
    ks = list(range(1, max_draft_tokens + 1))
    report: dict[str, Any] = {
        "target": target.name, "draft": draft_name, "dtype": str(target.dtype).removeprefix(
            "torch."), "quantize": target.quantization, "draft_quantize": draft_quantization,
        "window": window, "num_positions": num_positions, "num_files": len(files),
        "temperature": temperature, **{r: round(v, 5) for r, v in rates.items()},
        "scoring_s": round(scoring_s, 3),
        "positions_per_second": round(num_positions / scoring_s, 1) if scoring_s > 0 else 0.0,
        "ks": ks,
        "tokens_per_round": {r: [round(tokens_per_round(a, k), 4) for k in ks]
                             for r, a in rates.items()},
    }
    if timing_steps > 0:
        context = [prefix, *target.tokenizer.encode(texts[0][1], add_bos=False)]
        context = context[: min(timing_context, window)]
        contexts = []
        for config in (target.config, draft_model.config):
            ids = torch.tensor(context, device=target.device)
            contexts.append(ids.masked_fill(ids >= config.vocab_size, 0))
        target_s, draft_s = decode_step_seconds([target.model, timed], contexts, timing_steps)
        cost = draft_s / target_s
        speedups = {r: [expected_speedup(a, k, cost) for k in ks] for r, a in rates.items()}
        report |= {
            "timing_context": len(context),
            "target_step_ms": round(1e3 * target_s, 3),
            "draft_step_ms": round(1e3 * draft_s, 3),
            "cost_ratio": round(cost, 4),
            "speedup": {r: [round(s, 4) for s in v] for r, v in speedups.items()},
            "best_k": {r: ks[max(range(len(ks)), key=v.__getitem__)]
                       for r, v in speedups.items()},
        }
        report["best_speedup"] = {r: round(max(v), 4) for r, v in speedups.items()}
    report["files"] = [{"name": f.name, "num_positions": f.num_positions,
                        **{r: round(v, 5) for r, v in f.rates().items()}} for f in files]
    return report


def print_report(report: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"{report['draft']} drafting for {report['target']}: {report['num_positions']} "
        f"positions, window {report['window']}, {report['scoring_s']:.1f} s "
        f"({report['positions_per_second']:g} positions/s)\n"
        f"greedy match {report['greedy_match']:.4f}   alpha (t=1) {report['alpha']:.4f}   "
        f"alpha (t={report['temperature']:g}) {report['alpha_at_temperature']:.4f}")
    if "cost_ratio" in report:
        console.print(f"decode step: target {report['target_step_ms']:.2f} ms, draft "
                      f"{report['draft_step_ms']:.2f} ms, cost ratio c = "
                      f"{report['cost_ratio']:.3f}")
    table = Table(title="expected tokens per round (speedup), independent acceptances")
    table.add_column("k", justify="right")
    labels = {"greedy_match": "greedy", "alpha": "sampled t=1",
              "alpha_at_temperature": f"sampled t={report['temperature']:g}"}
    for label in labels.values():
        table.add_column(label, justify="right")
    for i, k in enumerate(report["ks"]):
        cells = []
        for rate in RATES:
            cell = f"{report['tokens_per_round'][rate][i]:.2f}"
            if "speedup" in report:
                best = report["best_k"][rate] == k
                cell += f" ({report['speedup'][rate][i]:.2f}x{'*' if best else ''})"
            cells.append(cell)
        table.add_row(str(k), *cells)
    console.print(table)


def write_report(report: dict[str, Any], out: str) -> None:
    """JSON, or one more line of a .jsonl file (runs accumulate)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if out.endswith(".jsonl"):
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(report) + "\n")
    else:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


def cmd_acceptance(
    target: str,
    draft: str,
    files: Sequence[str],
    max_tokens: int | None = None,
    window: int = 1024,
    temperature: float = 0.7,
    timing_steps: int = 10,
    timing_context: int = 256,
    max_draft_tokens: int = 8,
    out: str | None = None,
    json_output: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    quantize: str = "none",
    draft_quantize: str | None = None,
) -> dict[str, Any]:
    """`draftlm eval acceptance`: teacher-forced agreement of `draft` with `target` on
    `files`, and the speculative speedup it predicts.

    `dtype`, `quantize` and `draft_quantize` should be those of the speculative run being
    predicted: the cost ratio is measured with them (float32 by default, as perplexity:
    bfloat16 activations may be slower than float32 ones in the int8 kernels)."""
    check_arguments(window, max_tokens, temperature, timing_steps, timing_context,
                    max_draft_tokens)
    texts = read_texts(files)
    target_lm = load(target, dtype=dtype, device=device, quantize=quantize)
    draft_quantize = quantize if draft_quantize is None else draft_quantize
    drafting: LM | FeatureHead = (
        load_feature_head(draft, target_lm, draft_quantize) if is_feature_head(draft)
        else load_draft(draft, dtype, device, draft_quantize))
    report = acceptance_report(target_lm, drafting, texts, window, max_tokens, temperature,
                               timing_steps, timing_context, max_draft_tokens,
                               draft_name=Path(draft).name)
    if out is not None:
        write_report(report, out)
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `draftlm eval acceptance`."""
    p = eval_subparsers(subparsers).add_parser(
        "acceptance", help="teacher-forced acceptance rate of a draft model for its target")
    p.add_argument("files", nargs="+", help="UTF-8 text files (held-out text)")
    p.add_argument("--target", required=True, help="registry name, .gguf file or HF folder")
    p.add_argument("--draft", required=True, help="draft model with the target's vocabulary, "
                   "or a feature head trained for the target")
    p.add_argument("--max-tokens", type=int, help="positions to score in all (default: all)")
    p.add_argument("--window", type=int, default=1024, help="tokens per forward pass")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of the second alpha (the first is at 1)")
    p.add_argument("--timing-steps", type=int, default=10,
                   help="timed decode steps per model for the cost ratio (0: skip timing)")
    p.add_argument("--timing-context", type=int, default=256,
                   help="tokens of context before the timed decode step")
    p.add_argument("--max-draft-tokens", type=int, default=8,
                   help="tabulate draft lengths k = 1..this")
    p.add_argument("--out", help="write the figures to this JSON file (.jsonl: append a line)")
    p.add_argument("--json", dest="json_output", action="store_true",
                   help="print the figures as JSON instead of a table")
    add_load_flags(p, dtype="float32", compile_flag=False)
    p.add_argument("--draft-quantize", choices=QUANTIZE_MODES,
                   help="quantization of the draft model (default: --quantize)")
    p.set_defaults(func=cmd_acceptance)
