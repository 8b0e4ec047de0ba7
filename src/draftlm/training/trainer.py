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

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from draftlm.config import ModelConfig
from draftlm.data.loader import PackedTokens, TokenLoader, check_same_tokenizer, val_batches
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.model import Transformer
from draftlm.speculative.feature_head import save_feature_head
from draftlm.tokenizer import Tokenizer
from draftlm.training.checkpoint import (
    initial_model,
    list_checkpoints,
    load_checkpoint,
    model_state,
    remove_stale,
    save_checkpoint,
)
from draftlm.training.config import TrainConfig
from draftlm.training.distill import LOSSES, distill_loss
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
from draftlm.training.draft import frequent_tokens, prune, token_counts
from draftlm.training.feature_head import (
    build_feature_head,
    evaluate_feature_head,
    feature_head_loss,
)
from draftlm.training.metrics import (
    MetricsLogger,
    ProgressBar,
    ThroughputWindow,
    default_peak_flops,
    flops_per_token,
    plot_loss_curve,
)
from draftlm.training.teacher import TeacherLoader, TeacherWindows


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
        # Training's own randomness (a feature head's input noise) from the recipe's seed,
        # per rank; checkpoints carry the RNG state on from here.
        torch.manual_seed(cfg.seed + info.rank)
        self.grad_accum = grad_accum_steps(cfg, info)
        self.out = Path(cfg.out_dir).expanduser()
        self.loader, self.val_data, data_folder = build_data(cfg, info)
        data_tokenizer = Tokenizer.from_folder(Path(data_folder) / "tokenizer")
        self.feature_head = cfg.draft_kind == "feature-head"
        if self.feature_head:
            assert isinstance(self.loader, TeacherLoader)  # build_data checked it
            head_ids = frequent_head_tokens(self.loader, cfg.head_vocab_size,
                                            data_tokenizer.eos_ids)
            self.model = build_feature_head(self.loader.data.spec.target, head_ids,
                                            cfg.feature_intermediate_size, cfg.seed)
            self.tokenizer = data_tokenizer
        else:
            self.model, self.tokenizer = initial_model(cfg, data_tokenizer)
        if not self.feature_head and (cfg.init_layers is not None
                                      or cfg.head_vocab_size is not None):
            self.model = shape_draft(self.model, cfg, self.loader)
        if cfg.freeze_embeddings and not self.feature_head:
            # A draft's embedding is its sibling's, already trained on the target's
            # tokenizer; frozen, it needs no gradient or optimizer state (a 151,936-token
            # table is most of a small draft's parameters). A tied head stays trainable
            # through the shared weight, so tying and freezing exclude each other.
            if self.model.config.tie_embeddings:
                raise DraftlmError("freeze_embeddings needs an untied head (a tied head "
                                   "shares the embedding's weight)")
            self.model.embed_tokens.weight.requires_grad_(False)
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
        if self.feature_head:  # fc: [2 dim -> dim], forward and backward
            self.flops_per_token += 6.0 * 2 * self.config.dim ** 2

    def _restore(self, resume: bool) -> int:
        """The step to start from: the last checkpoint's when resuming, else 0."""
        if self.info.is_main:
            remove_stale(self.out / "checkpoints")
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
            batch = self.loader.next_batch()
            if isinstance(batch, dict):  # teacher windows: distillation
                batch = {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}
                tokens = batch["tokens"]
            else:
                tokens = batch.to(self.info.device, non_blocking=True)
            with gradient_sync(self.wrapped, micro == self.grad_accum - 1):
                loss = self.loss(batch, tokens)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr, loss_sum, grad_norm

    def loss(self, batch: dict[str, torch.Tensor] | torch.Tensor,
             tokens: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss: plain next-token cross-entropy, distillation from teacher
        windows, or a feature head's EAGLE loss."""
        cfg, head_ids = self.cfg, self.model.head_token_ids
        if self.feature_head:
            assert isinstance(batch, dict)
            with maybe_autocast(self.info.device, self.autocast):
                loss, _ = feature_head_loss(self.wrapped, batch, cfg.distill_loss,
                                            cfg.feature_regression, cfg.feature_noise,
                                            head_ids)
            return loss
        with maybe_autocast(self.info.device, self.autocast):
            logits = self.wrapped(tokens[:, :-1])
        if isinstance(batch, dict):
            return distill_loss(cfg.distill_loss, logits, batch["topk_ids"].long(),
                                batch["topk_logprobs"], tokens[:, 1:], head_ids)
        return distill_loss("ce", logits, None, None, tokens[:, 1:], head_ids)

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
        if self.feature_head:
            return self.validate_feature_head()
        val = evaluate(self.wrapped, self.val_data, self.cfg, self.info, self.autocast,
                       self.model.head_token_ids)
        if val is None:
            return {}
        record = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        if self.logger is not None:
            self.logger.log(record)
        return record

    def validate_feature_head(self) -> dict[str, Any]:
        """A feature head's validation on `val_teacher` (rank 0; {} without one)."""
        cfg = self.cfg
        if cfg.val_teacher is None or not self.info.is_main:
            return {}
        with maybe_autocast(self.info.device, self.autocast):
            val = evaluate_feature_head(self.model, cfg.val_teacher, cfg.eval_sequences,
                                        cfg.distill_loss, cfg.feature_regression,
                                        self.model.head_token_ids)
        if val is None:
            return {}
        record = {"step": self.step, **val}
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
        if self.cfg.export and self.step == self.cfg.max_steps and self.feature_head:
            if self.info.is_main:
                manifest = self.loader.data.manifest
                save_feature_head(self.out / "final", self.model, manifest["target_name"],
                                  manifest["target_fingerprint"],
                                  manifest["tokenizer_fingerprint"])
                summary["export"] = str(self.out / "final")
        elif self.cfg.export and self.step == self.cfg.max_steps:
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
    if not cfg.data and cfg.teacher is None:
        raise DraftlmError("the recipe names no data: set `data: [{path: PREPARED_FOLDER}]`")
    per_step = cfg.seq_len * cfg.micro_batch_size * info.world_size
    if cfg.global_batch_tokens % per_step:
        raise DraftlmError(f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple "
                           f"of seq_len x micro_batch_size x ranks = {per_step}")
    return cfg.global_batch_tokens // per_step


def build_data(
    cfg: TrainConfig, info: DistInfo,
) -> tuple[TokenLoader | TeacherLoader, list[PackedTokens], str]:
    """This rank's training loader, the validation splits (all of one tokenizer) and the
    prepared folder whose tokenizer they use. With a teacher, training windows and their
    target distributions come from the teacher folder, validation from its source data."""
    if cfg.draft_kind not in DRAFT_KINDS:
        raise DraftlmError(f"draft_kind must be one of {', '.join(DRAFT_KINDS)}, got "
                           f"{cfg.draft_kind!r}")
    if cfg.draft_kind == "feature-head":
        check_feature_head_recipe(cfg)
    if cfg.distill_loss not in LOSSES:
        raise DraftlmError(f"distill_loss must be one of {', '.join(LOSSES)}, got "
                           f"{cfg.distill_loss!r}")
    if cfg.teacher is not None:
        if cfg.data:
            raise DraftlmError("a recipe with a teacher trains on the teacher's windows: "
                               "leave `data` out (validation: `val_data`)")
        loader = TeacherLoader(cfg.teacher, cfg.micro_batch_size, cfg.seed, info.rank,
                               info.world_size)
        if loader.seq_len != cfg.seq_len:
            raise DraftlmError(f"seq_len {cfg.seq_len} differs from the teacher's windows "
                               f"({loader.seq_len}); set seq_len: {loader.seq_len}")
        source = loader.data.spec.data
        val_data = [PackedTokens(p, "val") for p in (cfg.val_data or [source])]
        if any(v.tokenizer_fingerprint != loader.data.tokenizer_fingerprint for v in val_data):
            raise DraftlmError("the validation data was prepared with another tokenizer than "
                               "the teacher's target")
        return loader, val_data, source
    datasets = [(d["path"], float(d.get("weight", 1.0))) for d in cfg.data]
    loader = TokenLoader(datasets, cfg.seq_len, cfg.micro_batch_size, cfg.seed, info.rank,
                         info.world_size)
    val_folders = cfg.val_data if cfg.val_data is not None else [p for p, _ in datasets]
    val_data = [PackedTokens(p, "val") for p in val_folders]
    check_same_tokenizer([*loader.data, *val_data])
    return loader, val_data, datasets[0][0]


DRAFT_KINDS = ("model", "feature-head")


def check_feature_head_recipe(cfg: TrainConfig) -> None:
    """A feature head trains on teacher windows that hold the target's features."""
    if cfg.teacher is None:
        raise DraftlmError("draft_kind feature-head trains on teacher shards: set `teacher`")
    for folder in (cfg.teacher, cfg.val_teacher):
        if folder is not None and not TeacherWindows(folder).spec.features:
            raise DraftlmError(f"{folder} holds no target features: a feature head needs "
                               "`draftlm teacher --features`")
    if cfg.init is not None or cfg.init_layers is not None:
        raise DraftlmError("a feature head starts from its target's last layer: leave `init` "
                           "and `init_layers` out")


# Tokens of each dataset counted to pick a truncated head's tokens.
HEAD_COUNT_TOKENS = 1 << 24


def frequent_head_tokens(loader: TokenLoader | TeacherLoader, size: int | None,
                         eos_ids: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The `size` tokens most frequent in the training corpus plus the end-of-generation
    tokens (all tokens when `size` is None): a truncated head's rows. Frequencies of the
    corpus (for a teacher: the data its windows came from), not of the teacher's windows
    alone, since a few thousand windows leave most tokens unseen. Deterministic, so a
    resumed run rebuilds the same head."""
    data = [PackedTokens(loader.data.spec.data, loader.data.spec.split)] \
        if isinstance(loader, TeacherLoader) else loader.data
    vocab_size = data[0].vocab_size
    if size is None:
        return torch.arange(vocab_size)
    windows = (torch.from_numpy(d.read(0, min(d.num_tokens, HEAD_COUNT_TOKENS))) for d in data)
    return frequent_tokens(token_counts(windows, vocab_size), size, eos_ids)


def shape_draft(model: Transformer, cfg: TrainConfig,
                loader: TokenLoader | TeacherLoader) -> Transformer:
    """`init_layers` and `head_vocab_size` applied to the starting model (`training.draft`):
    the head keeps the tokens most frequent in the training corpus, plus the model's
    end-of-generation tokens."""
    head_ids = None
    if cfg.head_vocab_size is not None:
        head_ids = frequent_head_tokens(loader, cfg.head_vocab_size, model.config.eos_ids)
    return prune(model, cfg.init_layers, head_ids)


def check_fits(cfg: TrainConfig, loader: TokenLoader | TeacherLoader,
               config: ModelConfig) -> None:
    """The data's token ids and the recipe's windows fit the model."""
    data = loader.data if isinstance(loader, TeacherLoader) else loader.data[0]
    if data.vocab_size > config.vocab_size:
        raise DraftlmError(f"the data's vocabulary ({data.vocab_size}) exceeds the "
                           f"model's ({config.vocab_size}); set model_overrides.vocab_size")
    if cfg.seq_len > config.max_seq_len:
        raise DraftlmError(f"seq_len {cfg.seq_len} exceeds the model's context "
                           f"{config.max_seq_len}")


# ---- evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val_data: list[PackedTokens], cfg: TrainConfig, info: DistInfo,
    autocast: torch.dtype | None, head_token_ids: torch.Tensor | None = None,
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
            # A truncated head (a draft's) scores the tokens it has; the others are skipped.
            total += distill_loss("ce", logits, None, None, batch[:, 1:], head_token_ids)
            count += 1
    model.train(was_training)
    if count == 0:
        return None
    return all_reduce_mean(total / count).item()
