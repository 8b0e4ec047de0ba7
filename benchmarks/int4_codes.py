"""Perplexity of each quantization of one model on the same text.

    python benchmarks/int4_codes.py --model qwen2.5-coder-1.5b --tokens 1024

Modes: float32, int8, int4 (a GGUF file's own 4-bit codes), int4-mixed (those, with the
head and the file's Q6_K layers in int8, as llama.cpp's Q4_K_M), int4-requantized (every
layer quantized from the dequantized floats). Text: the first N tokens of a file (default:
the standard library's colorsys.py).
"""

from __future__ import annotations

import argparse
import colorsys
import gc
import math

import torch

from draftlm.eval.perplexity import score_text
from draftlm.load import load
from draftlm.quant.layers import quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--file", default=colorsys.__file__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["float32", "int8", "int4", "int4-mixed",
                                                       "int4-requantized"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = open(args.file, encoding="utf-8").read()
    for label in args.modes:
        lm = load(args.model, dtype="float32",
                  quantize={"float32": "none", "int4-requantized": "none"}.get(label, label))
        if label == "int4-requantized":
            quantize_model(lm.model, "int4")
        ids = lm.tokenizer.encode(text)[: args.tokens]
        score = score_text(lm, lm.tokenizer.decode(ids), args.tokens, args.tokens // 2)
        print(f"{label:20s} perplexity {math.exp(score.nll_nats / score.num_tokens):.4f} "
              f"({score.num_tokens} tokens)", flush=True)
        del lm
        gc.collect()


if __name__ == "__main__":
    main()
