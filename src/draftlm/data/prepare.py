"""`draftlm prepare`: documents -> token ids packed into fixed-size shards, with a manifest.

The output folder holds `train-00000.bin`, ..., `val-00000.bin`, ...: raw little-endian
uint16 token ids (uint32 when the vocabulary does not fit 16 bits) that `numpy.memmap`
reads directly, every document followed by EOS (and preceded by BOS with `--bos`, as AMD
did), so a sequence may cross document boundaries like in every packed pretraining set.
`manifest.json` records the sources, the rule parameters, document/token/skip counts,
the tokenizer's fingerprint, the dtype and every shard's size and SHA-256; `files.jsonl`
(`corpus.Ledger`) says for every file read as one document which split it went to or why
it was dropped; `tokenizer/` holds a copy of the tokenizer so that training can export a
complete model folder.

Which documents are kept is `corpus`'s business: size and line limits, Codex's filters
for code, a syntax check, decontamination against HumanEval, exact and near
deduplication, and the split by the hash of the content or of the file's name.

Determinism: files are read in sorted order, every rule decides from the document and
the ones before it, and worker processes return results in order, so the same inputs
give the same bytes. After every shard, the position (documents read, unfinished shard
contents) is saved; a re-run continues from there and keeps the finished shards instead
of starting over.

A Python code corpus for a Qwen2.5-Coder draft, from the code this machine has:

    draftlm prepare python-local --tokenizer qwen2.5-coder-1.5b --split-by path \
        --val-fraction 0.02 --max-doc-bytes 1000000 --max-line-chars 1000 \
        --max-mean-line-chars 100 --min-alnum-fraction 0.25 --skip-generated \
        --parse-python --near-dedup 0.85 --decontaminate humaneval \
        --output runs/python-local-qwen
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from tokenizers import Tokenizer as HFTokenizer

from draftlm.data.corpus import (
    DECONTAMINATE,
    SPLIT_BY,
    SPLITS,
    Batch,
    BenchmarkSignatures,
    CorpusRules,
    Ledger,
    NearDuplicates,
    read_corpus,
    rules_manifest,
)
from draftlm.data.pack import (
    STATE,
    ShardWriter,
    clear_state,
    read_json,
    restore_state,
    save_state,
    write_atomic,
)
from draftlm.data.sources import describe_source, expand_source
from draftlm.errors import DraftlmError
from draftlm.formats.gguf import open_gguf, read_metadata
from draftlm.formats.gguf_tokenizer import tokenizer_from_gguf
from draftlm.formats.hf import read_hf_config, read_hf_tokenizer
from draftlm.formats.registry import REAL_MODELS, gguf_path
from draftlm.load import model_cache_folder
from draftlm.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BATCH_DOCS = 256  # documents per task sent to a worker


# ---- tokenizer --------------------------------------------------------------------------
def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a HF folder (or its tokenizer.json), a .gguf file or a registry
    model name; `draftlm tokenizer train` writes such a folder. A registry model's
    tokenizer comes from its converted folder when `draftlm pull` made one, else from
    its GGUF file's metadata (the same tokenizer, without converting the weights)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(read_metadata(open_gguf(path)))
    if path.is_dir():
        config = read_hf_config(path) if (path / "config.json").is_file() else None
        return read_hf_tokenizer(path, config)

    if spec in REAL_MODELS:
        folder = model_cache_folder(spec)
        if (folder / "config.json").is_file():
            return read_hf_tokenizer(folder, read_hf_config(folder))
        return tokenizer_from_gguf(read_metadata(open_gguf(gguf_path(spec))))
    raise DraftlmError(
        f"no tokenizer {spec!r}: pass a folder with tokenizer.json, a .gguf file or one of "
        f"{', '.join(REAL_MODELS)}"
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---- workers ----------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, prefix: list[int], suffix: list[int], dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(backend=HFTokenizer.from_str(tokenizer_json), prefix=prefix, suffix=suffix,
                   dtype=np.dtype(dtype))


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    backend, prefix, suffix = _WORKER["backend"], _WORKER["prefix"], _WORKER["suffix"]
    return [
        np.asarray(prefix + enc.ids + suffix, dtype=_WORKER["dtype"])
        for enc in backend.encode_batch(texts, add_special_tokens=False)
    ]


# ---- prepare ----------------------------------------------------------------------------
def prepare(
    sources: Sequence[str],
    output: str,
    tokenizer: str | Tokenizer,
    field: str = "text",
    val_fraction: float = 0.005,
    shard_tokens: int = 2048 * 2049,
    max_line_chars: int = 10_000,
    dedup: bool = True,
    bos: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    exclude: Sequence[str] = (),
    split_by: str = "content",
    max_doc_bytes: int = 0,
    max_mean_line_chars: float = 0.0,
    min_alnum_fraction: float = 0.0,
    skip_generated: bool = False,
    parse_python: bool = False,
    near_dedup: float = 0.0,
    decontaminate: Sequence[str] = (),
) -> dict[str, Any]:
    """Tokenize `sources` into shards under `output`; returns the manifest. The rule
    arguments are `corpus.CorpusRules`' fields."""
    if not sources:
        raise DraftlmError("prepare needs at least one source")
    rules = CorpusRules(
        field=field, val_fraction=val_fraction, split_by=split_by,
        max_line_chars=max_line_chars, max_doc_bytes=max_doc_bytes,
        max_mean_line_chars=max_mean_line_chars, min_alnum_fraction=min_alnum_fraction,
        skip_generated=skip_generated, parse_python=parse_python, dedup=dedup,
        near_dedup=near_dedup, decontaminate=tuple(sorted(set(decontaminate))))
    rules.check()
    if shard_tokens < 1:
        raise DraftlmError(f"--shard-tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not tok.eos_ids:
        raise DraftlmError("the tokenizer names no EOS token; documents need a separator")
    if bos and tok.bos_id is None:
        raise DraftlmError("--bos given but the tokenizer has no BOS token")
    dtype = token_dtype(tok.vocab_size)
    files = [f for i, s in enumerate(sources) for f in expand_source(s, i, exclude)]
    rules.check_files(files)
    signatures = BenchmarkSignatures.humaneval() if "humaneval" in rules.decontaminate else None
    near = NearDuplicates(near_dedup) if near_dedup else None
    settings = {
        "format_version": FORMAT_VERSION, "sources": list(sources),
        "files": [[str(f.path), f.path.stat().st_size] for f in files],
        "tokenizer_fingerprint": tok.fingerprint, "shard_tokens": shard_tokens, "bos": bos,
        "dtype": dtype.name, "rules": rules_manifest(rules, signatures, near),
    }
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    finished = read_json(out / MANIFEST)
    if finished is not None and not overwrite:
        if finished.get("settings_hash") == settings_hash:
            return finished  # already prepared from exactly these inputs
        raise DraftlmError(
            f"{out} holds data prepared with other settings or inputs; choose another "
            "--output or pass --overwrite"
        )
    state = read_json(out / STATE)
    if state is not None and (overwrite or state.get("settings_hash") != settings_hash):
        state = None
    if finished is not None:
        (out / MANIFEST).unlink()
    tok.save(out / "tokenizer")

    writers = {s: ShardWriter(out, s, shard_tokens, dtype) for s in SPLITS}
    stats = {i: {"source": s, "documents": 0, "tokens": 0, "duplicates": 0,
                 "skipped": Counter()} for i, s in enumerate(sources)}
    start_doc = 0
    if state is not None:
        start_doc = restore_state(state, out, writers, stats, dtype)

    prefix = [tok.bos_id] if bos else []
    suffix = [tok.eos_ids[0]]
    ledger = Ledger(out)
    batches = read_corpus(files, rules, start_doc, BATCH_DOCS, ledger, signatures, near)
    init_args = (tok.backend.to_str(), prefix, suffix, dtype.name)
    num_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = _Progress(len(files), enabled=progress)
    if num_workers == 1:
        _init_worker(*init_args)
        results = ((b, _encode_batch(b.texts)) for b in batches)
        _pack(results, writers, stats, out, settings_hash, bar)
    else:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with context.Pool(num_workers, _init_worker, init_args) as pool:
            _pack(_in_order(pool, batches, 2 * num_workers), writers, stats, out,
                  settings_hash, bar)
    bar.close()
    for writer in writers.values():
        writer.finish()
    files_summary = ledger.close()
    manifest = {
        "format_version": FORMAT_VERSION, "settings_hash": settings_hash,
        "dtype": dtype.name, "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint, "eos_id": tok.eos_ids[0],
        "bos_id": tok.bos_id if bos else None, "shard_tokens": shard_tokens,
        "val_fraction": val_fraction, "dedup": dedup, "field": field,
        "rules": settings["rules"],
        "sources": [{**s, **describe_source(s["source"]),
                     "skipped": dict(sorted(s["skipped"].items()))} for s in stats.values()],
        "files": files_summary,
        "splits": {s: {"num_tokens": sum(x["num_tokens"] for x in w.shards),
                       "shards": w.shards} for s, w in writers.items()},
    }
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    clear_state(out)
    return manifest


def _in_order(
    pool: Any, batches: Iterator[Batch], max_in_flight: int
) -> Iterator[tuple[Batch, list[np.ndarray]]]:
    """Encoded batches in reading order, with at most `max_in_flight` batches read ahead
    (Pool.imap would read the whole input into memory while the workers lag behind)."""
    in_flight: deque[tuple[Batch, Any]] = deque()
    for batch in batches:
        in_flight.append((batch, pool.apply_async(_encode_batch, (batch.texts,))))
        if len(in_flight) >= max_in_flight:
            done, result = in_flight.popleft()
            yield done, result.get()
    while in_flight:
        done, result = in_flight.popleft()
        yield done, result.get()


def _pack(
    results: Iterator[tuple[Batch, list[np.ndarray]]], writers: dict[str, ShardWriter],
    stats: dict[int, dict[str, Any]], out: Path, settings_hash: str, bar: _Progress,
) -> None:
    for batch, encoded in results:
        wrote = False
        for ids, split, source in zip(encoded, batch.splits, batch.sources, strict=True):
            stats[source]["documents"] += 1
            stats[source]["tokens"] += len(ids)
            wrote |= writers[split].add(ids)
        for source, counts in batch.skipped.items():
            stats[source]["skipped"].update(counts)
        for source, count in batch.duplicates.items():
            stats[source]["duplicates"] += count
        bar.update(batch.docs_end, sum(w.pending_tokens for w in writers.values())
                   + sum(x["num_tokens"] for w in writers.values() for x in w.shards))
        if wrote:
            save_state(out, settings_hash, batch.docs_end, writers, stats)


class _Progress:
    """Documents read and tokens packed, on stderr while a terminal watches."""

    def __init__(self, num_files: int, enabled: bool) -> None:
        self.progress = None
        if enabled and sys.stderr.isatty():
            self.progress = Progress(transient=False)
            self.task = self.progress.add_task("prepare", total=None)
            self.progress.start()

    def update(self, docs: int, tokens: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=docs,
                                 description=f"prepare: {docs:,} docs, {tokens:,} tokens")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---- CLI --------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="tokenize documents into training shards")
    p.add_argument("sources", nargs="+",
                   help="text files/folders, JSONL(.gz/.zst), Parquet, globs ('src/**/*.py'), "
                   "or this interpreter's Python code: python-stdlib, python-site-packages, "
                   "python-local (both)")
    p.add_argument("--output", required=True, help="folder for shards and manifest.json")
    p.add_argument("--tokenizer", required=True,
                   help="folder with tokenizer.json, a .gguf file or a registry model name")
    p.add_argument("--field", default="text", help="JSONL/Parquet field with the text")
    p.add_argument("--val-fraction", type=float, default=0.005)
    p.add_argument("--split-by", choices=SPLIT_BY, default="content",
                   help="hash that assigns a document to train or val: its content, or its "
                   "file's name relative to the source (one document per file)")
    p.add_argument("--shard-tokens", type=int, default=2048 * 2049)
    p.add_argument("--max-line-chars", type=int, default=10_000,
                   help="skip documents with a longer line (0: no limit)")
    p.add_argument("--max-doc-bytes", type=int, default=0,
                   help="skip larger documents, files by their size on disk (0: no limit)")
    p.add_argument("--max-mean-line-chars", type=float, default=0.0,
                   help="skip documents with a longer mean line (Codex: 100; 0: no limit)")
    p.add_argument("--min-alnum-fraction", type=float, default=0.0,
                   help="skip documents with fewer letters and digits (StarCoder: 0.25)")
    p.add_argument("--skip-generated", action="store_true",
                   help="skip documents whose first lines say they are generated")
    p.add_argument("--parse-python", action="store_true",
                   help="skip documents that this Python does not parse")
    p.add_argument("--no-dedup", dest="dedup", action="store_false")
    p.add_argument("--near-dedup", type=float, default=0.0, metavar="JACCARD",
                   help="also skip documents this similar to a kept one (MinHash; 0: off)")
    p.add_argument("--decontaminate", action="append", default=[], choices=DECONTAMINATE,
                   help="skip documents that define a benchmark problem's function")
    p.add_argument("--bos", action="store_true", help="also start every document with BOS")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files or folders whose name matches (repeatable)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(**kwargs: Any) -> None:
    manifest = prepare(**kwargs)
    splits = manifest["splits"]
    skipped = Counter()
    for source in manifest["sources"]:
        skipped.update(source["skipped"])
    files = manifest["files"]
    print(json.dumps({
        "output": kwargs["output"], "dtype": manifest["dtype"],
        "train_tokens": splits["train"]["num_tokens"], "val_tokens": splits["val"]["num_tokens"],
        "documents": sum(s["documents"] for s in manifest["sources"]),
        "duplicates": sum(s["duplicates"] for s in manifest["sources"]),
        "skipped": dict(skipped),
        "files": {"found": files["found"], "train": files["train"]["num_files"],
                  "val": files["val"]["num_files"], "dropped": files["dropped"]},
    }))
