"""GGUF 4-bit blocks into Int4Linear: the codes decode to exactly what gguf dequantizes,
and `load(..., quantize="int4")` of a Q4 file computes with the file's own weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_files import tiny_config, tiny_model, write_gguf

from draftlm.load import load
from draftlm.quant.gguf_int4 import decode_int4
from draftlm.quant.int4 import Int4Groups
from draftlm.quant.layers import Int4Linear

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_0_and_q4_1_codes_decode_close_to_gguf_values(qtype) -> None:
    """Their codes are kept; their float16 group scales are rounded to 8 bits of the
    super-block's largest, and Q4_0's negative scales mirror the codes."""
    weight = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weight, qtype)
    groups = decode_int4(raw, qtype, 8, 256)
    assert groups.codes.shape == (8, 256) and groups.sub_scale.shape == (8, 8)
    assert groups.d.shape == (8, 1) and 0 <= groups.codes.min() and groups.codes.max() <= 15
    expected = gguf.quants.dequantize(raw, qtype).reshape(8, 256)
    error = np.abs(groups.dequantize().numpy() - expected)
    assert error.max() < 0.01 * np.abs(expected).max()
    # far below 4-bit rounding itself
    assert error.mean() < 0.1 * np.abs(expected - weight).mean()


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
    # The file's weights but for 8-bit group scales (and int8 activations: the identity's
    # rows quantize exactly) ...
    scale_error = (got - file_qkv).abs().max().item()
    assert scale_error < 0.01 * file_qkv.abs().max().item()
    # ... where quantizing the dequantized floats again adds its own 4-bit rounding.
    plain = torch.nn.Linear(file_qkv.shape[1], file_qkv.shape[0], bias=False)
    with torch.no_grad():
        plain.weight.copy_(file_qkv)
    requantized = effective_weight(Int4Linear(plain))
    assert scale_error < 0.5 * (requantized - file_qkv).abs().max().item()


def test_groups_concat_stacks_rows() -> None:
    def constant(rows: int, code: int, minimum: int) -> Int4Groups:
        return Int4Groups(torch.full((rows, 32), code, dtype=torch.uint8),
                          torch.ones(rows, 1, dtype=torch.uint8),
                          torch.full((rows, 1), minimum, dtype=torch.int8),
                          torch.ones(rows, 1), torch.ones(rows, 1))

    both = Int4Groups.concat([constant(2, 0, 0), constant(3, 15, -1)])
    assert both.codes.shape == (5, 32) and both.d.shape == (5, 1)
    assert both.dequantize()[:2].eq(0).all() and both.dequantize()[2:].eq(14).all()
