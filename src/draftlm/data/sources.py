"""Reading documents out of the sources `draftlm prepare` accepts, in a fixed order.

A source is a path or a glob: a text file (one document per file), a folder (every file
below it, one document each, or the records of the JSONL / Parquet files in it), a
`.jsonl` / `.jsonl.gz` / `.jsonl.zst` file (one document per record, from a named field)
or a `.parquet` file (StarCoder's layout: a `content` column). Files are visited in
sorted order so that two runs see the same documents in the same order, which is what
makes prepared shards byte-identical.

A source may also name the Python code this interpreter has, which needs no download:
`python-stdlib` (the standard library, without the site-packages inside it),
`python-site-packages` (every installed package) or `python-local` (both). Only `.py`
files are read, and folders of vendored copies of other projects (`_vendor`, `vendored`,
`third_party`, ...) are left out: they repeat code found elsewhere or pin old versions.
Every file has a name relative to its source (`stdlib/json/decoder.py`), which is what
manifests list and what a split by path hashes, so that both are the same on any machine.

Bad input is data, not an error: undecodable bytes, documents over a size cap, empty
documents, lines too long to be text (minified code, embedded data) and malformed records
are counted by reason and skipped.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import site
import sysconfig
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from draftlm.errors import DraftlmError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# A JSONL record longer than this is skipped unread: it would not fit the line limit anyway.
MAX_RECORD_BYTES = 64 * 2**20

# Source names for the Python code on this machine, and the roots each one reads.
PYTHON_SOURCES = {
    "python-local": ("stdlib", "site-packages"),
    "python-stdlib": ("stdlib",),
    "python-site-packages": ("site-packages",),
}
# Folders a Python source does not enter: installed packages below the standard library
# (read as site-packages instead) and copies of other projects kept inside a package.
PYTHON_SKIPPED_FOLDERS = ("site-packages", "dist-packages", "__pycache__", "_vendor", "vendor",
                          "_vendored", "vendored", "externals", "third_party")


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, with the index of the source (given order) it came from and
    its name relative to the source (stable across machines)."""

    source_index: int
    path: Path
    name: str

    @property
    def kind(self) -> str:
        name = self.path.name.lower()
        if name.endswith(JSONL_SUFFIXES):
            return "jsonl"
        if name.endswith(PARQUET_SUFFIXES):
            return "parquet"
        return "text"


def expand_source(
    source: str, source_index: int, exclude: Sequence[str] = ()
) -> list[SourceFile]:
    """The files of one source, sorted; a source that matches nothing is an error.
    `exclude` holds glob patterns matched against every folder and file name
    (`site-packages`, `test_*`)."""
    if source in PYTHON_SOURCES:
        files = [SourceFile(source_index, path, f"{label}/{path.relative_to(root).as_posix()}")
                 for label, root in python_roots(source)
                 for path in _python_files(root, exclude)]
        if not files:
            raise DraftlmError(f"data source {source} holds no .py files")
        return files
    if any(ch in source for ch in "*?["):
        # glob skips hidden names unless the pattern spells them out
        pattern = os.path.expanduser(source)
        root = Path(pattern.split("*")[0].split("?")[0].split("[")[0]).parent
        paths = [Path(p) for p in glob.glob(pattern, recursive=True)]
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise DraftlmError(f"data source {source} does not exist")
        if root.is_file():
            return [SourceFile(source_index, root, root.name)]
        paths = [p for p in root.rglob("*") if not _hidden(p.relative_to(root))]
    # exclusions apply below the source's own folder, not to the folders above it
    files = sorted(p for p in paths if p.is_file() and not _excluded(p.relative_to(root), exclude))
    if not files:
        raise DraftlmError(f"data source {source} holds no files")
    return [SourceFile(source_index, p, p.relative_to(root).as_posix()) for p in files]


def python_roots(source: str) -> list[tuple[str, Path]]:
    """(label, folder) of each root a Python source reads: `stdlib`, then `site-packages`
    (`site-packages-2`, ... when the interpreter has several)."""
    roots = []
    if "stdlib" in PYTHON_SOURCES[source]:
        roots.append(("stdlib", Path(sysconfig.get_paths()["stdlib"])))
    if "site-packages" in PYTHON_SOURCES[source]:
        folders = [Path(p) for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]
        roots += [("site-packages" if i == 0 else f"site-packages-{i + 1}", folder)
                  for i, folder in enumerate(folders)]
    return roots


def describe_source(source: str) -> dict[str, object]:
    """What a source spec stood for on this machine, for a manifest."""
    if source not in PYTHON_SOURCES:
        return {}
    return {"roots": {label: str(root) for label, root in python_roots(source)},
            "suffix": ".py", "skipped_folders": list(PYTHON_SKIPPED_FOLDERS)}


def _python_files(root: Path, exclude: Sequence[str]) -> list[Path]:
    """The `.py` files below `root`, sorted, pruning skipped, excluded and hidden folders."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in PYTHON_SKIPPED_FOLDERS
                   and not any(fnmatch.fnmatch(d, pattern) for pattern in exclude)]
        found += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith(".")
                  and not any(fnmatch.fnmatch(n, pattern) for pattern in exclude)]
    return sorted(p for p in found if p.is_file())


def _excluded(path: Path, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in path.parts for pattern in patterns)


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") and part not in (".", "..") for part in path.parts)


def iter_documents(
    file: SourceFile, field: str, max_line_chars: int, skipped: Counter[str],
    max_doc_bytes: int = 0,
) -> Iterator[str]:
    """The usable documents of `file`; everything else is counted in `skipped` by reason.
    `max_doc_bytes` (0: no cap) skips larger documents; a text file by its size on disk,
    before reading it."""
    if file.kind == "text" and max_doc_bytes and file.path.stat().st_size > max_doc_bytes:
        skipped["too_large"] += 1
        return
    if file.kind == "jsonl":
        texts = _jsonl_texts(file.path, field, skipped)
    elif file.kind == "parquet":
        texts = _parquet_texts(file.path, field, skipped)
    else:
        texts = _text_file(file.path, skipped)
    for text in texts:
        if max_doc_bytes and len(text.encode("utf-8", "surrogatepass")) > max_doc_bytes:
            skipped["too_large"] += 1
        elif not text.strip():
            skipped["empty"] += 1
        elif max_line_chars and _longest_line(text) > max_line_chars:
            skipped["huge_line"] += 1
        else:
            yield text


def _longest_line(text: str) -> int:
    return max(len(line) for line in text.split("\n"))


def _text_file(path: Path, skipped: Counter[str]) -> Iterator[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["undecodable"] += 1
        return
    yield text


def _open_compressed(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise DraftlmError(
                f"{path} is zstd-compressed: pip install 'draftlm[data]' (zstandard)"
            ) from err
        raw = path.open("rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return path.open("rb")


def _jsonl_texts(path: Path, field: str, skipped: Counter[str]) -> Iterator[str]:
    with _open_compressed(path) as stream:
        while True:
            try:
                line = stream.readline(MAX_RECORD_BYTES + 1)
            except (OSError, EOFError) as err:  # truncated gzip/zstd stream
                raise DraftlmError(f"{path} is damaged ({err}); re-download it") from err
            if not line:
                return
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                skipped["huge_line"] += 1
                while line and not line.endswith(b"\n"):  # drop the rest of the record
                    line = stream.readline(MAX_RECORD_BYTES)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            except json.JSONDecodeError:
                skipped["bad_record"] += 1
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                skipped["missing_field"] += 1
                continue
            yield text


def _parquet_texts(path: Path, field: str, skipped: Counter[str]) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DraftlmError(f"{path} is Parquet: pip install 'draftlm[data]' (pyarrow)") from err
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise DraftlmError(f"cannot read {path} as Parquet: {err}") from err
    if field not in parquet.schema_arrow.names:
        raise DraftlmError(
            f"{path} has no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)});"
            " pass --field"
        )
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["undecodable"] += 1
                    continue
            if not isinstance(value, str):
                skipped["missing_field"] += 1
                continue
            yield value
