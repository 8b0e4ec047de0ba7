"""GGUF's 4-bit blocks (Q4_K exactly, Q4_0 and Q4_1 with their codes kept) read straight
into `Int4Groups`, without a float copy of the weight."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from draftlm.formats.gguf import draftlm_layout, draftlm_name, open_gguf, read_metadata
from draftlm.quant.int4 import Int4Groups

Q = gguf.GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)


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
    if block_size * n != rows * cols:
        raise ValueError(f"{n} blocks of {block_size} do not hold a {rows} x {cols} weight")
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]

    def per_row(values: np.ndarray, dtype) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(values.astype(dtype)).reshape(rows, -1))

    if qtype == Q.Q4_K:  # value = d * sc[j] * code - dmin * m[j] for group j of 8: exact
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        # 4 chunks of 32 bytes: low nibbles are group 2i, high nibbles group 2i + 1.
        qs = blocks[:, 16:].reshape(n, 4, 32)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
        return Int4Groups(per_row(codes, np.uint8), per_row(sc, np.uint8),
                          per_row(m, np.int8), per_row(d, np.float32),
                          per_row(-dmin, np.float32))
    if qtype == Q.Q4_0:  # value = d * (code - 8)
        codes = _nibbles(blocks[:, 2:].reshape(n, 1, 16))
        scale, minimum = d, -8.0 * d
    else:  # Q4_1: value = d * code + m
        codes = _nibbles(blocks[:, 4:].reshape(n, 1, 16))
        scale, minimum = d, blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return Int4Groups.from_affine(per_row(codes, np.uint8), per_row(scale, np.float32),
                                  per_row(minimum, np.float32))


def read_int4_groups(path: str | Path, n_heads: int, n_kv_heads: int) -> dict[str, Int4Groups]:
    """draftlm weight name -> 4-bit groups, for every 2-D tensor of the file stored as Q4_0,
    Q4_1 or Q4_K (rows in draftlm's layout, `formats.gguf.draftlm_layout`)."""
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
