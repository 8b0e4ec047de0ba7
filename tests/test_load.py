"""`draftlm.load` dispatch and its user errors."""

import pytest
import torch

from draftlm.errors import DraftlmError
from draftlm.load import load, resolve_dtype


def test_missing_path_names_the_known_models(tmp_path) -> None:
    with pytest.raises(DraftlmError, match="qwen2.5-coder-1.5b"):
        load(tmp_path / "nope")


def test_a_file_that_is_not_gguf(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(DraftlmError, match="not .gguf"):
        load(path)


def test_dtype_names() -> None:
    assert resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    # Quantized CPU layers read float32 activations: auto never picks bfloat16 for them.
    for mode in ("int8", "int4", "int4-mixed"):
        assert resolve_dtype("auto", "cpu", mode) is torch.float32
    assert resolve_dtype("bfloat16", "cpu", "int8") is torch.bfloat16  # asked for: kept
    with pytest.raises(DraftlmError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")
