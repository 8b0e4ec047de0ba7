"""Training sequences from prepared shards: stateful, deterministic, split across ranks.

A prepared split is one flat token stream (its shards memory-mapped end to end); window
`w` is the `seq_len + 1` tokens starting at `w * seq_len`, so inputs and shifted targets
come from one read and no shard is dropped for not dividing evenly. Windows are visited
in a pseudo-random order that is a pure function of (seed, epoch, position): a Feistel
permutation over the window indices, so it costs O(1) memory even for the 300M windows
of a 670B-token corpus, and a resumed run continues with exactly the windows the
uninterrupted run would have drawn.

Several datasets mix by weight through deterministic stride scheduling: sample `p` goes
to the dataset that is furthest behind its share. The whole state is one counter per
dataset (`state_dict`), which goes into the training checkpoint.

Every rank computes the same global micro-batch of `world_size * micro_batch_size`
windows and keeps its own slice, so N ranks with accumulation A see the same sequences
per optimizer step as one process with accumulation N * A.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from draftlm.errors import DraftlmError

_MASK64 = (1 << 64) - 1


class PackedTokens:
    """One split of a prepared folder as a flat, memory-mapped token stream."""

    def __init__(self, folder: str | Path, split: str) -> None:
        self.folder = Path(folder).expanduser()
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise DraftlmError(f"{self.folder} is not a prepared dataset (no manifest.json); "
                               "run `draftlm prepare` first")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DraftlmError(f"{path} is damaged ({err}); run `draftlm prepare` again") from err
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shards: list[np.ndarray] = []
        for shard in self.manifest["splits"][split]["shards"]:
            file = self.folder / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["num_tokens"] * dtype.itemsize:
                raise DraftlmError(f"shard {file} is missing or has the wrong size; "
                                   "run `draftlm prepare` again")
            self.shards.append(np.memmap(file, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.starts[-1])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < length:
            offset = start + done - int(self.starts[shard])
            piece = self.shards[shard][offset : offset + length - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            shard += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed round function (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        x = (x ^ np.uint64(key)) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
    return x


def permute(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A bijection of [0, n) applied to `indices`: a 4-round Feistel network over the
    smallest even power of two >= n, cycle-walking values that land outside [0, n)."""
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [int(_mix(np.array([seed & _MASK64], np.uint64), r + 1)[0]) for r in range(4)]

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << shift) | right

    out = rounds(np.asarray(indices, dtype=np.uint64))
    outside = out >= n
    while outside.any():
        out[outside] = rounds(out[outside])
        outside = out >= n
    return out.astype(np.int64)


def epoch_seed(seed: int, dataset: int, epoch: int) -> int:
    return (seed * 1_000_003 + dataset * 10_007 + epoch) & _MASK64


class TokenLoader:
    """`next_batch()` -> this rank's `[micro_batch_size, seq_len + 1]` int64 windows."""

    def __init__(
        self,
        datasets: Sequence[tuple[str | Path, float]],
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ) -> None:
        if not datasets:
            raise DraftlmError("no training data: give at least one prepared folder")
        self.data = [PackedTokens(folder, split) for folder, _ in datasets]
        weights = np.array([float(w) for _, w in datasets])
        if (weights <= 0).any():
            raise DraftlmError(f"mixture weights must be positive, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        check_same_tokenizer(self.data)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.windows = [d.num_windows(seq_len) for d in self.data]
        for (folder, _), count in zip(datasets, self.windows, strict=True):
            if count == 0:
                raise DraftlmError(f"{folder} holds fewer than seq_len + 1 = {seq_len + 1} "
                                   f"{split} tokens; prepare more data or lower seq_len")
        self.counts = [0] * len(self.data)

    def _choose(self) -> int:
        """The dataset furthest behind its share after this sample (stride scheduling)."""
        total = sum(self.counts) + 1
        deficits = [w * total - c for w, c in zip(self.weights, self.counts, strict=True)]
        return int(np.argmax(deficits))

    def next_batch(self) -> torch.Tensor:
        rows = []
        first = self.rank * self.micro_batch_size
        for slot in range(self.world_size * self.micro_batch_size):
            i = self._choose()
            position = self.counts[i]
            self.counts[i] += 1
            if first <= slot < first + self.micro_batch_size:
                epoch, index = divmod(position, self.windows[i])
                window = int(permute(np.array([index]), self.windows[i],
                                     epoch_seed(self.seed, i, epoch))[0])
                rows.append(self.data[i].read(window * self.seq_len, self.seq_len + 1))
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "seed": self.seed, "seq_len": self.seq_len,
                "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["counts"]) != len(self.data) or state["seq_len"] != self.seq_len:
            raise DraftlmError("the checkpoint's data position belongs to another data "
                               "mixture or seq_len; resume with the recipe it was made with")
        self.counts = [int(c) for c in state["counts"]]


def check_same_tokenizer(data: Sequence[PackedTokens]) -> None:
    fingerprints = {d.tokenizer_fingerprint for d in data}
    if len(fingerprints) > 1:
        raise DraftlmError("the datasets were prepared with different tokenizers: "
                           + ", ".join(str(d.folder) for d in data))


def val_batches(
    data: PackedTokens, seq_len: int, micro_batch_size: int, max_sequences: int,
    rank: int = 0, world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The first `max_sequences` validation windows in order (the same every evaluation),
    rank r taking every world_size-th micro-batch; ranks get equally many batches."""
    count = min(max_sequences, data.num_windows(seq_len))
    num_batches = count // (micro_batch_size * world_size)
    for b in range(num_batches):
        start = (b * world_size + rank) * micro_batch_size
        rows = [data.read(w * seq_len, seq_len + 1) for w in range(start, start + micro_batch_size)]
        yield torch.from_numpy(np.stack(rows))
