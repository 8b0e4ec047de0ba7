"""The compiled one-token step with static shapes (what CUDA graphs record on a GPU) against
the default dynamic-shape one, on one machine in one run: decode tokens/s and where each
one's greedy text first leaves the eager model's.

    python benchmarks/static_step.py --model smollm2-135m --quantize int8

Static shapes attend over the whole (bucketed) cache under a mask and take the position as
a device tensor; dynamic shapes slice the cache to its fill. On a GPU the static graph is
replayed as a CUDA graph; on a CPU this shows what the static graph alone costs or saves.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo

from draftlm.eval.humaneval import load_problems
from draftlm.generate import generate
from draftlm.load import load


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantize", default="int8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=2, help="first N HumanEval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [p.prompt for p in load_problems(limit=args.prompts)]
    lm = load(args.model, quantize=args.quantize, device=args.device)
    eager = [generate(lm, p, max_new_tokens=args.max_new_tokens).token_ids for p in prompts]
    for static in (False, True):
        torch._dynamo.reset()
        start = time.perf_counter()
        lm.compile(static_shapes=static)
        compile_s = time.perf_counter() - start
        rates, diffs = [], []
        for prompt, reference in zip(prompts, eager, strict=True):
            generate(lm, prompt, max_new_tokens=8)  # first call after compiling: not timed
            result = generate(lm, prompt, max_new_tokens=args.max_new_tokens)
            rates.append(result.stats["decode_tokens_per_second"])
            diffs.append(first_difference(result.token_ids, reference))
        print(f"{'static ' if static else 'dynamic'} shapes: compile {compile_s:.0f} s, cache "
              f"{lm.model.max_cache_len}, decode tok/s {rates}, first token unlike eager "
              f"{diffs}", flush=True)


if __name__ == "__main__":
    main()
