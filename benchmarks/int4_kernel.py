"""The int4 layer against the int8 layer (and fbgemm's int8, which draftlm's int8 kernel
replaced) on one model's linear shapes.

    python benchmarks/int4_kernel.py --threads 2

Prints, per row count (1 = a decode step, 4/6 = verify passes, 150 = a prompt's prefill),
the time of the model's seven projections of one layer in each mode and the weight bytes
per second they stream. Both modes run in the same process, alternating, so the ratio
holds on a noisy machine. The projections of `--blocks` different layers are run one after
another, as a model does: one 1.5B layer in int4 (30 MB) nearly fits a 32 MB L3 cache, and
timing it alone would measure the cache instead of memory.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from draftlm.config import PRESETS
from draftlm.quant import layers as quantize
from draftlm.quant.layers import Int4Linear, Int8Linear


def layers(name: str) -> list[tuple[int, int]]:
    """(in, out) of one block's fused projections: qkv, o, gate_up, down."""
    c = PRESETS[name]
    kv = c.n_kv_heads * c.head_dim
    return [(c.dim, c.dim + 2 * kv), (c.dim, c.dim), (c.dim, 2 * c.intermediate_size),
            (c.intermediate_size, c.dim)]


def timed(mods: list[nn.Module], xs: list[torch.Tensor], repeat: int) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            start = time.perf_counter()
            for mod, x in zip(mods, xs, strict=True):
                mod(x)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 6, 150])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=4,
                        help="distinct layers streamed per timing (their weights must exceed L3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = layers(args.model)
    linears = [nn.Linear(i, o, bias=False) for _ in range(args.blocks) for i, o in shapes]
    modes = {"int8": [Int8Linear(lin) for lin in linears],
             "int4": [Int4Linear(lin) for lin in linears]}
    if modes["int8"][0].kernel == "draftlm":  # the kernel it replaced, as a peer
        available = quantize.cpu_kernels_available
        quantize.cpu_kernels_available = lambda: False
        modes["fbgemm"] = [Int8Linear(lin) for lin in linears]
        quantize.cpu_kernels_available = available
    nbytes = {"int8": sum(i * o for i, o in shapes), "fbgemm": sum(i * o for i, o in shapes),
              "int4": sum(m.weight_bytes for m in modes["int4"]) // args.blocks}
    print(f"{args.model}: one block's projections (mean of {args.blocks} blocks), "
          f"{args.threads} threads")
    for rows in args.rows:
        xs = [torch.randn(rows, i) for _ in range(args.blocks) for i, _ in shapes]
        times = {m: float("inf") for m in modes}
        for _ in range(3):
            for mode, mods in modes.items():
                per_block = timed(mods, xs, args.repeat // 3 + 1) / args.blocks
                times[mode] = min(times[mode], per_block)
        line = "  ".join(f"{m} {t * 1e3:7.3f} ms {nbytes[m] / t / 1e9:5.1f} GB/s"
                         for m, t in times.items())
        print(f"rows {rows:4d}: {line}  int4/int8 time {times['int4'] / times['int8']:.2f}")


if __name__ == "__main__":
    main()
