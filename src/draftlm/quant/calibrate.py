"""Activation statistics for 4-bit quantization: how much each input column of a layer matters.

A weight's rounding error reaches the layer's output multiplied by the activation in its
column, so a quantizer that minimises plain weight error spends its grid on columns whose
activations are tiny as readily as on the few large ones. llama.cpp's importance matrix
(`llama-imatrix`) measures the mean squared activation per input column on some text and
weights the 4-bit search by it (`gguf_int4.Int4Groups.quantize`); this module does the same
for draftlm's float model before `quant.layers.quantize_model` replaces its layers.

The text is Python's own standard library source (code with English comments and
docstrings): it ships with every interpreter, so calibration needs no download and gives
the same statistics on every machine with the same Python. The result is cached per model
file under the draftlm cache (`importance/`), since a float forward pass over the
calibration tokens takes tens of seconds for a 1.5B model on two cores.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

from draftlm.formats.registry import cache_dir

# Standard-library modules whose source is the calibration text (none of them is used by
# draftlm's own perplexity checks, which read colorsys).
CALIBRATION_MODULES = ("argparse", "dataclasses", "difflib", "json.encoder", "calendar",
                       "string", "tokenize", "enum")
CALIBRATION_TOKENS = 2048
VERSION = 1  # bump when the statistic or the text changes: old cache files are not reused


def calibration_text(modules: Sequence[str] = CALIBRATION_MODULES) -> str:
    """The source code of `modules`, one after another."""
    parts = []
    for name in modules:
        path = importlib.import_module(name).__file__
        if path is not None:
            parts.append(Path(path).read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def calibration_windows(tokenizer, num_tokens: int = CALIBRATION_TOKENS) -> list[Tensor]:
    """About `num_tokens` tokens of calibration text as [1, n] batches: the beginning of
    each module's source, an equal share each, so every window starts at a file's start."""
    budget = max(1, num_tokens // len(CALIBRATION_MODULES))
    windows = []
    for name in CALIBRATION_MODULES:
        ids = tokenizer.encode(calibration_text([name]))[:budget]
        if ids:
            windows.append(torch.tensor([ids], dtype=torch.long))
    return windows


@torch.no_grad()
def activation_importance(model: nn.Module, windows: Sequence[Tensor]) -> dict[str, Tensor]:
    """Mean squared input activation per column, float32 [in_features], for every
    `nn.Linear` of `model`, keyed by module name (`model.layers.0.mlp.down_proj`)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    try:
        device = next(model.parameters()).device
        for window in windows:
            model(window.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: (total / counts[name]).cpu() for name, total in sums.items()}


def _cache_path(source: Path, cache: Path) -> Path:
    """Cache file for `source` (a GGUF file or checkpoint folder): keyed by its absolute
    path, size and modification time, and by the calibration text and VERSION."""
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps([VERSION, CALIBRATION_MODULES, CALIBRATION_TOKENS, stamp])
    return cache / "importance" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def cached_importance(model: nn.Module, tokenizer, source: Path | None,
                      cache: Path | None = None) -> dict[str, Tensor]:
    """`activation_importance` of `model` on the calibration text, read from / written to
    the cache when the model came from a file or folder (`source`)."""
    path = _cache_path(source, cache or cache_dir()) if source is not None else None
    if path is not None and path.exists():
        try:
            return load_file(path)
        except Exception:  # a torn or foreign file: compute again and replace it
            pass
    importance = activation_importance(model, calibration_windows(tokenizer))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in importance.items()}, partial)
        partial.replace(path)  # atomic: a reader never sees half a file
    return importance
