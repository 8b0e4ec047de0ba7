"""Where a model's int4 error comes from, and whether GPTQ removes it.

    python benchmarks/int4_error.py --model qwen2.5-coder-0.5b --layers --gptq 2048

Every figure is the mean KL(float32 || model with some weights on their int4 grid) per
token, teacher-forced on the same text as `quant_kl.py`. The weights are put on the grid in
float ("fake quantization": the 4-bit values, float activations), so only the weights'
rounding is measured, not the kernel's 8-bit activations.

* all: every linear layer on the int4 grid `--quantize int4` uses (a GGUF file's 4-bit
  codes where it has them, else the importance-weighted search of `gguf_int4`).
* `--layers`: one block at a time, then one projection type across all blocks: does the
  error sit in a few layers that a mixed precision could keep in 8 bits, or everywhere?
* `--gptq N`: GPTQ (Frantar et al. 2022) on N calibration tokens (`draftlm.quant.calibrate`'s
  text): block by block on the already-quantized model's activations, each layer's codes
  chosen column by column with the rounding error pushed onto the columns not yet
  quantized through the inverse Hessian of its inputs; the grid (Q4_K super-blocks) fitted
  by the same search, on the updated weights, one super-block at a time. Layers the file
  stores in 4 bits keep their codes, as in draftlm.

Figures for Qwen2.5-Coder-0.5B: benchmarks/reports/int4-error_epyc-avx2-2c_2026-11-30.md.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from draftlm.load import gguf_source, load
from draftlm.quant.calibrate import cached_importance, calibration_windows
from draftlm.quant.gguf_int4 import read_int4_groups
from draftlm.quant.int4 import GROUP, SUPER, Int4Groups

FILES = ("textwrap", "heapq", "fractions", "shlex")  # as quant_kl.py
PARTS = {"qkv": ("self_attn.", ["q_proj", "k_proj", "v_proj"]), "o": ("self_attn.", ["o_proj"]),
         "gate_up": ("mlp.", ["gate_proj", "up_proj"]), "down": ("mlp.", ["down_proj"])}


def gptq(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> Int4Groups:
    """GPTQ codes for `weight` [N, K] given its inputs' X^T X [K, K] (module docstring)."""
    w = weight.float().clone()
    n, k = w.shape
    h = hessian.double().clone()
    importance = h.diagonal().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                              upper=True).float()
    codes = torch.zeros(n, k, dtype=torch.uint8)
    grids = []
    for s0 in range(0, k, GROUP * SUPER):
        s1 = min(s0 + GROUP * SUPER, k)
        grid = Int4Groups.quantize(w[:, s0:s1].contiguous(), importance[s0:s1].contiguous())
        grids.append(grid)
        scale, minimum = grid.group_affine()
        for b0 in range(s0, s1, GROUP):
            b1, g = b0 + GROUP, (b0 - s0) // GROUP
            sc, mn = scale[:, g], minimum[:, g]
            inv = torch.where(sc > 0, 1 / sc.clamp(min=1e-30), torch.zeros_like(sc))
            block, err, ub = w[:, b0:b1].clone(), torch.zeros(n, GROUP), u[b0:b1, b0:b1]
            for j in range(GROUP):
                q = ((block[:, j] - mn) * inv).round().clamp(0, 15)
                err[:, j] = (block[:, j] - (q * sc + mn)) / ub[j, j]
                block[:, j:] -= err[:, j, None] * ub[j, j:][None, :]
                codes[:, b0 + j] = q.to(torch.uint8)
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return Int4Groups(codes, *(torch.cat([getattr(g, f) for g in grids], 1)
                               for f in ("sub_scale", "sub_min", "d", "dmin")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=512, help="evaluation tokens per file")
    parser.add_argument("--layers", action="store_true", help="KL per block and per type")
    parser.add_argument("--gptq", type=int, nargs="*", default=[],
                        help="calibration token counts to run GPTQ with")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model, dtype="float32")
    model, tokenizer, config = lm.model, lm.tokenizer, lm.config
    windows = [torch.tensor([tokenizer.encode(open(importlib.import_module(name).__file__,
                                                   encoding="utf-8").read())[: args.tokens]])
               for name in FILES]

    @torch.no_grad()
    def log_probs() -> list[torch.Tensor]:
        return [F.log_softmax(model(w).float()[0], -1) for w in windows]

    reference = log_probs()
    positions = sum(w.shape[1] for w in windows)

    def kl() -> float:
        return sum((r.exp() * (r - q)).sum().item()
                   for r, q in zip(reference, log_probs(), strict=True)) / positions

    # As `load` does: a .gguf path is its own source, a registry name its assembled file.
    source = Path(args.model) if args.model.endswith(".gguf") else gguf_source(args.model)
    stored = read_int4_groups(source, config.n_heads, config.n_kv_heads) if source else {}
    importance = cached_importance(model, tokenizer, source)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    floats = {n: m.weight for n, m in linears.items()}
    grid = {n: (stored[f"{n}.weight"] if f"{n}.weight" in stored
                else Int4Groups.quantize(m.weight.detach().float(), importance.get(n)))
            .dequantize() for n, m in linears.items()}

    def with_grid(values: dict[str, torch.Tensor], chosen: Callable[[str], bool]) -> float:
        for name, linear in linears.items():
            linear.weight = nn.Parameter(values[name] if chosen(name) else floats[name],
                                         requires_grad=False)
        result = kl()
        for name, linear in linears.items():
            linear.weight = floats[name]
        return result

    print(f"{args.model}: {positions} positions", flush=True)
    print(f"all layers int4 (search)   KL {with_grid(grid, lambda n: True):.5f}", flush=True)
    if args.layers:
        for i in range(config.n_layers):
            value = with_grid(grid, lambda n, i=i: n.startswith(f"layers.{i}."))
            print(f"  block {i:2d} only          KL {value:.5f}", flush=True)
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "lm_head"):
            value = with_grid(grid, lambda n, kind=kind: n.endswith(kind))
            print(f"  {kind:9s} only         KL {value:.5f}", flush=True)
    for count in args.gptq:
        start = time.perf_counter()
        values = gptq_model(model, calibration_windows(tokenizer, count), stored)
        print(f"all layers int4 (GPTQ, {count} tokens, {time.perf_counter() - start:.0f} s)"
              f"  KL {with_grid(values, lambda n: True):.5f}", flush=True)


@torch.no_grad()
def gptq_model(model: nn.Module, windows: list[torch.Tensor],
               stored: dict[str, Int4Groups]) -> dict[str, torch.Tensor]:
    """Dequantized GPTQ weight per linear layer name; the model's weights are left as
    they were. Block i's Hessians come from inputs through blocks < i already on the grid."""
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    values: dict[str, torch.Tensor] = {}

    def quantize(prefix: str, parts: list[str], hessian: torch.Tensor) -> None:
        names = [f"{prefix}{p}" for p in parts]
        linears = [model.get_submodule(n) for n in names]
        if all(f"{n}.weight" in stored for n in names):
            deq = torch.cat([stored[f"{n}.weight"].dequantize() for n in names])
        else:
            deq = gptq(torch.cat([lin.weight for lin in linears]), hessian).dequantize()
        for name, rows in zip(names, deq.split([lin.out_features for lin in linears]),
                              strict=True):
            values[name] = rows.clone()
            model.get_submodule(name).weight = nn.Parameter(values[name], requires_grad=False)

    cos, sin = model.rope_tables(torch.device("cpu"))
    hidden = [model.embed_tokens(w) for w in windows]
    hessians: dict[str, torch.Tensor] = {}  # this block's X^T X per input
    try:
        for i, block in enumerate(model.layers):
            hessians.clear()

            def record(key: str):  # noqa: ANN202
                def hook(module: nn.Module, inputs: tuple) -> None:
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    hessians[key] = hessians.get(key, 0) + x.T @ x
                return hook

            handles = [block.get_submodule(f"{sub}{parts[0]}").register_forward_pre_hook(
                record(key)) for key, (sub, parts) in PARTS.items()]
            for x in hidden:
                block(x, cos[: x.shape[1]], sin[: x.shape[1]], None, None)
            for handle in handles:
                handle.remove()
            for key, (sub, parts) in PARTS.items():
                quantize(f"layers.{i}.{sub}", parts, hessians[key])
            hidden = [block(x, cos[: x.shape[1]], sin[: x.shape[1]], None, None) for x in hidden]
        final = torch.cat([model.norm(x).reshape(-1, x.shape[-1]) for x in hidden])
        quantize("", ["lm_head"], final.T @ final)
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight = weight
    return values


if __name__ == "__main__":
    main()
