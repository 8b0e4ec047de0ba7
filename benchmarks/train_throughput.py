"""Training throughput of draftlm's Transformer next to HF transformers' LlamaForCausalLM.

    python benchmarks/train_throughput.py --model amd-llama-135m --batch 1 --seq-len 256

Both models get the same config (built from the draftlm preset via `to_hf()`), the same
weights, the same batch and the same step: forward, cross-entropy, backward, AdamW
(betas 0.9/0.95, wd 0.1), in float32 or under bf16 autocast. Steps alternate between the
two models so that a busy machine slows both alike; the median step time is reported as
tokens/s and MFU (model FLOPs per token and the peak FLOP/s assumption of
draftlm.training.metrics, printed with the result).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from draftlm.config import ModelConfig
from draftlm.model import Transformer
from draftlm.training.metrics import default_peak_flops, flops_per_token


def _hf_model(config: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    renamed = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
               for k, v in state.items()}
    hf.load_state_dict(renamed, strict=False)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="amd-llama-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_name(args.model)
    ours = Transformer(config)
    ours.init_weights(0.02, torch.Generator().manual_seed(0))
    hf = _hf_model(config, ours.state_dict())
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(1))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16
                else contextlib.nullcontext())

    first_loss: dict[str, float] = {}

    def step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, hf_api: bool,
                name: str) -> float:
        start = time.perf_counter()
        with autocast:
            out = model(batch[:, :-1])
            logits = out.logits if hf_api else out
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        first_loss.setdefault(name, loss.item())  # same weights: both must agree
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    runs = {"draftlm": (ours.train(), False), "hf_transformers": (hf.train(), True)}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                          weight_decay=0.1) for name, (m, _) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps + 1):  # the first step of each is warm-up
        for name, (model, hf_api) in runs.items():
            elapsed = step_fn(model, optimizers[name], hf_api, name)
            if i:
                times[name].append(elapsed)
    tokens = args.batch * args.seq_len
    peak = default_peak_flops(torch.device("cpu"))
    model_flops = flops_per_token(config, args.seq_len)
    result = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len,
              "threads": args.threads, "bf16_autocast": args.bf16,
              "parameters": ours.num_parameters(), "flops_per_token": model_flops,
              "peak_flops_assumed": peak}
    for name, values in times.items():
        tokens_per_s = tokens / statistics.median(values)
        result[name] = {"first_loss": first_loss[name],
                        "tokens_per_second": round(tokens_per_s, 1),
                        "mfu": round(tokens_per_s * model_flops / peak, 4) if peak else None,
                        "step_s": [round(v, 3) for v in values]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
