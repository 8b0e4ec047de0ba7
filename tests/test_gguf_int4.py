"""GGUF 4-bit blocks into Int4Linear: the codes decode to exactly what gguf dequantizes,
and `load(..., quantize="int4")` of a Q4 file computes with the file's own weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_gguf_loader import tiny_config, tiny_model, write_gguf

from draftlm.gguf_int4 import Int4Groups, decode_int4
from draftlm.load import load
from draftlm.quantize import Int4Linear

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_0_and_q4_1_codes_decode_to_gguf_values(qtype) -> None:
    weight = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weight, qtype)
    groups = decode_int4(raw, qtype, 8, 256)
    assert groups.codes.shape == (8, 256) and groups.scale.shape == (8, 8)
    assert 0 <= groups.codes.min() and groups.codes.max() <= 15
    expected = gguf.quants.dequantize(raw, qtype).reshape(8, 256)
    np.testing.assert_allclose(groups.dequantize().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_q4_k_codes_decode_to_gguf_values() -> None:
    """Random Q4_K super-blocks (the gguf package has no Q4_K quantizer): every 6-bit scale
    and minimum packing is exercised."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(4, 144), dtype=np.uint8)
    for start in (0, 2):  # d and dmin: finite float16
        blocks[:, start : start + 2] = (rng.uniform(1e-3, 0.1, size=(4, 1)).astype(np.float16)
                                        .view(np.uint8))
    groups = decode_int4(blocks, Q.Q4_K, 2, 512)
    expected = gguf.quants.dequantize(blocks, Q.Q4_K).reshape(2, 512)
    np.testing.assert_array_equal(groups.dequantize().numpy(), expected)


def test_other_types_have_no_codes() -> None:
    raw = gguf.quants.quantize(np.ones((2, 32), dtype=np.float32), Q.Q8_0)
    assert decode_int4(raw, Q.Q8_0, 2, 32) is None


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W of y = x W^T (+ b), read back through the layer on the identity."""
    with torch.no_grad():
        out = layer(torch.eye(layer.in_features))
    if layer.bias is not None:
        out = out - layer.bias
    return out.T


def test_int4_load_keeps_the_file_codes(tmp_path) -> None:
    config = tiny_config("llama").with_(vocab_size=272)  # int4 tiles: out % 16
    model = tiny_model(config)
    held = write_gguf(tmp_path / "m.gguf", model, qtype=Q.Q4_0)
    lm = load(tmp_path / "m.gguf", dtype="float32", quantize="int4")
    attn = lm.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Int4Linear)
    # q and k rows come back un-permuted (arch llama), like the float loader's.
    file_qkv = torch.cat([held[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    got = effective_weight(attn.qkv_proj)
    # The file's weights but for bfloat16 scales and zero points (relative 2^-8) ...
    bf16_error = (got - file_qkv).abs().max().item()
    assert bf16_error < 0.01 * file_qkv.abs().max().item()
    # ... where quantizing the dequantized floats again adds its own 4-bit rounding.
    plain = torch.nn.Linear(file_qkv.shape[1], file_qkv.shape[0], bias=False)
    with torch.no_grad():
        plain.weight.copy_(file_qkv)
    requantized = effective_weight(Int4Linear(plain))
    assert bf16_error < 0.5 * (requantized - file_qkv).abs().max().item()


def test_groups_concat_stacks_rows() -> None:
    a = Int4Groups(torch.zeros(2, 32, dtype=torch.int32), torch.ones(2, 1), torch.zeros(2, 1))
    b = Int4Groups(torch.full((3, 32), 15, dtype=torch.int32), torch.ones(3, 1), -torch.ones(3, 1))
    both = Int4Groups.concat([a, b])
    assert both.codes.shape == (5, 32)
    assert both.dequantize()[:2].eq(0).all() and both.dequantize()[2:].eq(14).all()
