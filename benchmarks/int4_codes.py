"""int4 from a GGUF file's own 4-bit codes against int4 requantized from its floats.

    python benchmarks/int4_codes.py --model qwen2.5-coder-1.5b --tokens 1024

Prints the perplexity of both on the first N tokens of a text (default: the standard
library's colorsys.py) next to the float32 model's.
"""

from __future__ import annotations

import argparse
import colorsys
import gc
import math

import torch

from draftlm.eval.perplexity import score_text
from draftlm.load import load
from draftlm.quantize import quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--file", default=colorsys.__file__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = open(args.file, encoding="utf-8").read()
    for label in ("float32", "int4 (file codes)", "int4 (requantized)"):
        lm = load(args.model, dtype="float32",
                  quantize="int4" if label == "int4 (file codes)" else "none")
        if label == "int4 (requantized)":
            quantize_model(lm.model, "int4")
        ids = lm.tokenizer.encode(text)[: args.tokens]
        score = score_text(lm, lm.tokenizer.decode(ids), args.tokens, args.tokens // 2)
        print(f"{label:20s} perplexity {math.exp(score.nll_nats / score.num_tokens):.4f} "
              f"({score.num_tokens} tokens)", flush=True)
        del lm
        gc.collect()


if __name__ == "__main__":
    main()
