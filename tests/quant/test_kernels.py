"""draftlm's AVX2 kernels. int4: the dot products of its int8 activations with the 4-bit
codes in super-blocks, rows independent of the batch, GGUF Q4_K's order, the quantizer's
error bound, and PyTorch's kernel as the fallback giving the same layer within rounding.
int8: float activations times the 8-bit weights, rows independent of the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from draftlm.quant import kernels as cpu_kernels
from draftlm.quant import layers as quantize
from draftlm.quant.int4 import Int4Groups, pack_int4
from draftlm.quant.kernels import cpu_kernels_available, pack_int8
from draftlm.quant.layers import Int4Linear, Int8Linear

kernel = pytest.mark.skipif(not cpu_kernels_available(),
                            reason="draftlm's CPU kernels cannot be built here")


def random_groups(n: int, k: int, seed: int = 0) -> Int4Groups:
    g = torch.Generator().manual_seed(seed)
    groups, supers = k // 32, -(-k // 256)
    return Int4Groups(
        torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (n, groups), generator=g, dtype=torch.uint8),
        torch.randint(-127, 128, (n, groups), generator=g, dtype=torch.int8),
        torch.rand(n, supers, generator=g) * 1e-4 + 1e-5,
        torch.rand(n, supers, generator=g) * 1e-3 - 5e-4)


def run(x: torch.Tensor, groups: Int4Groups) -> torch.Tensor:
    return torch.ops.draftlm_cpu.int4_linear(x, *pack_int4(groups).values(), groups.codes.shape[0])


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: int8 per super-block of 256, scale max|x| / 127."""
    m, k = x.shape
    padded = torch.zeros(m, -(-k // 256) * 256)
    padded[:, :k] = x
    blocks = padded.view(m, -1, 256)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(step > 0, step, 1)) * step).view(m, -1)[:, :k]


def test_pack_interleaves_rows_in_panels_of_eight() -> None:
    """Row c's codes 32g + 4t .. + 3 at bytes 4c .. of step t (t < 4: low nibbles of
    vector t, else high nibbles of vector t - 4); 10 rows make 2 panels, zero-padded."""
    codes = torch.randint(0, 16, (10, 96), dtype=torch.uint8)
    groups = Int4Groups(codes, torch.arange(30, dtype=torch.uint8).view(10, 3),
                        torch.ones(10, 3, dtype=torch.int8), torch.ones(10, 1), torch.ones(10, 1))
    packed = pack_int4(groups)
    assert packed["codes"].shape == (2, 3, 128) and packed["mins"].shape == (2, 2, 16)
    for row, g, t, i in [(0, 0, 0, 0), (3, 1, 2, 3), (9, 2, 5, 1), (7, 2, 7, 3)]:
        p, c = divmod(row, 8)
        byte = int(packed["codes"][p, g, (t % 4) * 32 + 4 * c + i])
        nibble = byte & 15 if t < 4 else byte >> 4
        assert nibble == int(codes[row, 32 * g + 4 * t + i])
    assert packed["codes"][1].view(3, 4, 32)[:, :, 4 * 2:].eq(0).all()  # rows 10..15: padding
    assert packed["scales"][0, 1, 6:8].tolist() == [3 * 3 + 1] * 2  # row 3, group 1
    assert packed["mins"][1, 1].tolist()[:4] == [1, 0, 1, 0]  # group 3 is padding


@kernel
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 40), (3, 96, 13), (5, 1536, 40),
                                           (9, 32, 8), (6, 896, 7), (40, 320, 41)])
def test_kernel_equals_the_dot_product_of_its_quantized_activations(m: int, k: int,
                                                                    n: int) -> None:
    """Lone last groups, short last super-blocks, row blocks of 4 plus a remainder, a
    part-filled last panel: all exact up to float sums."""
    groups = random_groups(n, k)
    x = torch.randn(m, k)
    if m > 1:
        x[0, :256] = 0  # an all-zero super-block has no activation scale
    got = run(x, groups)
    weight = groups.dequantize()
    expected = quantized_activations(x) @ weight.T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # and close to the float product: 8-bit activations cost about 1%
    exact = x @ weight.T
    assert float((got - exact).norm() / exact.norm()) < 0.03


@kernel
def test_kernel_rows_do_not_depend_on_the_batch() -> None:
    groups = random_groups(24, 512)
    x = torch.randn(37, 512)
    x[3] *= 1000
    together = run(x, groups)
    alone = torch.cat([run(x[i : i + 1], groups) for i in range(37)])
    assert torch.equal(together, alone)


def test_minmax_quantize_stays_within_half_a_step_of_the_weight() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 320) * torch.linspace(0.01, 1, 320)  # groups of unequal range
    groups = Int4Groups.quantize_minmax(weight)
    scale, _ = groups.group_affine()
    err = (groups.dequantize() - weight).abs().view(16, 10, 32).amax(-1)
    assert (err <= scale * 0.5 + 1e-6).all()
    assert groups.codes.max() <= 15 and groups.d.shape == (16, 2)


def _outlier_weight() -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.randn(64, 320) * torch.linspace(0.01, 1, 320)
    weight[torch.rand(64, 320) < 0.01] *= 8  # a few outliers stretch their groups
    return weight


@kernel
def test_search_quantize_has_less_error_than_minmax() -> None:
    weight = _outlier_weight()
    searched, minmax = Int4Groups.quantize(weight), Int4Groups.quantize_minmax(weight)
    assert searched.codes.max() <= 15 and searched.d.shape == (64, 2)
    assert searched.sub_scale.shape == searched.sub_min.shape == (64, 10)

    def error(groups: Int4Groups) -> float:
        return (groups.dequantize() - weight).pow(2).mean().item()

    assert error(searched) < 0.95 * error(minmax)


@kernel
def test_search_quantize_spends_its_grid_on_important_columns() -> None:
    weight = _outlier_weight()
    importance = torch.ones(320)
    important = torch.arange(320) % 32 < 4  # 4 columns of every group matter 100x
    importance[important] = 100.0
    plain, weighted = Int4Groups.quantize(weight), Int4Groups.quantize(weight, importance)

    def error(groups: Int4Groups, columns: torch.Tensor) -> float:
        return (groups.dequantize() - weight)[:, columns].pow(2).mean().item()

    assert error(weighted, important) < 0.8 * error(plain, important)
    assert error(weighted, ~important) > error(plain, ~important)  # the price elsewhere


@kernel
def test_search_quantize_keeps_constant_groups_and_rejects_bad_importance() -> None:
    weight = torch.full((8, 64), 0.25)
    weight[:, 32:] = -1.5
    groups = Int4Groups.quantize(weight)
    # A constant group is its minimum, exact up to the minimum's 8-bit grid.
    assert ((groups.dequantize() - weight).abs() <= groups.dmin / 2 + 1e-7).all()
    with pytest.raises(RuntimeError, match="importance must have 64 values"):
        Int4Groups.quantize(weight, torch.ones(63))


@kernel
def test_both_kernels_give_the_same_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    ours = Int4Linear(lin)
    monkeypatch.setattr(quantize, "cpu_kernels_available", lambda: False)
    theirs = Int4Linear(lin)
    assert (ours.kernel, theirs.kernel) == ("draftlm", "torch")
    assert ours.weight_bytes < theirs.weight_bytes * 1.01
    x = torch.randn(4, 256)
    with torch.no_grad():
        a, b, ref = ours(x), theirs(x), lin(x)
    assert float((a - b).norm() / ref.norm()) < 0.03


@pytest.mark.slow
@kernel
def test_compiled_layer_equals_the_eager_one() -> None:
    torch.manual_seed(0)
    layer = Int4Linear(nn.Linear(128, 32))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for rows in (1, 3):
        x = torch.randn(rows, 128)
        with torch.no_grad():
            assert torch.equal(compiled(x), layer(x))


def test_forced_fallback_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAFTLM_CPU_KERNELS", "torch")
    assert cpu_kernels._why_not() == "DRAFTLM_CPU_KERNELS=torch"


@kernel
@pytest.mark.parametrize(("cls", "op"), [(Int4Linear, "int4_linear_handle"),
                                         (Int8Linear, "int8_linear_handle")])
def test_layers_hold_weights_behind_a_handle_released_with_them(cls: type, op: str) -> None:
    """No weight tensors among the module's buffers (torch.compile would guard each one
    before every step); the kernels' registry frees them when the layer goes."""
    import gc

    layer = cls(nn.Linear(64, 16, bias=False))
    assert layer.kernel == "draftlm" and list(layer.named_buffers()) == []
    handle, x, call = layer._handle, torch.randn(3, 64), getattr(torch.ops.draftlm_cpu, op)
    assert torch.equal(call(x, handle, 16), layer(x))
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match="no registered layer"):
        call(x, handle, 16)


def random_int8(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
            torch.rand(n, generator=g) * 1e-2 + 1e-3)


def run_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.draftlm_cpu.int8_linear(x, *pack_int8(codes, scale), codes.shape[0])


def test_pack_int8_interleaves_rows_in_panels_of_eight() -> None:
    codes, scale = random_int8(10, 12)
    packed, scales = pack_int8(codes, scale)
    assert packed.shape == (2, 12, 8) and scales.shape == (16,)
    for row, k in [(0, 0), (3, 5), (9, 11), (8, 0)]:
        assert packed[row // 8, k, row % 8] == codes[row, k]
    assert packed[1, :, 2:].eq(0).all() and scales[10:].eq(0).all()  # padding rows


@kernel
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 40), (2, 5, 13), (3, 96, 8),
                                           (4, 1539, 17), (7, 896, 7), (40, 331, 41)])
def test_int8_kernel_is_float_activations_times_the_weights(m: int, k: int, n: int) -> None:
    """Row blocks of 3 with remainders of 1 and 2, K not a multiple of 8 (and shorter than
    8), a part-filled last panel: float sums of exact products, no activation rounding."""
    codes, scale = random_int8(n, k)
    x = torch.randn(m, k)
    x[0, :3] = 1e4  # an outlier would cost an 8-bit activation grid dearly
    expected = (x.double() @ codes.double().T) * scale.double()
    torch.testing.assert_close(run_int8(x, codes, scale).double(), expected,
                               rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@kernel
def test_int8_kernel_rows_do_not_depend_on_the_batch() -> None:
    codes, scale = random_int8(24, 517)
    x = torch.randn(37, 517)
    x[3] *= 1000
    together = run_int8(x, codes, scale)
    for rows in (1, 2, 3, 4, 5):  # each row block size and its remainders
        assert torch.equal(torch.cat([run_int8(x[i : i + rows], codes, scale)
                                      for i in range(0, 37, rows)]), together)

