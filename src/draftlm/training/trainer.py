"""`draftlm pretrain` and `draftlm finetune`: one trainer loop for every scale.

A YAML recipe maps 1:1 onto `TrainConfig` (`training.config`); CLI flags override. The loop is
the standard one (AMD's and TinyLlama's): AdamW (betas 0.9/0.95, weight decay on
matrices only), linear warmup then cosine decay to a floor, gradient accumulation up to a
global batch counted in tokens, clipping, bf16 autocast where the hardware has it. It
runs as one process or under torchrun (DDP or FSDP2, `distributed.py`); the data loader
splits each global batch across ranks, so the number of processes does not change what
is learned. Checkpoints carry the data position and RNG states (`training.checkpoint`),
so `--resume` continues exactly rather than by replaying.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress

from draftlm.config import ModelConfig
from draftlm.data.loader import PackedTokens, TokenLoader, check_same_tokenizer, val_batches
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.load import cpu_has_fast_bf16, load
from draftlm.model import Transformer
from draftlm.tokenizer import Tokenizer
from draftlm.training.checkpoint import (
    export_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_tensors,
    model_state,
    read_checkpoint_state,
    save_checkpoint,
)
from draftlm.training.config import TrainConfig, resolve_config
from draftlm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    gradient_sync,
    init_distributed,
    parallelize,
    shutdown,
)
from draftlm.training.metrics import (
    MetricsLogger,
    default_peak_flops,
    flops_per_token,
    plot_loss_curve,
)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (linear and embedding weights), none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise DraftlmError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None

    return torch.bfloat16 if cpu_has_fast_bf16() else None


def _initial_model(cfg: TrainConfig, data_tokenizer: Tokenizer) -> tuple[Transformer, Tokenizer]:
    """The model to start from: `init` (finetune) or a fresh preset (pretrain)."""
    if cfg.init is None:
        config = ModelConfig.from_name(cfg.model).with_(
            bos_id=data_tokenizer.bos_id, eos_ids=data_tokenizer.eos_ids, **cfg.model_overrides)
        model = Transformer(config)
        model.init_weights(cfg.init_std, torch.Generator().manual_seed(cfg.seed))
        return model, data_tokenizer
    init = Path(cfg.init).expanduser()
    if (init / "state.json").is_file() and (init / "model.safetensors").is_file():
        state = read_checkpoint_state(init)
        config = ModelConfig.from_dict(state["identity"]["model_config"])
        model = Transformer(config)
        tensors = load_model_tensors(init)
        if config.tie_embeddings:
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        model.load_state_dict(tensors)
        return model, data_tokenizer

    lm = load(cfg.init, dtype="float32", device="cpu")
    # The same ids for the same tokens; post-processors (BOS added on export) may differ.
    if lm.tokenizer.backend.get_vocab() != data_tokenizer.backend.get_vocab():
        raise DraftlmError(f"the data was prepared with another tokenizer than {cfg.init}'s; "
                           f"run `draftlm prepare --tokenizer {cfg.init}`")
    return lm.model.requires_grad_(True), lm.tokenizer


def train(
    cfg: TrainConfig, resume: bool = False, stop_at: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the recipe; returns the last train/val losses and throughput. `stop_at` ends
    the run early at that step with a checkpoint (a time-sliced or preemptible job), to be
    continued with `resume`; the schedule still follows `max_steps`."""
    info = init_distributed(cfg.device)
    if cfg.cpu_threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)  # the process is the trainer's: set it once
    try:
        return _train(cfg, info, resume, stop_at, progress)
    finally:
        shutdown()


def _train(
    cfg: TrainConfig, info: DistInfo, resume: bool, stop_at: int | None, progress: bool
) -> dict[str, Any]:
    if not cfg.data:
        raise DraftlmError("the recipe names no data: set `data: [{path: PREPARED_FOLDER}]`")
    per_step = cfg.seq_len * cfg.micro_batch_size * info.world_size
    if cfg.global_batch_tokens % per_step:
        raise DraftlmError(f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple "
                           f"of seq_len x micro_batch_size x ranks = {per_step}")
    accum = cfg.global_batch_tokens // per_step
    out = Path(cfg.out_dir).expanduser()
    datasets = [(d["path"], float(d.get("weight", 1.0))) for d in cfg.data]
    loader = TokenLoader(datasets, cfg.seq_len, cfg.micro_batch_size, cfg.seed, info.rank,
                         info.world_size)
    data_tokenizer = Tokenizer.from_folder(Path(datasets[0][0]) / "tokenizer")
    model, tokenizer = _initial_model(cfg, data_tokenizer)
    config = model.config
    if loader.data[0].vocab_size > config.vocab_size:
        raise DraftlmError(f"the data's vocabulary ({loader.data[0].vocab_size}) exceeds the "
                           f"model's ({config.vocab_size}); set model_overrides.vocab_size")
    if cfg.seq_len > config.max_seq_len:
        raise DraftlmError(f"seq_len {cfg.seq_len} exceeds the model's context "
                           f"{config.max_seq_len}")
    model.train().to(info.device)
    wrapped = parallelize(model, info, cfg.strategy, cfg.activation_checkpointing, cfg.compile)
    optimizer = build_optimizer(model, cfg)
    identity = cfg.identity(config)
    step = 0
    checkpoints = list_checkpoints(out / "checkpoints")
    if resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, config.tie_embeddings,
                                identity)
        step = int(state["step"])
        loader.load_state_dict(state["loader"])
    elif checkpoints and not resume:
        raise DraftlmError(f"{out} already holds checkpoints: pass --resume to continue, or "
                           "choose a new out_dir")
    autocast = _autocast_dtype(cfg.precision, info.device)
    val_folders = cfg.val_data if cfg.val_data is not None else [p for p, _ in datasets]
    val_data = [PackedTokens(p, "val") for p in val_folders]
    check_same_tokenizer([*loader.data, *val_data])
    logger = MetricsLogger(out, cfg.tensorboard, step if step else None) \
        if info.is_main else None
    peak = cfg.peak_flops or default_peak_flops(info.device)
    model_flops = flops_per_token(config, cfg.seq_len)
    if logger is not None and step == 0:
        logger.log({"event": "start", "model_config": config.to_dict(), "train": asdict(cfg),
                    "parameters": model.num_parameters(), "world_size": info.world_size,
                    "grad_accum": accum, "peak_flops_per_device": peak,
                    "flops_per_token": model_flops,
                    "autocast": str(autocast) if autocast else "fp32"})
    if cfg.eval_interval and step == 0:  # the starting point: "before" for a fine-tune
        val = evaluate(wrapped, val_data, cfg, info, autocast)
        if val is not None and logger is not None:
            logger.log({"step": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
    bar = _ProgressBar(progress and info.is_main, cfg.max_steps, step)
    summary: dict[str, Any] = {}
    window_start, window_tokens = time.perf_counter(), 0
    end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    while step < end:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(accum):
            batch = loader.next_batch().to(info.device, non_blocking=True)
            with gradient_sync(wrapped, micro == accum - 1):
                with _autocast(info.device, autocast):
                    logits = wrapped(batch[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += cfg.global_batch_tokens
        last = step == end
        if step % cfg.log_interval == 0 or last:
            loss_value = all_reduce_mean(loss_sum / accum).item()  # the one host sync
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": step * cfg.global_batch_tokens,
                      "tokens_per_second": tokens_per_s,
                      "mfu": tokens_per_s * model_flops / (peak * info.world_size)
                      if peak else None}
            summary.update(record)
            if logger is not None:
                logger.log(record)
            bar.update(step, f"loss {loss_value:.3f}  {tokens_per_s:,.0f} tok/s")
            window_start, window_tokens = time.perf_counter(), 0
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
            val = evaluate(wrapped, val_data, cfg, info, autocast)
            if val is not None:
                summary.update(step=step, val_loss=val, val_ppl=math.exp(min(val, 50)))
                if logger is not None:
                    logger.log({"step": step, "val_loss": val, "val_ppl": summary["val_ppl"]})
            window_start = time.perf_counter()  # evaluation is not training throughput
        if cfg.save_interval and (step % cfg.save_interval == 0 or last):
            save_checkpoint(out / "checkpoints", step, model, optimizer,
                            {"identity": identity, "loader": loader.state_dict(),
                             "train": asdict(cfg)},
                            config.tie_embeddings, info.is_main, cfg.keep_last)
            window_start = time.perf_counter()
    bar.close()
    if cfg.export and step == cfg.max_steps:
        tensors = model_state(model, tied=False)
        if info.is_main:
            save_hf_folder(out / "final", config, tensors, tokenizer)
            summary["export"] = str(out / "final")
    if logger is not None:
        logger.close()
        png = plot_loss_curve(logger.path, out / "loss.png")
        summary["loss_curve"] = str(png) if png else None
    return summary


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val_data: list[PackedTokens], cfg: TrainConfig, info: DistInfo,
    autocast: torch.dtype | None,
) -> float | None:
    """Mean validation loss over the fixed first `eval_sequences` windows of every dataset."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=info.device)
    count = 0
    for data in val_data:
        for batch in val_batches(data, cfg.seq_len, cfg.micro_batch_size, cfg.eval_sequences,
                                 info.rank, info.world_size):
            batch = batch.to(info.device)
            with _autocast(info.device, autocast):
                logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            count += 1
    model.train(was_training)
    if count == 0:
        return None
    return all_reduce_mean(total / count).item()


class _ProgressBar:
    """Steps done, loss and tokens/s on stderr while a terminal watches (rank 0)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.progress = None
        if enabled and sys.stderr.isatty():
            self.progress = Progress()
            self.task = self.progress.add_task("train", total=total, completed=start)
            self.progress.start()

    def update(self, step: int, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---- CLI --------------------------------------------------------------------------------
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


def export(checkpoint: str, output: str, tokenizer: str | None = None) -> None:
    """Write a training checkpoint (`out_dir/checkpoints/step-N`) as a HF folder."""
    print(export_checkpoint(checkpoint, output, tokenizer))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a training checkpoint as a HF folder")
    p.add_argument("checkpoint", help="a step-NNNNNN folder of a run")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the run's data tokenizer)")
    p.set_defaults(func=export)
    p = subparsers.add_parser("pretrain", help="train a model from scratch")
    _add_common(p)
    p.add_argument("--model", help="model preset (e.g. tiny, amd-llama-135m)")
    p.set_defaults(func=pretrain)
    p = subparsers.add_parser("finetune", help="continue training an existing model")
    _add_common(p)
    p.add_argument("--init", help="registry name, HF folder, .gguf or training checkpoint")
    p.set_defaults(func=finetune)
