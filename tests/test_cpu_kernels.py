"""draftlm's AVX2 int4 kernel: the dot products of its int8 activations with the 4-bit
codes, rows independent of the batch, GGUF's block order, and PyTorch's kernel as the
fallback giving the same layer within rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from draftlm import cpu_kernels, quantize
from draftlm.cpu_kernels import int4_kernel_available, pack_int4
from draftlm.quantize import Int4Linear

kernel = pytest.mark.skipif(not int4_kernel_available(),
                            reason="draftlm's int4 kernel cannot be built here")


def random_codes(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    minimum = (-torch.rand(n, k // 32, generator=g) * 0.1).half()
    return codes, scale, minimum


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    grouped = codes.float().view(n, k // 32, 32)
    return (grouped * scale.float()[..., None] + minimum.float()[..., None]).view(n, k)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: int8 per group of 32, scale max|x| / 127."""
    groups = x.view(x.shape[0], -1, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    return (torch.round(groups / torch.where(step > 0, step, 1)) * step).view_as(x)


def test_pack_puts_code_i_and_i_plus_16_in_one_byte() -> None:
    codes = torch.arange(64, dtype=torch.int32).remainder(16).view(1, 64)
    packed = pack_int4(codes)
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8
    # group 0 holds codes 0..15 then 0..15: byte i = i | i << 4
    assert packed[0, :16].tolist() == [i | (i << 4) for i in range(16)]


@kernel
@pytest.mark.parametrize(("m", "k"), [(1, 64), (3, 96), (5, 1536), (9, 32)])
def test_kernel_equals_the_dot_product_of_its_quantized_activations(m: int, k: int) -> None:
    """Odd group counts, row blocks of 4 plus a remainder: all exact up to float sums."""
    codes, scale, minimum = random_codes(40, k)
    x = torch.randn(m, k)
    x[0, :32] = 0  # an all-zero group has no activation scale
    got = torch.ops.draftlm_cpu.int4_linear(x, pack_int4(codes), scale, minimum)
    weight = dequantize(codes, scale, minimum)
    # The codes' part uses the int8 activations, the minimums' part the float sums.
    grouped = weight.view(40, -1, 32) - minimum.float()[..., None]
    expected = quantized_activations(x) @ grouped.reshape(40, k).T
    expected += (x.view(m, -1, 32).sum(-1) @ minimum.float().T)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and close to the float product: 8-bit activations cost about 1%
    exact = x @ weight.T
    assert float((got - exact).norm() / exact.norm()) < 0.03


@kernel
def test_many_rows_take_the_float_path() -> None:
    """A prefill (> 32 rows) multiplies float activations by the dequantized weights."""
    codes, scale, minimum = random_codes(2100, 64)  # more than one block of 2048 rows
    x = torch.randn(40, 64)
    got = torch.ops.draftlm_cpu.int4_linear(x, pack_int4(codes), scale, minimum)
    torch.testing.assert_close(got, x @ dequantize(codes, scale, minimum).T,
                               rtol=1e-4, atol=1e-4)


@kernel
def test_kernel_rows_do_not_depend_on_the_batch() -> None:
    codes, scale, minimum = random_codes(24, 256)
    x = torch.randn(7, 256)
    x[3] *= 1000
    packed = pack_int4(codes)
    together = torch.ops.draftlm_cpu.int4_linear(x, packed, scale, minimum)
    alone = torch.cat([torch.ops.draftlm_cpu.int4_linear(x[i : i + 1], packed, scale, minimum)
                       for i in range(7)])
    assert torch.equal(together, alone)


@kernel
def test_both_kernels_give_the_same_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    ours = Int4Linear(lin)
    monkeypatch.setattr(quantize, "int4_kernel_available", lambda: False)
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
    monkeypatch.setenv("DRAFTLM_INT4_KERNEL", "torch")
    assert cpu_kernels._why_not() == "DRAFTLM_INT4_KERNEL=torch"
