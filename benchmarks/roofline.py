"""Decode roofline: how close each model and precision gets to this machine's memory limit.

Decoding one token reads every weight of the linear layers once (embeddings: one row), so
tokens/s can never beat  memory bandwidth / bytes per token.  This script measures the
bandwidth (a large tensor summed by torch with the same threads as decoding), computes the
bytes per token of each model and precision, decodes with draftlm, and prints how close
each configuration gets.

    python benchmarks/roofline.py --models smollm2-135m qwen2.5-coder-1.5b \
        --modes float32 bfloat16 int8 int4 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn as nn

from draftlm.generate import generate
from draftlm.load import load
from draftlm.quant.layers import Int4Linear, Int8Linear

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def read_bandwidth_gb_s(size_mb: int = 1024, repeats: int = 5) -> float:
    """Best-of read bandwidth: sum a buffer far larger than any cache."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes a one-token decode step reads from the linear layers' weights."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int8Linear):
            total += module.in_features * module.out_features + 4 * module.out_features
        elif isinstance(module, Int4Linear):
            total += module.weight_bytes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    parser.add_argument("--modes", nargs="+", default=["float32", "bfloat16", "int8", "int4"],
                        help="float32 | bfloat16 | int8 | int4 (int8/int4: float32 activations); "
                             "+compile for a compiled decode step, e.g. int8+compile")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_gb_s()
    print(f"read bandwidth, {args.threads} threads: {bandwidth:.1f} GB/s\n")
    print("| model | weights | MB/token | roofline tok/s | measured tok/s | of roofline |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        for mode in args.modes:
            weights, _, suffix = mode.partition("+")
            quantize = weights if weights in ("int8", "int4", "int4-mixed") else "none"
            dtype = weights if quantize == "none" else "float32"
            lm = load(name, dtype=dtype, quantize=quantize, compile_step=suffix == "compile")
            per_token = weight_bytes_per_token(lm.model)
            generate(lm, PROMPT, max_new_tokens=4)  # warm-up (and the compile)
            result = generate(lm, PROMPT, max_new_tokens=args.tokens)
            # Decode speed alone: prefill is compute-bound and has its own limit.
            measured = result.stats["decode_tokens_per_second"]
            roof = bandwidth * 1e9 / per_token
            rows.append({"model": name, "mode": mode, "mb_per_token": per_token / 1e6,
                         "roofline_tok_s": roof, "measured_tok_s": measured,
                         "bandwidth_gb_s": bandwidth})
            print(f"| {name} | {mode} | {per_token / 1e6:.0f} | {roof:.1f} | {measured:.1f} | "
                  f"{measured / roof:.0%} |", flush=True)
            del lm
            gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
