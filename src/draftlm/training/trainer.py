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
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from draftlm.config import ModelConfig
from draftlm.data.loader import PackedTokens, TokenLoader, check_same_tokenizer, val_batches
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.tokenizer import Tokenizer
from draftlm.training.checkpoint import (
    export_checkpoint,
    initial_model,
    list_checkpoints,
    load_checkpoint,
    model_state,
    save_checkpoint,
)
from draftlm.training.config import TrainConfig, resolve_config
from draftlm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    autocast_dtype,
    gradient_sync,
    init_distributed,
    maybe_autocast,
    parallelize,
    shutdown,
)
from draftlm.training.metrics import (
    MetricsLogger,
    ProgressBar,
    ThroughputWindow,
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
        trainer = Trainer(cfg, info, resume)
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        return trainer.train(end, progress)
    finally:
        shutdown()


class Trainer:
    """One run of a recipe in this process, as torchtitan's: `__init__` builds the data,
    model, optimizer and logger (resuming the step, data position and RNG from the last
    checkpoint), `train_step` is one optimizer step, and `train` is the loop that logs,
    evaluates and saves between steps."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, resume: bool) -> None:
        self.cfg, self.info = cfg, info
        self.grad_accum = grad_accum_steps(cfg, info)
        self.out = Path(cfg.out_dir).expanduser()
        self.loader, self.val_data = build_data(cfg, info)
        data_tokenizer = Tokenizer.from_folder(Path(cfg.data[0]["path"]) / "tokenizer")
        self.model, self.tokenizer = initial_model(cfg, data_tokenizer)
        self.config = self.model.config
        check_fits(cfg, self.loader, self.config)
        self.model.train().to(info.device)
        self.wrapped = parallelize(self.model, info, cfg.strategy, cfg.activation_checkpointing,
                                   cfg.compile)
        self.optimizer = build_optimizer(self.model, cfg)
        self.identity = cfg.identity(self.config)
        self.step = self._restore(resume)
        self.autocast = autocast_dtype(cfg.precision, info.device)
        self.logger = MetricsLogger(self.out, cfg.tensorboard, self.step or None) \
            if info.is_main else None
        self.peak_flops = cfg.peak_flops or default_peak_flops(info.device)
        self.flops_per_token = flops_per_token(self.config, cfg.seq_len)

    def _restore(self, resume: bool) -> int:
        """The step to start from: the last checkpoint's when resuming, else 0."""
        checkpoints = list_checkpoints(self.out / "checkpoints")
        if checkpoints and not resume:
            raise DraftlmError(f"{self.out} already holds checkpoints: pass --resume to "
                               "continue, or choose a new out_dir")
        if not checkpoints:
            return 0
        state = load_checkpoint(checkpoints[-1], self.model, self.optimizer,
                                self.config.tie_embeddings, self.identity)
        self.loader.load_state_dict(state["loader"])
        return int(state["step"])

    def train(self, end: int, progress: bool) -> dict[str, Any]:
        """Train up to step `end`; returns the last logged and evaluated figures."""
        cfg = self.cfg
        if self.step == 0:
            self.log_start()
            if cfg.eval_interval:  # the starting point: "before" for a fine-tune
                self.validate()
        bar = ProgressBar(progress and self.info.is_main, cfg.max_steps, self.step)
        window = ThroughputWindow()
        summary: dict[str, Any] = {}
        while self.step < end:
            lr, loss_sum, grad_norm = self.train_step()
            window.tokens += cfg.global_batch_tokens
            last = self.step == end
            if self.step % cfg.log_interval == 0 or last:
                record = self.log_step(lr, loss_sum, grad_norm, window)
                summary.update(record)
                bar.update(record)
                window.restart()
            if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or last):
                summary.update(self.validate())
                window.restart_clock()  # evaluation is not training throughput
            if cfg.save_interval and (self.step % cfg.save_interval == 0 or last):
                self.save()
                window.restart_clock()
        bar.close()
        return self.finish(summary)

    def train_step(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches: (lr, summed micro-batch
        losses, gradient norm), the last two left on the device."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.info.device)
        for micro in range(self.grad_accum):
            batch = self.loader.next_batch().to(self.info.device, non_blocking=True)
            with gradient_sync(self.wrapped, micro == self.grad_accum - 1):
                with maybe_autocast(self.info.device, self.autocast):
                    logits = self.wrapped(batch[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr, loss_sum, grad_norm

    def log_start(self) -> None:
        """The run's settings, first in a fresh run's metrics (rank 0)."""
        if self.logger is None:
            return
        self.logger.log({
            "event": "start", "model_config": self.config.to_dict(), "train": asdict(self.cfg),
            "parameters": self.model.num_parameters(), "world_size": self.info.world_size,
            "grad_accum": self.grad_accum, "peak_flops_per_device": self.peak_flops,
            "flops_per_token": self.flops_per_token,
            "autocast": str(self.autocast) if self.autocast else "fp32",
        })

    def log_step(
        self, lr: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor,
        window: ThroughputWindow,
    ) -> dict[str, Any]:
        """The step's loss, lr, gradient norm, tokens/s and MFU, logged (rank 0)."""
        loss = all_reduce_mean(loss_sum / self.grad_accum).item()  # the one host sync
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        tokens_per_s = window.tokens_per_second()  # after the sync: the steps are done
        mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.info.world_size) \
            if self.peak_flops else None
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": self.step * self.cfg.global_batch_tokens,
                  "tokens_per_second": tokens_per_s, "mfu": mfu}
        if self.logger is not None:
            self.logger.log(record)
        return record

    def validate(self) -> dict[str, Any]:
        """Validation loss and perplexity at this step, logged (rank 0); {} with no
        validation data."""
        val = evaluate(self.wrapped, self.val_data, self.cfg, self.info, self.autocast)
        if val is None:
            return {}
        record = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        if self.logger is not None:
            self.logger.log(record)
        return record

    def save(self) -> None:
        """A checkpoint of this step: model, optimizer, data position and the recipe."""
        save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer,
                        {"identity": self.identity, "loader": self.loader.state_dict(),
                         "train": asdict(self.cfg)},
                        self.config.tie_embeddings, self.info.is_main, self.cfg.keep_last)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Export the model once the schedule is complete, and draw the loss curve."""
        if self.cfg.export and self.step == self.cfg.max_steps:
            tensors = model_state(self.model, tied=False)  # every rank: FSDP gathers
            if self.info.is_main:
                save_hf_folder(self.out / "final", self.config, tensors, self.tokenizer)
                summary["export"] = str(self.out / "final")
        if self.logger is not None:
            self.logger.close()
            png = plot_loss_curve(self.logger.path, self.out / "loss.png")
            summary["loss_curve"] = str(png) if png else None
        return summary


# ---- setup --------------------------------------------------------------------------------
def grad_accum_steps(cfg: TrainConfig, info: DistInfo) -> int:
    """Micro-steps per optimizer step, so that all ranks together see `global_batch_tokens`."""
    if not cfg.data:
        raise DraftlmError("the recipe names no data: set `data: [{path: PREPARED_FOLDER}]`")
    per_step = cfg.seq_len * cfg.micro_batch_size * info.world_size
    if cfg.global_batch_tokens % per_step:
        raise DraftlmError(f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple "
                           f"of seq_len x micro_batch_size x ranks = {per_step}")
    return cfg.global_batch_tokens // per_step


def build_data(cfg: TrainConfig, info: DistInfo) -> tuple[TokenLoader, list[PackedTokens]]:
    """This rank's training loader and the validation splits, all of one tokenizer."""
    datasets = [(d["path"], float(d.get("weight", 1.0))) for d in cfg.data]
    loader = TokenLoader(datasets, cfg.seq_len, cfg.micro_batch_size, cfg.seed, info.rank,
                         info.world_size)
    val_folders = cfg.val_data if cfg.val_data is not None else [p for p, _ in datasets]
    val_data = [PackedTokens(p, "val") for p in val_folders]
    check_same_tokenizer([*loader.data, *val_data])
    return loader, val_data


def check_fits(cfg: TrainConfig, loader: TokenLoader, config: ModelConfig) -> None:
    """The data's token ids and the recipe's windows fit the model."""
    if loader.data[0].vocab_size > config.vocab_size:
        raise DraftlmError(f"the data's vocabulary ({loader.data[0].vocab_size}) exceeds the "
                           f"model's ({config.vocab_size}); set model_overrides.vocab_size")
    if cfg.seq_len > config.max_seq_len:
        raise DraftlmError(f"seq_len {cfg.seq_len} exceeds the model's context "
                           f"{config.max_seq_len}")


# ---- evaluation ---------------------------------------------------------------------------
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
            with maybe_autocast(info.device, autocast):
                logits = model(batch[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            count += 1
    model.train(was_training)
    if count == 0:
        return None
    return all_reduce_mean(total / count).item()


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
