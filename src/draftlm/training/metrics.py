"""What a training run reports: metrics JSONL (+ TensorBoard when installed), throughput
and MFU, a progress bar while a terminal watches, and the loss-curve PNG at the end.

MFU follows the PaLM paper's appendix B: model FLOPs per token = 6 * (parameters that
take part in matmuls, i.e. all but the input embedding) + 12 * layers * dim * seq_len
(attention scores and values, forward + backward), divided by the hardware's dense peak.
The peak is an assumption, so it is logged with the run and settable (`peak_flops`):
- CUDA: the dense bf16 figure of the card from a small table (H100/H200 989 TFLOP/s,
  A100 312, MI250X 383, MI300X 1307); unknown cards report no MFU unless `peak_flops` is set.
- CPU: threads x base clock x FLOPs per cycle per core, with 32 fp32 FLOPs/cycle for AVX2
  (two 8-wide FMA units) and 64 with AVX-512 (bf16 AMX is not counted: set `peak_flops`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from draftlm.config import ModelConfig

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "MI250X": 383e12,
                 "MI250": 362e12, "MI300X": 1307e12, "L40S": 362e12, "A10G": 70e12}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, PaLM-style."""
    d, layers = config.dim, config.n_layers
    q = d * config.n_heads * config.head_dim
    kv = 2 * d * config.n_kv_heads * config.head_dim
    attn = q + kv + config.n_heads * config.head_dim * d
    mlp = 3 * d * config.intermediate_size
    head = config.head_vocab_size or config.vocab_size  # a draft's truncated head is smaller
    matmul_params = layers * (attn + mlp) + d * head
    return 6.0 * matmul_params + 12.0 * layers * config.n_heads * config.head_dim * seq_len


def default_peak_flops(device: torch.device) -> float | None:
    """Dense peak FLOP/s of one device under the assumptions in the module docstring."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
        return None
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)]
    if not mhz:
        return None
    per_cycle = 64 if "avx512f" in info else 32 if "avx2" in info else 16
    return torch.get_num_threads() * max(mhz) * 1e6 * per_cycle


class MetricsLogger:
    """Appends one JSON object per event to `metrics.jsonl`; mirrors scalars to
    TensorBoard when `tensorboard` is installed and wanted. Only rank 0 makes one."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None = None) -> None:
        """A fresh run starts a new file; a resumed one keeps the records up to its
        checkpoint's step and drops what the interrupted run logged after it."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] \
            if resume_step is not None else []
        self.file = self.path.open("w")
        for record in kept:
            self.file.write(json.dumps(record) + "\n")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: JSONL is the record, TensorBoard a viewer
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Training and validation loss against step; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


class ProgressBar:
    """Steps done, loss and tokens/s on stderr while a terminal watches (rank 0)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.progress = None
        if enabled and sys.stderr.isatty():
            self.progress = Progress()
            self.task = self.progress.add_task("train", total=total, completed=start)
            self.progress.start()

    def update(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            text = f"loss {record['loss']:.3f}  {record['tokens_per_second']:,.0f} tok/s"
            self.progress.update(self.task, completed=record["step"], description=text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class ThroughputWindow:
    """Tokens trained since the last log over the time they took; evaluating and saving
    restart the clock, as they are not training."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.tokens = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def tokens_per_second(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)
