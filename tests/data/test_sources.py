"""sources: file names relative to their source, the Python code of this interpreter, and
the size cap."""

from __future__ import annotations

import json
import site
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from draftlm.data.sources import describe_source, expand_source, iter_documents
from draftlm.errors import DraftlmError


def _touch(path: Path, text: str = "x = 1\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A standard library with site-packages inside it, as a non-venv install lays it out."""
    stdlib = tmp_path / "lib" / "python3"
    packages = stdlib / "site-packages"
    for name in ["json/decoder.py", "os.py", "README.txt", "__pycache__/os.cpython.pyc",
                 ".hidden/x.py", "test/test_os.py"]:
        _touch(stdlib / name)
    for name in ["pkg/__init__.py", "pkg/core.py", "pkg/_vendor/six.py", "pkg/data.json",
                 "other/third_party/lib.py"]:
        _touch(packages / name)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(packages), str(tmp_path / "no")])
    return stdlib, packages


def test_python_sources_read_py_files_under_stable_names(
    interpreter: tuple[Path, Path]
) -> None:
    stdlib, packages = interpreter
    local = expand_source("python-local", 3)
    assert [f.name for f in local] == [
        "stdlib/json/decoder.py", "stdlib/os.py", "stdlib/test/test_os.py",
        "site-packages/pkg/__init__.py", "site-packages/pkg/core.py"]
    assert {f.source_index for f in local} == {3}
    assert local[0].path == stdlib / "json" / "decoder.py"
    assert [f.name for f in expand_source("python-stdlib", 0, exclude=["test"])] == [
        "stdlib/json/decoder.py", "stdlib/os.py"]
    assert [f.name for f in expand_source("python-site-packages", 0, exclude=["core*"])] == [
        "site-packages/pkg/__init__.py"]
    described = describe_source("python-local")
    assert described["roots"] == {"stdlib": str(stdlib), "site-packages": str(packages)}
    assert "_vendor" in described["skipped_folders"]
    assert describe_source(str(stdlib)) == {}


def test_python_source_without_code_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path)])
    with pytest.raises(DraftlmError, match="python-site-packages holds no .py files"):
        expand_source("python-site-packages", 0)


def test_this_interpreters_standard_library_is_found() -> None:
    names = {f.name for f in expand_source("python-stdlib", 0)}
    assert "stdlib/json/decoder.py" in names
    assert not any("site-packages" in name for name in names)


def test_names_are_relative_to_the_source(tmp_path: Path) -> None:
    _touch(tmp_path / "src" / "a" / "b.py")
    _touch(tmp_path / "src" / "c.py")
    assert [f.name for f in expand_source(str(tmp_path / "src"), 0)] == ["a/b.py", "c.py"]
    assert [f.name for f in expand_source(str(tmp_path / "src" / "c.py"), 0)] == ["c.py"]
    globbed = expand_source(str(tmp_path / "src" / "**" / "*.py"), 0)
    assert [f.name for f in globbed] == ["src/a/b.py", "src/c.py"]


def test_size_cap_skips_files_unread_and_large_records(tmp_path: Path) -> None:
    _touch(tmp_path / "big.py", "x = 1\n" * 100)
    _touch(tmp_path / "small.py", "x = 1\n")
    records = [{"text": "y" * 50}, {"text": "y" * 5}, {"text": "é" * 30}]  # é: 2 bytes
    _touch(tmp_path / "r.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    skipped: Counter[str] = Counter()
    kept = [text for file in expand_source(str(tmp_path), 0)
            for text in iter_documents(file, "text", 0, skipped, max_doc_bytes=40)]
    assert kept == ["y" * 5, "x = 1\n"]
    assert skipped == {"too_large": 3}
