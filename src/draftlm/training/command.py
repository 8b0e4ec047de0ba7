"""The training verbs of the CLI: `draftlm pretrain`, `finetune`, `export`, and for drafts
distilled from their target `draftlm teacher` and `draftlm train-draft`.

Each verb is a function whose keyword arguments are its flags; recipes (YAML files of
`TrainConfig` fields) carry everything else, and `--set FIELD=VALUE` reaches any field.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from draftlm.errors import DraftlmError
from draftlm.quant.layers import QUANTIZE_MODES
from draftlm.training.checkpoint import export_checkpoint, export_gguf
from draftlm.training.config import TrainConfig, resolve_config
from draftlm.training.distill import LOSSES
from draftlm.training.teacher import compute_teacher
from draftlm.training.trainer import train


def pretrain(
    config: str | None = None, out_dir: str | None = None, data: list[str] | None = None,
    model: str | None = None, max_steps: int | None = None, seq_len: int | None = None,
    micro_batch_size: int | None = None, global_batch_tokens: int | None = None,
    lr: float | None = None, seed: int | None = None, device: str | None = None,
    strategy: str | None = None, precision: str | None = None, compile: bool | None = None,
    activation_checkpointing: bool | None = None, peak_flops: float | None = None,
    set_fields: list[str] | tuple[str, ...] = (), resume: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train from scratch (a preset, or `init` if the recipe names one)."""
    cfg = resolve_config(
        config, None, set_fields, out_dir=out_dir, data=data, model=model,
        max_steps=max_steps, seq_len=seq_len, micro_batch_size=micro_batch_size,
        global_batch_tokens=global_batch_tokens, lr=lr, seed=seed, device=device,
        strategy=strategy, precision=precision, compile=compile,
        activation_checkpointing=activation_checkpointing, peak_flops=peak_flops)
    return _run(cfg, resume, stop_at)


def finetune(
    init: str | None = None, config: str | None = None, out_dir: str | None = None,
    data: list[str] | None = None, max_steps: int | None = None, seq_len: int | None = None,
    micro_batch_size: int | None = None, global_batch_tokens: int | None = None,
    lr: float | None = None, seed: int | None = None, device: str | None = None,
    strategy: str | None = None, precision: str | None = None, compile: bool | None = None,
    activation_checkpointing: bool | None = None, peak_flops: float | None = None,
    set_fields: list[str] | tuple[str, ...] = (), resume: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Continue training a model (`--init`: registry name, HF folder, .gguf, checkpoint)."""
    cfg = resolve_config(
        config, init, set_fields, out_dir=out_dir, data=data, max_steps=max_steps,
        seq_len=seq_len, micro_batch_size=micro_batch_size,
        global_batch_tokens=global_batch_tokens, lr=lr, seed=seed, device=device,
        strategy=strategy, precision=precision, compile=compile,
        activation_checkpointing=activation_checkpointing, peak_flops=peak_flops)
    if cfg.init is None:
        raise DraftlmError("finetune needs a starting model: --init NAME_OR_PATH (or `init:` "
                           "in the recipe)")
    return _run(cfg, resume, stop_at)


def _run(cfg: TrainConfig, resume: bool, stop_at: int | None) -> dict[str, Any]:
    summary = train(cfg, resume=resume, stop_at=stop_at)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML (fields of TrainConfig)")
    p.add_argument("--out-dir")
    p.add_argument("--data", action="append", help="prepared folder (repeatable; weight 1)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-tokens", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--strategy", help="auto | none | ddp | fsdp (under torchrun)")
    p.add_argument("--precision", help="auto | bf16 | fp32")
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device, for MFU")
    p.add_argument("--set", dest="set_fields", action="append", default=[],
                   metavar="FIELD=VALUE", help="override any recipe field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--stop-at", type=int, help="checkpoint and stop at this step (resume later)")


def teacher(
    target: str, data: str, output: str, num_windows: int, seq_len: int = 512,
    top_k: int = 32, windows_per_shard: int = 8, split: str = "train", seed: int = 0,
    quantize: str = "none", dtype: str = "auto", max_minutes: float | None = None,
    features: bool = False,
) -> dict[str, Any]:
    """Compute a target's top-k distributions (and with `features` its last hidden states)
    over prepared windows into teacher shards (resumable: run it again to continue)."""
    manifest = compute_teacher(target, data, output, num_windows, seq_len, top_k,
                               windows_per_shard, split, seed, quantize, dtype, max_minutes,
                               features=features)
    done = sum(shard["num_windows"] for shard in manifest["shards"])
    summary = {"output": output, "target": manifest["target_name"], "windows": done,
               "tokens": done * seq_len, "complete": manifest["complete"],
               "target_seconds": manifest["target_seconds"],
               "target_tokens_per_second": round(done * seq_len / manifest["target_seconds"], 2)
               if manifest["target_seconds"] else None}
    print(json.dumps(summary))
    return summary


def train_draft(
    teacher: str | None = None, config: str | None = None, init: str | None = None,
    out_dir: str | None = None, distill_loss: str | None = None,
    init_layers: str | None = None, head_vocab_size: int | None = None,
    max_steps: int | None = None, seq_len: int | None = None,
    micro_batch_size: int | None = None, global_batch_tokens: int | None = None,
    lr: float | None = None, seed: int | None = None, device: str | None = None,
    strategy: str | None = None, precision: str | None = None,
    set_fields: list[str] | tuple[str, ...] = (), resume: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Distil a draft from its target's teacher shards (DistillSpec): start from `init`
    (a pretrained sibling; `init_layers` keeps some of its blocks, `head_vocab_size`
    truncates its head) or from a preset (`model` in the recipe)."""
    layers = None
    if init_layers is not None:
        try:
            layers = [int(i) for i in init_layers.split(",")]
        except ValueError as err:
            raise DraftlmError(f"--init-layers takes comma-separated block numbers, got "
                               f"{init_layers!r}") from err
    cfg = resolve_config(
        config, init, set_fields, teacher=teacher, out_dir=out_dir, distill_loss=distill_loss,
        init_layers=layers, head_vocab_size=head_vocab_size, max_steps=max_steps,
        seq_len=seq_len, micro_batch_size=micro_batch_size,
        global_batch_tokens=global_batch_tokens, lr=lr, seed=seed, device=device,
        strategy=strategy, precision=precision)
    if cfg.teacher is None:
        raise DraftlmError("train-draft needs teacher shards: --teacher FOLDER (made by "
                           "`draftlm teacher`), or `teacher:` in the recipe")
    return _run(cfg, resume, stop_at)


def export(checkpoint: str, output: str, tokenizer: str | None = None,
           format: str = "hf", tokenizer_gguf: str | None = None,
           gguf_type: str = "f16") -> None:
    """Write a training checkpoint (`out_dir/checkpoints/step-N`) or any model draftlm
    loads as a HF folder, or as a GGUF file (`--format gguf`) whose tokenizer is copied
    from `--tokenizer-gguf` (the target's GGUF: a draft tokenizes as its target does)."""
    if format == "hf":
        print(export_checkpoint(checkpoint, output, tokenizer))
        return
    if format != "gguf":
        raise DraftlmError(f"--format must be hf or gguf, got {format!r}")
    if tokenizer_gguf is None:
        raise DraftlmError("--format gguf needs --tokenizer-gguf: a GGUF file with this "
                           "model's tokenizer (for a draft, its target's file)")
    print(export_gguf(checkpoint, output, tokenizer_gguf, gguf_type))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint or model as a HF folder or GGUF")
    p.add_argument("checkpoint", help="a step-NNNNNN folder of a run (or, for --format gguf, "
                                      "any model draftlm loads)")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the run's data tokenizer)")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"))
    p.add_argument("--tokenizer-gguf", help="GGUF file whose tokenizer the export copies")
    p.add_argument("--gguf-type", default="f16", choices=("f32", "f16", "q8_0"))
    p.set_defaults(func=export)
    p = subparsers.add_parser("teacher", help="compute a target's top-k over prepared windows "
                                              "(for train-draft)")
    p.add_argument("--target", required=True, help="the target model (name, .gguf, folder)")
    p.add_argument("--data", required=True, help="prepared folder (the target's tokenizer)")
    p.add_argument("--output", required=True, help="teacher folder (resumable)")
    p.add_argument("--num-windows", type=int, required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--windows-per-shard", type=int, default=8)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", default="none", choices=QUANTIZE_MODES)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-minutes", type=float,
                   help="stop after the shard that crosses this (run again to continue)")
    p.add_argument("--features", action="store_true",
                   help="also store the target's last hidden states (to train a feature head)")
    p.set_defaults(func=teacher)
    p = subparsers.add_parser("train-draft", help="distil a draft model from teacher shards")
    p.add_argument("--teacher", help="teacher folder (`draftlm teacher`)")
    p.add_argument("--config", help="recipe YAML (fields of TrainConfig)")
    p.add_argument("--init", help="starting model: a pretrained sibling of the target")
    p.add_argument("--out-dir")
    p.add_argument("--distill-loss", choices=LOSSES)
    p.add_argument("--init-layers", help="keep these blocks of --init, e.g. 0,8,16,23")
    p.add_argument("--head-vocab-size", type=int,
                   help="truncate the head to the most frequent tokens")
    for flag, kind in (("--max-steps", int), ("--seq-len", int), ("--micro-batch-size", int),
                       ("--global-batch-tokens", int), ("--lr", float), ("--seed", int)):
        p.add_argument(flag, type=kind)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--strategy", help="auto | none | ddp | fsdp (under torchrun)")
    p.add_argument("--precision", help="auto | bf16 | fp32")
    p.add_argument("--set", dest="set_fields", action="append", default=[],
                   metavar="FIELD=VALUE", help="override any recipe field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--stop-at", type=int, help="checkpoint and stop at this step (resume later)")
    p.set_defaults(func=train_draft)
    p = subparsers.add_parser("pretrain", help="train a model from scratch")
    _add_common(p)
    p.add_argument("--model", help="model preset (e.g. tiny, amd-llama-135m)")
    p.set_defaults(func=pretrain)
    p = subparsers.add_parser("finetune", help="continue training an existing model")
    _add_common(p)
    p.add_argument("--init", help="registry name, HF folder, .gguf or training checkpoint")
    p.set_defaults(func=finetune)
