#!/usr/bin/env bash
# The GPU check, run first by whoever is lent a GPU (under 5 minutes on one GPU):
#   1. the test suite's CUDA tests (they skip on CPU-only machines);
#   2. greedy speculative decoding equals greedy plain decoding on a real model, on the
#      GPU, with the dynamic compiled step and with CUDA graphs (--cuda-graphs);
#   3. a short `draftlm bench` on the GPU, for tokens/s.
# It exits non-zero at the first failure. When it passes, CUDA graphs may become the
# default on CUDA (compile.CompiledDecoder); say so with its output in the issue.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
out=${OUT:-runs/gpu-check}
mkdir -p "$out"

echo "== 1. CUDA tests"
python -m pytest -q -m "slow or not slow" -k "cuda" tests/test_compile.py tests/test_model.py \
    tests/test_generate.py tests/speculative

echo "== 2. greedy speculative == greedy plain, dynamic step and CUDA graphs"
python - <<'PY'
import torch
import draftlm
from draftlm.speculative import NgramDrafter, ModelDrafter

prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import json\n\ndef load("]
for graphs in (False, True):
    target = draftlm.load("smollm2-135m", device="cuda", compile_step=True, cuda_graphs=graphs)
    draft = draftlm.load("smollm2-135m", device="cuda", compile_step=True, cuda_graphs=graphs)
    eager = draftlm.load("smollm2-135m", device="cuda")
    for prompt in prompts:
        plain = draftlm.generate(eager, prompt, max_new_tokens=64)
        compiled = draftlm.generate(target, prompt, max_new_tokens=64)
        for drafter in (NgramDrafter(3, 4), ModelDrafter(draft, target, 4)):
            fast = draftlm.generate(target, prompt, max_new_tokens=64, drafter=drafter)
            assert fast.token_ids == compiled.token_ids, (graphs, prompt, drafter.name)
        same = sum(a == b for a, b in zip(plain.token_ids, compiled.token_ids))
        print(f"cuda_graphs={graphs} {prompt[:20]!r}: speculative == compiled AR; compiled "
              f"vs eager {same}/{len(plain.token_ids)} tokens equal, "
              f"{compiled.tokens_per_second:.1f} tok/s compiled")
PY

echo "== 3. bench"
draftlm bench --model smollm2-135m --device cuda --compile all --cuda-graphs --ngram 3 \
    --k 3 --limit 2 --max-new-tokens 64 --out "$out/bench"
echo "gpu check passed"
