"""4-bit weights in super-blocks (`Int4Groups`), the form the int4 layers compute with.

`Int4Groups` is the form `quant.layers.Int4Linear` and its kernel compute with, GGUF's Q4_K
layout: groups of 32 values along the input, each value a 4-bit code, groups in
super-blocks of 8 (256 values; the last of a row may hold fewer):

    value = d * sub_scale * code + dmin * sub_min

with an 8-bit unsigned scale and an 8-bit signed minimum per group and two floats per
super-block. Why not a float scale per group: the kernel then sums a super-block's products
in integers and converts to float once per 256 values instead of once per 32, which is most
of its speed on AVX2 (see csrc/int4_avx2.cpp).

A GGUF file's Q4_K blocks copy in exactly (6-bit scales and minimums fit the 8-bit fields).
Q4_0 and Q4_1 keep their codes; their per-group float16 scales are rounded to 8 bits of
their super-block's largest (relative error < 0.2% for the largest, more for groups far
smaller). Other types (Q5, Q6_K, Q8_0, floats) have no 4-bit codes and are quantized from
floats (`Int4Groups.quantize`: an error-minimising search, optionally weighted by how
large each input column's activations are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from draftlm.quant.kernels import cpu_kernels_available, panels_of_8

GROUP = 32
SUPER = 8  # groups per super-block
SEARCH_STEPS = 20  # candidate grids per group beyond min-max (llama.cpp's Q4_K uses 20)


def _per_super(values: Tensor) -> Tensor:
    """[rows, G] -> [rows, S, 8], zero-padded to whole super-blocks."""
    rows, groups = values.shape
    supers = -(-groups // SUPER)
    padded = values.new_zeros(rows, supers * SUPER)
    padded[:, :groups] = values
    return padded.view(rows, supers, SUPER)


def _spread(values: Tensor, groups: int) -> Tensor:
    """[rows, S] per super-block -> [rows, G] per group."""
    return values.repeat_interleave(SUPER, dim=1)[:, :groups]


@dataclass
class Int4Groups:
    """A [rows, cols] weight as 4-bit codes in super-blocks (module docstring)."""

    codes: Tensor  # uint8 [rows, cols], 0..15
    sub_scale: Tensor  # uint8 [rows, G], G = cols / 32
    sub_min: Tensor  # int8 [rows, G]
    d: Tensor  # float32 [rows, S], S = ceil(G / 8)
    dmin: Tensor  # float32 [rows, S]

    def group_affine(self) -> tuple[Tensor, Tensor]:
        """(scale, minimum) per group, float32 [rows, G]: value = scale * code + minimum."""
        groups = self.sub_scale.shape[1]
        return (_spread(self.d, groups) * self.sub_scale.float(),
                _spread(self.dmin, groups) * self.sub_min.float())

    def dequantize(self) -> Tensor:
        rows, cols = self.codes.shape
        scale, minimum = self.group_affine()
        grouped = self.codes.view(rows, cols // GROUP, GROUP).float()
        return (grouped * scale[..., None] + minimum[..., None]).view(rows, cols)

    @classmethod
    def from_affine(cls, codes: Tensor, scale: Tensor, minimum: Tensor) -> Int4Groups:
        """Codes with a float scale and minimum per group (Q4_0, Q4_1): the scales and
        minimums rounded to 8 bits of their super-block's largest, the codes kept (a group
        with a negative scale, as Q4_0 writes, has its codes mirrored: 15 - code)."""
        groups = scale.shape[1]
        flip = scale < 0
        if flip.any():
            rows, cols = codes.shape
            mirrored = (15 - codes.view(rows, groups, GROUP).int()).to(codes.dtype)
            codes = torch.where(flip[..., None], mirrored,
                                codes.view(rows, groups, GROUP)).view(rows, cols)
            minimum = torch.where(flip, minimum + 15 * scale, minimum)
            scale = scale.abs()
        d = _per_super(scale.float()).amax(-1) / 255
        dmin = _per_super(minimum.float()).abs().amax(-1) / 127
        sub_scale = (scale / _spread(d, groups).clamp(min=1e-30)).round().clamp(0, 255)
        sub_min = (minimum / _spread(dmin, groups).clamp(min=1e-30)).round().clamp(-127, 127)
        return cls(codes.to(torch.uint8), sub_scale.to(torch.uint8), sub_min.to(torch.int8),
                   d, dmin)

    @classmethod
    def quantize(cls, weight: Tensor, importance: Tensor | None = None) -> Int4Groups:
        """Float weight [rows, cols] (cols a multiple of 32) -> 4-bit groups.

        With draftlm's CPU kernels (x86 with AVX2 and a compiler): llama.cpp's
        error-minimising search (csrc/int4_quantize.cpp), each group's scale and minimum
        fitted by weighted least squares over a few candidate grids, weighted by
        `importance` (mean squared activation per input column, `calibrate`) when given.
        Elsewhere: min-max groups (`quantize_minmax`), about 10% more weight error."""
        if not cpu_kernels_available():
            return cls.quantize_minmax(weight)
        empty = weight.new_empty(0, dtype=torch.float32)
        parts = torch.ops.draftlm_cpu.int4_quantize(
            weight, empty if importance is None else importance.float(), SEARCH_STEPS, -1.0, 0.1)
        return cls(*parts)

    @classmethod
    def quantize_minmax(cls, weight: Tensor) -> Int4Groups:
        """Float weight [rows, cols] (cols a multiple of 32) -> 4-bit groups: each group's
        minimum rounded down onto its super-block's 8-bit grid, the scale fitted to reach
        the group's maximum, then the codes rounded against both."""
        rows, cols = weight.shape
        groups = cols // GROUP
        w = weight.float().reshape(rows, groups, GROUP)
        lo, hi = w.amin(-1), w.amax(-1)
        dmin = _per_super(lo).abs().amax(-1) / 127
        step_min = _spread(dmin, groups)
        sub_min = torch.where(step_min > 0, torch.floor(lo / step_min.clamp(min=1e-30)),
                              torch.zeros_like(lo)).clamp(-127, 127)
        minimum = sub_min * step_min
        scale = (hi - minimum).clamp(min=0) / 15
        d = _per_super(scale).amax(-1) / 255
        step = _spread(d, groups)
        sub_scale = torch.where(step > 0, (scale / step.clamp(min=1e-30)).round(),
                                torch.zeros_like(scale)).clamp(0, 255)
        group_scale = (sub_scale * step)[..., None]
        codes = torch.where(group_scale > 0,
                            ((w - minimum[..., None]) / group_scale.clamp(min=1e-30)).round(),
                            torch.zeros_like(w)).clamp(0, 15)
        return cls(codes.reshape(rows, cols).to(torch.uint8), sub_scale.to(torch.uint8),
                   sub_min.to(torch.int8), d, dmin)

    def permute_rows(self, permute) -> Int4Groups:
        """The same rows reordered by `permute` (a function of a [rows, n] tensor)."""
        return Int4Groups(*(permute(t) for t in (self.codes, self.sub_scale, self.sub_min,
                                                  self.d, self.dmin)))

    @staticmethod
    def concat(parts: list[Int4Groups]) -> Int4Groups:
        """Rows of `parts` stacked, for the fused q/k/v and gate/up layers."""
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts])
                            for f in ("codes", "sub_scale", "sub_min", "d", "dmin")))


def pack_int4(groups: Int4Groups) -> dict[str, Tensor]:
    """`Int4Groups` -> the kernel's buffers (csrc/int4_avx2.cpp): rows in panels of 8
    (zero rows pad the last), codes interleaved so that 32 bytes hold 4 consecutive codes
    of each of the 8 rows, two such vectors per byte (low and high nibbles), group scales
    doubled per row, minimums of group pairs side by side, d/dmin 8 rows wide."""
    codes = groups.codes
    n, k = codes.shape
    g, s = k // 32, groups.d.shape[1]
    panels, h = -(-n // 8), -(-g // 2)

    # [P, 8 rows, G, 8 steps, 4] -> [P, G, 8 steps, 8 rows * 4]: step t of group g is a
    # 32-byte vector with row c's codes 32g + 4t .. + 3 at bytes 4c .. 4c + 3.
    steps = panels_of_8(codes, k).view(panels, 8, g, 8, 4).permute(0, 2, 3, 1, 4)
    steps = steps.reshape(panels, g, 8, 32)
    packed = steps[:, :, :4] | (steps[:, :, 4:] << 4)
    scales = panels_of_8(groups.sub_scale, g).transpose(1, 2).repeat_interleave(2, dim=2)
    mins = panels_of_8(groups.sub_min, 2 * h).view(panels, 8, h, 2).permute(0, 2, 1, 3)
    return {
        "codes": packed.reshape(panels, g, 128).contiguous(),
        "scales": scales.contiguous(),
        "mins": mins.reshape(panels, h, 16).contiguous(),
        "d": panels_of_8(groups.d.float(), s).transpose(1, 2).contiguous(),
        "dmin": panels_of_8(groups.dmin.float(), s).transpose(1, 2).contiguous(),
    }
