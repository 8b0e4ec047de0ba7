"""Teacher shards: a target's top-k log-probabilities over training windows, computed once.

Distilling a draft needs the target's distribution at every training position, and the
target is the expensive model: on a 2-core CPU a 1.5B target reads a few dozen tokens a
second. So its outputs are computed once into shards and reused by every epoch and every
run that trains a draft for that target (DistillSpec's "offline" setting).

A teacher folder holds `manifest.json` and shards `teacher-NNNNN.safetensors`, each with
`tokens` [n, seq_len + 1] (the window, so that the shards alone train a draft),
`topk_ids` [n, seq_len, k] (int32) and `topk_logprobs` [n, seq_len, k] (float16; log-
probabilities under the full softmax, so the tail's mass is 1 - sum exp), and with
`features` also `features` [n, seq_len, dim] (bfloat16): the target's last normalised hidden
states, which a feature-level draft head (EAGLE) learns to continue. Windows are
taken from a prepared dataset (`draftlm prepare`) in a seeded random order; a shard is
written to a temporary file and renamed, then the manifest is rewritten, so an
interrupted run resumes after the last whole shard and never leaves one that loads.

The manifest names the target (its name, a fingerprint of its weights' shapes and
configuration, its tokenizer's fingerprint, the quantization it ran at): a draft trained
for one target refuses shards made by another.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from draftlm.data.loader import PackedTokens, epoch_seed, permute
from draftlm.errors import DraftlmError
from draftlm.load import LM, load, target_fingerprint

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher folder holds; a resumed run must ask for the same."""

    target: str  # model name or path, as given to `draftlm.load`
    data: str  # the prepared dataset the windows come from
    split: str = "train"
    seq_len: int = 512
    top_k: int = 32
    seed: int = 0
    quantize: str = "none"
    dtype: str = "auto"
    features: bool = False  # also store the target's last hidden states (feature heads)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise DraftlmError(f"teacher seq_len must be >= 2, got {self.seq_len}")
        if not 1 <= self.top_k <= 1024:
            raise DraftlmError(f"teacher top_k must be in [1, 1024], got {self.top_k}")


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DraftlmError(f"{path} is damaged ({err}); delete the folder and compute the "
                           "teacher shards again") from err
    if manifest.get("format") != "draftlm-teacher" or "spec" not in manifest:
        raise DraftlmError(f"{folder} is not a teacher folder (no draftlm-teacher manifest)")
    return manifest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.inference_mode()
def teacher_targets(lm: LM, windows: torch.Tensor, top_k: int,
                    features: bool = False) -> dict[str, Tensor]:
    """`topk_ids` (int32 [n, L, k]) and `topk_logprobs` (float16 [n, L, k]) of the target
    over the first L tokens of each window [n, L + 1], and with `features` its last hidden
    states (bfloat16 [n, L, dim]); one window per forward pass (bounded memory)."""
    out: dict[str, list[Tensor]] = {"topk_ids": [], "topk_logprobs": [], "features": []}
    for window in windows:
        hidden = lm.model.features(window[None, :-1].to(lm.device))
        logits = lm.model.lm_head(hidden)[0].float()
        top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        out["topk_ids"].append(top.indices.to(torch.int32).cpu())
        out["topk_logprobs"].append(top.values.to(torch.float16).cpu())
        if features:
            out["features"].append(hidden[0].to(torch.bfloat16).cpu())
    return {key: torch.stack(value) for key, value in out.items() if value}


def compute_teacher(
    target: str,
    data: str,
    output: str,
    num_windows: int,
    seq_len: int = 512,
    top_k: int = 32,
    windows_per_shard: int = 8,
    split: str = "train",
    seed: int = 0,
    quantize: str = "none",
    dtype: str = "auto",
    max_minutes: float | None = None,
    progress: bool = True,
    features: bool = False,
) -> dict[str, Any]:
    """Compute (or continue computing) `num_windows` windows of teacher targets into
    `output`. `max_minutes` stops after the shard that crosses it (a time-sliced job:
    run the same command again to continue). Returns the manifest."""
    spec = TeacherSpec(target, str(data), split, seq_len, top_k, seed, quantize, dtype,
                       features)
    if num_windows < 1:
        raise DraftlmError(f"--num-windows must be >= 1, got {num_windows}")
    if windows_per_shard < 1:
        raise DraftlmError(f"--windows-per-shard must be >= 1, got {windows_per_shard}")
    folder = Path(output).expanduser()
    source = PackedTokens(data, split)
    available = source.num_windows(seq_len)
    if available < num_windows:
        raise DraftlmError(f"{data} holds {available} {split} windows of {seq_len + 1} tokens, "
                           f"fewer than --num-windows {num_windows}")
    manifest = _read_manifest(folder)
    if manifest is not None and TeacherSpec(**manifest["spec"]) != spec:
        raise DraftlmError(f"{folder} holds teacher shards made with other settings "
                           f"({manifest['spec']}); use another --output")
    lm = load(target, dtype=dtype, quantize=quantize)
    if lm.tokenizer.fingerprint != source.tokenizer_fingerprint:
        raise DraftlmError(f"{data} was prepared with another tokenizer than target {lm.name}; "
                           f"prepare it with --tokenizer {target}")
    if seq_len > lm.config.max_seq_len:
        raise DraftlmError(f"seq_len {seq_len} exceeds the target's context "
                           f"{lm.config.max_seq_len}")
    fingerprint = target_fingerprint(lm)
    if manifest is None:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": "draftlm-teacher", "version": FORMAT_VERSION,
                    "spec": asdict(spec), "target_name": lm.name,
                    "target_fingerprint": fingerprint,
                    "tokenizer_fingerprint": lm.tokenizer.fingerprint,
                    "vocab_size": lm.config.vocab_size, "shards": [], "target_seconds": 0.0}
    elif manifest["target_fingerprint"] != fingerprint:
        raise DraftlmError(f"{folder} was computed by another target than {lm.name}")
    order = permute(np.arange(num_windows), available, seed)  # the first num_windows of it
    done = sum(s["num_windows"] for s in manifest["shards"])
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("teacher", total=num_windows, completed=done)
        while done < num_windows:
            count = min(windows_per_shard, num_windows - done)
            rows = [source.read(int(w) * seq_len, seq_len + 1) for w in order[done:done + count]]
            windows = torch.from_numpy(np.stack(rows))
            start = time.perf_counter()
            targets = teacher_targets(lm, windows, top_k, features)
            seconds = time.perf_counter() - start
            name = f"teacher-{len(manifest['shards']):05d}.safetensors"
            tmp = folder / f".{name}.tmp-{os.getpid()}"
            save_file({"tokens": windows.to(torch.int64), **targets}, str(tmp))
            os.replace(tmp, folder / name)
            manifest["shards"].append({"file": name, "num_windows": count,
                                       "first_window": done})
            manifest["target_seconds"] = round(manifest["target_seconds"] + seconds, 3)
            _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
            done += count
            bar.update(task, completed=done,
                       description=f"teacher {count * seq_len / seconds:,.1f} tok/s")
            if deadline is not None and time.monotonic() > deadline:
                break
    manifest["complete"] = done >= num_windows
    return manifest


class TeacherWindows:
    """The windows of a teacher folder with their targets, read a shard at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise DraftlmError(f"{self.folder} holds no teacher shards (no {MANIFEST}); "
                               "compute them with `draftlm teacher` first")
        self.manifest = manifest
        self.spec = TeacherSpec(**manifest["spec"])
        self.starts = np.cumsum([0] + [s["num_windows"] for s in manifest["shards"]])
        self.num_windows = int(self.starts[-1])
        if self.num_windows == 0:
            raise DraftlmError(f"{self.folder} holds no finished teacher shard yet")
        self._cache: tuple[int, dict[str, Tensor]] | None = None

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def vocab_size(self) -> int:
        """The target's vocabulary size (token ids and teacher ids lie below it)."""
        return int(self.manifest["vocab_size"])

    def _shard(self, index: int) -> dict[str, Tensor]:
        if self._cache is None or self._cache[0] != index:
            path = self.folder / self.manifest["shards"][index]["file"]
            try:
                tensors = load_file(str(path))
            except (OSError, SafetensorError) as err:
                raise DraftlmError(f"teacher shard {path} is missing or damaged ({err})") from err
            self._cache = (index, tensors)
        return self._cache[1]

    def read(self, window: int) -> dict[str, Tensor]:
        """Window `window`: tokens [L + 1], topk_ids [L, k], topk_logprobs [L, k]."""
        if not 0 <= window < self.num_windows:
            raise IndexError(window)
        shard = int(np.searchsorted(self.starts, window, side="right")) - 1
        row = window - int(self.starts[shard])
        return {key: value[row] for key, value in self._shard(shard).items()}


class TeacherLoader:
    """`next_batch()` -> this rank's micro-batch of teacher windows, as a dict of tensors
    [micro_batch_size, ...]. The window order is `data.loader.TokenLoader`'s: a seeded
    permutation per epoch, every rank computing the global batch and keeping its slice;
    the state is one counter (`state_dict`), so resuming is exact."""

    def __init__(self, folder: str | Path, micro_batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.data = TeacherWindows(folder)
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.count = 0

    @property
    def seq_len(self) -> int:
        return self.data.spec.seq_len

    def next_batch(self) -> dict[str, Tensor]:
        first = self.count + self.rank * self.micro_batch_size
        self.count += self.world_size * self.micro_batch_size
        rows = []
        for position in range(first, first + self.micro_batch_size):
            epoch, index = divmod(position, self.data.num_windows)
            window = int(permute(np.array([index]), self.data.num_windows,
                                 epoch_seed(self.seed, 0, epoch))[0])
            rows.append(self.data.read(window))
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "seed": self.seed, "num_windows": self.data.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_windows"]) != self.data.num_windows:
            raise DraftlmError(
                f"the checkpoint was trained on {state['num_windows']} teacher windows but "
                f"{self.data.folder} now holds {self.data.num_windows}; resume with the same "
                "teacher folder, or start a new run")
        self.count = int(state["count"])


def iter_windows(folder: str | Path) -> Iterator[dict[str, Tensor]]:
    """Every window of a teacher folder in stored order (evaluation, inspection)."""
    data = TeacherWindows(folder)
    for window in range(data.num_windows):
        yield data.read(window)
