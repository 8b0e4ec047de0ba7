"""GGUF 4-bit blocks (Q4_0, Q4_1, Q4_K) straight into `quantize.Int4Linear`.

These formats store a weight in groups of 32 along its input, each value a 4-bit code with
an affine map per group: value = scale * code + minimum. That is the layout of PyTorch's int4
CPU kernel (groups of 32, a scale and a zero point each), so `--quantize int4` takes a
file's own codes instead of quantizing its dequantized floats again. Min/max requantization
lands on the file's grid only when a group uses codes 0 and 15 (Q4_1 does); Q4_0's symmetric
grid and Q4_K's fitted scales would get a second rounding (on a tiny Q4_0 model: mean
|error| 4.0e-3 requantized, 1.4e-4 with the file's codes). The one loss left: the kernel
keeps scales and zero points in bfloat16.

Q4_K packs 8 groups into a 256-value super-block with 6-bit group scales and minimums;
the gguf package's own unpacking (`Q4_K.get_scale_min`) decodes them. Other types (Q5, Q6_K,
Q8_0, floats) have no 4-bit codes and are quantized from floats as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

GROUP = 32
Q = gguf.GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)


@dataclass
class Int4Groups:
    """A [rows, cols] weight as 4-bit codes: value = scale * code + minimum per group of 32."""

    codes: Tensor  # int32 [rows, cols], 0..15
    scale: Tensor  # float32 [rows, cols // 32]
    minimum: Tensor  # float32 [rows, cols // 32]

    def dequantize(self) -> Tensor:
        rows, cols = self.codes.shape
        grouped = self.codes.view(rows, cols // GROUP, GROUP).float()
        return (grouped * self.scale[..., None] + self.minimum[..., None]).view(rows, cols)

    def permute_rows(self, permute) -> Int4Groups:
        """The same rows reordered by `permute` (a function of a [rows, n] tensor)."""
        return Int4Groups(permute(self.codes), permute(self.scale), permute(self.minimum))

    @staticmethod
    def concat(parts: list[Int4Groups]) -> Int4Groups:
        """Rows of `parts` stacked, for the fused q/k/v and gate/up layers."""
        return Int4Groups(torch.cat([p.codes for p in parts]),
                          torch.cat([p.scale for p in parts]),
                          torch.cat([p.minimum for p in parts]))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k, 16] packed bytes -> [n, k, 32] codes: low nibbles first, then high (ggml order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_int4(data: np.ndarray, qtype: gguf.GGMLQuantizationType, rows: int,
                cols: int) -> Int4Groups | None:
    """The 4-bit groups of a GGUF tensor's raw blocks, or None for a type without them."""
    if qtype not in INT4_TYPES:
        return None
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_size)
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    if qtype == Q.Q4_0:  # value = d * (code - 8)
        codes = _nibbles(blocks[:, 2:].reshape(n, 1, 16))
        scale, minimum = d, -8.0 * d
    elif qtype == Q.Q4_1:  # value = d * code + m
        codes = _nibbles(blocks[:, 4:].reshape(n, 1, 16))
        scale, minimum = d, blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    else:  # Q4_K: value = d * sc[j] * code - dmin * m[j] for group j of 8
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        # 4 chunks of 32 bytes: low nibbles are group 2i, high nibbles group 2i + 1.
        qs = blocks[:, 16:].reshape(n, 4, 32)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
        scale, minimum = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
    if block_size * n != rows * cols:
        raise ValueError(f"{n} blocks of {block_size} do not hold a {rows} x {cols} weight")

    def per_group(values: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)
                                .reshape(rows, cols // GROUP))

    return Int4Groups(torch.from_numpy(codes.reshape(rows, cols).astype(np.int32)),
                      per_group(scale), per_group(minimum))


def read_int4_groups(path: str | Path, n_heads: int, n_kv_heads: int) -> dict[str, Int4Groups]:
    """draftlm weight name -> 4-bit groups, for every 2-D tensor of the file stored as Q4_0,
    Q4_1 or Q4_K (rows in draftlm's layout, `gguf_loader.draftlm_layout`)."""
    from draftlm.gguf_loader import draftlm_layout, draftlm_name, open_gguf, read_metadata

    reader = open_gguf(path)
    arch = read_metadata(reader, arrays=False)["general.architecture"]
    out: dict[str, Int4Groups] = {}
    for tensor in reader.tensors:
        name = draftlm_name(tensor.name)
        if name is None or len(tensor.shape) != 2:
            continue
        cols, rows = (int(d) for d in tensor.shape.tolist())  # GGUF lists dims inner-first
        groups = decode_int4(tensor.data, tensor.tensor_type, rows, cols)
        if groups is not None:
            out[name] = groups.permute_rows(
                lambda t, name=name: draftlm_layout(name, t, arch, n_heads, n_kv_heads))
    return out
