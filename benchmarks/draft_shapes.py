"""Which draft shape to distil: cost and untrained agreement of pruned siblings.

A draft trained for its target is a pretrained sibling (same tokenizer) cut down to a few
of its blocks and a head over the frequent tokens (`training.draft.prune`). Before any
training, this measures for each candidate what decides whether it can pay: its decode
step's cost as a fraction of the target's (`c`, which the speedup formula divides by) and
its teacher-forced agreement with the target as it starts (`draftlm eval acceptance`'s
figures). Training then raises the agreement; it does not change the cost.

    python benchmarks/draft_shapes.py --target qwen2.5-coder-1.5b \
        --sibling qwen2.5-coder-0.5b --data runs/python-local-qwen --quantize int8 \
        --layers all 0,1,2,3,20,21,22,23 0,1,2,21,22,23 0,1,22,23 \
        --head-vocab-size 32768 "$(python -c 'import textwrap; print(textwrap.__file__)')"
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from draftlm.data.loader import PackedTokens
from draftlm.eval.acceptance import acceptance_report, read_texts
from draftlm.load import LM, load
from draftlm.quant.layers import quantize_model
from draftlm.training.draft import frequent_tokens, prune, token_counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="held-out text to score agreement on")
    p.add_argument("--target", required=True)
    p.add_argument("--sibling", required=True, help="pretrained model to prune")
    p.add_argument("--data", required=True, help="prepared folder: token frequencies")
    p.add_argument("--layers", nargs="+", default=["all"],
                   help="candidates: 'all' or comma-separated blocks to keep")
    p.add_argument("--head-vocab-size", type=int, default=32768)
    p.add_argument("--count-tokens", type=int, default=20_000_000,
                   help="training tokens counted for the head's frequencies")
    p.add_argument("--quantize", default="int8", help="of the target and the drafts")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    target = load(args.target, dtype="float32", quantize=args.quantize)
    sibling = load(args.sibling, dtype="float32")
    data = PackedTokens(args.data, "train")
    tokens = torch.from_numpy(data.read(0, min(args.count_tokens, data.num_tokens)))
    counts = token_counts([tokens], sibling.config.vocab_size)
    head_ids = frequent_tokens(counts, args.head_vocab_size, sibling.config.eos_ids)
    coverage = float(counts[head_ids].sum() / counts.sum())
    texts = read_texts(args.files)
    rows = []
    for spec in args.layers:
        layers = None if spec == "all" else [int(i) for i in spec.split(",")]
        start = time.perf_counter()
        model = prune(sibling.model, layers, head_ids).eval()
        # Counted before quantizing (quantized layers hold buffers, not parameters); the
        # embedding is read one row per token, so the per-token cost is in `matmul`.
        parameters = sum(p.numel() for p in model.parameters())
        matmul = parameters - model.embed_tokens.weight.numel()
        if args.quantize != "none":
            quantize_model(model, args.quantize)
        draft = LM(model, sibling.tokenizer, model.config, f"{args.sibling}[{spec}]")
        report = acceptance_report(target, draft, texts, args.window, args.max_tokens,
                                   show_progress=False)
        rows.append({
            "layers": spec, "n_layers": model.config.n_layers,
            "parameters_m": round(parameters / 1e6, 1),
            "matmul_parameters_m": round(matmul / 1e6, 1),
            "target_step_ms": report["target_step_ms"], "draft_step_ms": report["draft_step_ms"],
            "cost_ratio": report["cost_ratio"], "greedy_match": report["greedy_match"],
            "alpha": report["alpha"], "best_speedup": report["best_speedup"]["greedy_match"],
            "best_k": report["best_k"]["greedy_match"],
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nhead: {args.head_vocab_size} tokens cover {coverage:.4f} of "
          f"{len(tokens):,} training tokens; target {args.target} {args.quantize}\n")
    print("| layers | blocks | params (M) | matmul params (M) | draft step ms | target step ms "
          "| c | greedy match | alpha | best speedup (k) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['n_layers']} | {r['parameters_m']} "
              f"| {r['matmul_parameters_m']} | {r['draft_step_ms']} "
              f"| {r['target_step_ms']} | {r['cost_ratio']} | {r['greedy_match']} "
              f"| {r['alpha']} | {r['best_speedup']} ({r['best_k']}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head_vocab_size": args.head_vocab_size, "coverage": coverage,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
