"""Distributed training through torchrun: process-group setup and model wrapping.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (one node or many, `--nnodes` and a
rendezvous endpoint); this module only reads them. NCCL on GPUs, gloo on CPU so that the
multi-process path runs (and is tested) on a laptop. The model is wrapped the torchtitan
way, as small functions applied to a plain `Transformer`: activation checkpointing and
`compile` per block, then DDP or FSDP2 (`fully_shard` on every block, then the root).
Mixed precision is autocast around the forward pass (`maybe_autocast`), bf16 where the
hardware has it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from draftlm.errors import DraftlmError
from draftlm.load import cpu_has_fast_bf16
from draftlm.model import Transformer

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job, if there is one; a plain `python` run is a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = resolve_device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DraftlmError("device cuda requested but no GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(kind)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", device_id=dev
                                if kind == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (the value itself in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy not in STRATEGIES:
        raise DraftlmError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if world_size == 1:
        return "none"  # wrapping one process only adds overhead
    return "ddp" if strategy == "auto" else strategy


def parallelize(
    model: Transformer, info: DistInfo, strategy: str, activation_checkpointing: bool = False,
    compile_model: bool = False,
) -> nn.Module:
    """Wrap `model` (already on `info.device`) for training; returns the module to call.

    Parameter names are unchanged by every wrapper, as far as `state_dict` and the
    `torch.distributed.checkpoint.state_dict` helpers are concerned."""
    strategy = resolve_strategy(strategy, info.world_size)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if compile_model:
        for block in model.layers:
            block.compile()  # in place: names stay `layers.N....`
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not dist.is_initialized():
            raise DraftlmError("strategy ddp needs a torchrun launch (WORLD_SIZE > 1)")
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if hasattr(module, "no_sync") and not sync:  # DDP
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    yield


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype `precision` (auto | bf16 | fp32) autocasts to on `device`; None for fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise DraftlmError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def maybe_autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
