"""The `draftlm` command as a user runs it: output, JSON, and one-line errors."""

import json
import subprocess
import sys

import pytest
from helpers import make_tiny_lm

from draftlm.cli import main
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.generate import generate


@pytest.fixture
def tiny_folder(tmp_path):
    lm = make_tiny_lm(seed=3)
    folder = tmp_path / "tiny-model"
    save_hf_folder(folder, lm.config, lm.model, lm.tokenizer)
    return folder, lm


def test_generate_json_matches_the_api(tiny_folder, capsys) -> None:
    folder, lm = tiny_folder
    code = main(["generate", "--model", str(folder), "hello", "--max-new-tokens", "8",
                 "--dtype", "float32", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    expected = generate(lm, "hello", max_new_tokens=8)
    assert out["text"] == expected.text
    assert out["num_new_tokens"] == expected.num_new_tokens
    assert out["tokens_per_second"] > 0


def test_generate_streams_text(tiny_folder, capsys) -> None:
    folder, lm = tiny_folder
    assert main(["generate", "--model", str(folder), "abc", "--max-new-tokens", "6",
                 "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert captured.out == generate(lm, "abc", max_new_tokens=6).text + "\n"
    assert "tok/s" in captured.err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draftlm.cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "/no/such/model", "hi"], "no model"),
        (["generate", "--model", "{folder}", "x" * 400], "context is 256"),
        (["generate", "--model", "{folder}", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--model", "{folder}", "hi", "--dtype", "int3"], "unknown dtype"),
        (["generate", "--model", "{folder}", "hi", "--compile", "draft"],
         "--compile draft needs a draft model"),
        (["bench", "--model", "{folder}", "--ngram", "2", "--compile", "draft"],
         "--compile draft needs a draft model"),
        (["generate", "--model", "{folder}", "hi", "--draft-confidence", "0.5"],
         "--draft-confidence needs a draft model"),
        (["generate", "--model", "{folder}", "hi", "--draft", "{folder}",
          "--draft-confidence", "1.5"], "--draft-confidence must be between 0 and 1"),
        (["bench", "--model", "{folder}", "--ngram", "2", "--draft-confidence", "0.5"],
         "--draft-confidence needs a draft model"),
    ],
)
def test_user_errors_are_one_line(tiny_folder, args, message) -> None:
    folder, _ = tiny_folder
    result = run_cli(*(a.format(folder=folder) for a in args))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_corrupt_gguf_is_one_line(tmp_path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    result = run_cli("generate", "--model", str(path), "hi")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_compile_without_a_cpp_compiler_is_one_clear_error(tiny_folder, monkeypatch) -> None:
    from draftlm.load import load

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(DraftlmError, match="needs a C\\+\\+ compiler"):
        load(tiny_folder[0], compile_step=True)
