"""draftlm tokenizer train: byte-level BPE that round-trips any text and feeds prepare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from draftlm.cli import main
from draftlm.data.prepare import load_tokenizer, prepare
from draftlm.data.tokenizer_train import train_tokenizer
from draftlm.errors import DraftlmError


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text(f"def function_{i}(value):\n    return value * {i}\n" * 5)
    return src


def test_trained_bpe_round_trips_and_merges(corpus: Path, tmp_path: Path) -> None:
    tok = train_tokenizer([str(corpus / "*.py")], str(tmp_path / "tok"), vocab_size=300)
    assert tok.vocab_size == 300
    assert tok.eos_ids == (0,) and tok.id_to_token(0) == "<|endoftext|>"
    text = "def function_3(value):\n    return value * 3\n"
    assert len(tok.encode(text)) < len(text.encode()) / 2  # merges learned the code
    for sample in [text, "naïve 日本語 ✓ \x00\t", "unseen: zqxj"]:
        assert tok.decode(tok.encode(sample)) == sample
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.fingerprint == tok.fingerprint and loaded.eos_ids == (0,)
    manifest = prepare([str(corpus)], str(tmp_path / "out"), str(tmp_path / "tok"),
                       workers=1, progress=False)
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint
    assert manifest["eos_id"] == 0 and manifest["dtype"] == "uint16"


def test_cli_verb(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", "train", str(corpus), "--output", str(tmp_path / "t"),
                 "--vocab-size", "280"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 280
    with pytest.raises(DraftlmError, match="at least 257"):
        train_tokenizer([str(corpus)], vocab_size=100)
