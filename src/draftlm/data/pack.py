"""Packing for `draftlm prepare`: token streams cut into fixed-size shard files, and the
saved position of an unfinished run.

Each split's stream is cut into shards of exactly `shard_tokens` ids (the last one may be
shorter), written atomically (temporary name, fsync, rename). After every batch that
completed a shard the position is saved: documents read, finished shards, the tokens
waiting for the next shard, and the counts so far. The pending tokens go into files
named after that position, so a state file never points at pending tokens of another
position, whatever moment a run is killed at.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

STATE = ".prepare-state.json"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` (the last one
    may be shorter)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, ids: np.ndarray) -> bool:
        """Append a document; True when a shard was written."""
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        wrote = False
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self.pending, self.pending_tokens = [rest], len(rest)
            wrote = True
        return wrote

    def finish(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0

    def pending_array(self) -> np.ndarray:
        return np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        data = tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        write_atomic(self.folder / name, data)
        self.shards.append({"file": name, "num_tokens": len(tokens),
                            "sha256": hashlib.sha256(data).hexdigest()})


def save_state(out: Path, settings_hash: str, docs_end: int,
                writers: dict[str, ShardWriter], stats: dict[int, dict[str, Any]]) -> None:
    """The position after a batch: shards done, unfinished shard contents, counts. The
    pending files carry the position in their name, so a state file never points at
    pending tokens of another position."""
    pending = {}
    for split, writer in writers.items():
        name = f".pending-{split}-{docs_end}.bin"
        write_atomic(out / name, writer.pending_array().tobytes())
        pending[split] = name
    state = {"settings_hash": settings_hash, "docs_end": docs_end, "pending": pending,
             "shards": {s: w.shards for s, w in writers.items()},
             "stats": {str(i): {**s, "skipped": dict(s["skipped"])} for i, s in stats.items()}}
    write_atomic(out / STATE, json.dumps(state).encode())
    for path in out.glob(".pending-*.bin"):
        if path.name not in pending.values():
            path.unlink()


def restore_state(state: dict[str, Any], out: Path, writers: dict[str, ShardWriter],
             stats: dict[int, dict[str, Any]], dtype: np.dtype) -> int:
    for split, writer in writers.items():
        for shard in state["shards"][split]:
            path = out / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["num_tokens"] * dtype.itemsize:
                return 0  # a finished shard went missing: start over
        writer.shards = list(state["shards"][split])
        pending = np.fromfile(out / state["pending"][split], dtype=dtype)
        writer.pending, writer.pending_tokens = [pending], len(pending)
    for key, saved in state["stats"].items():
        stats[int(key)].update({**saved, "skipped": Counter(saved["skipped"])})
    return int(state["docs_end"])


def clear_state(out: Path) -> None:
    for path in [out / STATE, *out.glob(".pending-*.bin")]:
        path.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged state or manifest is treated as absent: prepare again
