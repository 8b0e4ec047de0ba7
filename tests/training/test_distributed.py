"""torchrun with 2 gloo processes (DDP and FSDP2) learns what one process learns, and
a stopped FSDP2 run resumes to the identical losses.

The same global batch (128 tokens: 1 process x 2 micro-steps, or 2 processes x 1) gives
the same losses up to float32 reduction order: |difference| < 1e-5 nats per step over 6
steps, and checkpointed weights agree to 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import byte_tokenizer
from safetensors.torch import load_file

from draftlm.data.prepare import prepare
from draftlm.training.distributed import resolve_strategy
from draftlm.training.metrics import read_metrics

TOLERANCE = 1e-5


def _run(args: list[str], nproc: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "draftlm.cli"]
    if nproc > 1:
        torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
        launcher = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "draftlm.cli"]
    result = subprocess.run([*launcher, "pretrain", *args, "--out-dir", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    src = tmp_path / "docs.txt"
    src.write_text("".join(f"line {i} of a small corpus for two ranks.\n" for i in range(400)))
    prepare([str(src)], str(tmp_path / "data"), byte_tokenizer(), val_fraction=0.0,
            workers=1, progress=False)
    args = ["--data", str(tmp_path / "data"), "--max-steps", "6", "--seq-len", "32",
            "--micro-batch-size", "2", "--global-batch-tokens", "128", "--device", "cpu",
            "--precision", "fp32", "--set", "log_interval=1", "--set", "eval_interval=0",
            "--set", "export=false", "--set", "tensorboard=false", "--set", "warmup_steps=2",
            "--set", "lr=1e-3", "--set", "cpu_threads=1"]
    single = _run(args, 1, tmp_path / "one")
    assert single[0]["grad_accum"] == 2
    reference = [r["loss"] for r in single if "loss" in r]
    weights = load_file(tmp_path / "one" / "checkpoints" / "step-000006" / "model.safetensors")
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        records = _run([*args, "--strategy", strategy], 2, out)
        assert records[0]["world_size"] == 2 and records[0]["grad_accum"] == 1
        got = [r["loss"] for r in records if "loss" in r]
        assert len(got) == len(reference) == 6
        assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) < TOLERANCE
        other = load_file(out / "checkpoints" / "step-000006" / "model.safetensors")
        assert other.keys() == weights.keys()
        for name, tensor in weights.items():
            assert (other[name] - tensor).abs().max() < TOLERANCE, name
    # FSDP2: stop at step 3, resume from the sharded run's checkpoint -> the same losses
    fsdp = [r["loss"] for r in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "loss" in r]
    cut = tmp_path / "fsdp-cut"
    _run([*args, "--strategy", "fsdp", "--stop-at", "3"], 2, cut)
    records = _run([*args, "--strategy", "fsdp", "--resume"], 2, cut)
    assert [r["loss"] for r in records if "loss" in r] == fsdp


def test_strategy_resolution() -> None:
    assert resolve_strategy("auto", 1) == "none"
    assert resolve_strategy("fsdp", 1) == "none"
    assert resolve_strategy("auto", 4) == "ddp"
    assert resolve_strategy("fsdp", 4) == "fsdp"
    from draftlm.errors import DraftlmError

    with pytest.raises(DraftlmError, match="unknown strategy"):
        resolve_strategy("zero3", 2)
