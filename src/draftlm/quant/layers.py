"""Quantized linear layers for fast CPU decoding: `--quantize none|int8|int4`.

Decoding one token reads every weight once, so on a CPU its speed is set by how many bytes
the linear layers hold. Two layers replace `nn.Linear` (embeddings stay, since a lookup
reads one row):

* `Int8Linear`: weight-only int8, one scale per output channel (|q| <= 127), run by
  draftlm's AVX2 kernel (`quant.kernels`, csrc/int8_avx2.cpp): activations stay float32,
  so the only error is the weights' rounding, and each row goes through the same float
  operations in the same order at any batch size, so a row's output is bit-for-bit the
  same in a verify pass of 6 as alone. With the batch-invariant decode attention of
  `attention.small_step_attention` this keeps greedy speculative decoding token-for-token equal
  to greedy AR decoding of the quantized model. Why not fbgemm (PyTorch's
  `quantized::linear_dynamic`): it quantizes activations too, with one scale for the whole
  batch, and costs more per call than the weight bytes need
  (benchmarks/reports/cpu-kernels_*.md).
  fbgemm remains the kernel where draftlm's cannot be built. There each row is first
  scaled to max |x| = 1 and two constant columns (+1, -1, with zero weights) pin the
  batch's range to [-1, 1], so every row is quantized exactly as it would be alone; weights
  use 7 bits (|q| <= 63) so that the AVX2 pairwise u8 x s8 sums can never saturate int16;
  and activations go in as two rows each, the 8-bit row and its rounding residual scaled up
  255x, summed after the product: about 16-bit activations (one 8-bit row alone leaves
  about three times the KL from float32: benchmarks/reports/quant-kl_*.md).
* `Int4Linear`: weight-only int4 in groups of 32 along the input, asymmetric, in GGUF
  Q4_K's super-blocks (`quant.int4.Int4Groups`), run by draftlm's AVX2 kernel
  (`quant.kernels`, llama.cpp's Q4_K x Q8_K scheme: int8 activations, byte dot products,
  integer group scales), or PyTorch's packed kernel where that cannot be built. Rows are
  independent in both kernels, so verify passes stay batch-invariant.

Both are CPU kernels. For int4, GGUF tensors stored as Q4_K (exactly), Q4_0 or Q4_1 keep
their own codes (`quant.gguf_int4`); every other tensor is dequantized on load and quantized
here. `int4-mixed` is the quality-first variant, the mix of llama.cpp's Q4_K_M: the output
head, and any layer the GGUF file stores in more than 4 bits (Q4_K_M's Q6_K attn_v and
ffn_down of half the layers), stay in int8; it reads about a fifth more bytes per token.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from draftlm.errors import DraftlmError
from draftlm.quant.int4 import Int4Groups, pack_int4
from draftlm.quant.kernels import cpu_kernels_available, pack_int8

QUANTIZE_MODES = ("none", "int8", "int4", "int4-mixed")
FOUR_BIT_MODES = ("int4", "int4-mixed")
INT4_GROUP = 32

# fbgemm's packed weights are a TorchScript object that torch.compile cannot trace through.
# The compiled decode step (`compile.CompiledDecoder`) therefore reaches them through
# a custom op that takes an integer handle: the op is opaque to the compiler (its fake
# implementation only gives the output shape) while the code around it is fused.
_PACKED: dict[int, object] = {}
_HANDLES = itertools.count()


@torch.library.custom_op("draftlm::int8_linear", mutates_args=())
def int8_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """fbgemm's dynamic int8 linear on float32 rows `x` with the packed weight `handle`."""
    return torch.ops.quantized.linear_dynamic(x, _PACKED[handle], False)


@int8_linear.register_fake
def _int8_linear_shape(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


class _QuantizedLinear(nn.Module):
    """What the quantized layers share: the CPU check, the float bias, the output epilogue."""

    mode = ""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        device = linear.weight.device
        if device.type != "cpu":
            raise DraftlmError(
                f"--quantize {self.mode} uses PyTorch's CPU kernels; on {device.type} use "
                "--quantize none with --dtype bfloat16"
            )
        self._set_shape(linear.in_features, linear.out_features, linear.bias)

    def _set_shape(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        bias = bias.detach().float() if bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.in_features, self.out_features = in_features, out_features

    def _output(self, y: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """Float32 rows `y` -> bias added, the input's dtype and leading dimensions."""
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}"


def _per_channel(w: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """Float weights [N, K] -> int8 codes within +-top and one scale per output row."""
    scale = (w.abs().amax(dim=1) / top).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-top, top).to(torch.int8), scale


class Int8Linear(_QuantizedLinear):
    """`y = x @ W.T + b` with int8 weights, one scale per output channel: weight-only int8
    in draftlm's AVX2 kernel (float32 activations), or fbgemm with per-row two-part int8
    activations where that kernel cannot be built (module docstring)."""

    mode = "int8"
    WEIGHT_MAX = 127  # draftlm's kernel: activations stay float, so full 8-bit weights
    FBGEMM_WEIGHT_MAX = 63  # 7-bit weights: u8 x s8 pair sums stay within int16

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.detach().float()
        if cpu_kernels_available():
            self.kernel = "draftlm"
            q, scale = _per_channel(w, self.WEIGHT_MAX)
            # Held by the kernel's registry and called by handle, as the int4 layers.
            self._handle = torch.ops.draftlm_cpu.int8_register(*pack_int8(q, scale))
            weakref.finalize(self, torch.ops.draftlm_cpu.release, self._handle)
            return
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise DraftlmError("--quantize int8 needs draftlm's CPU kernel (x86 with AVX2 and "
                               "a C++ compiler) or PyTorch's fbgemm engine (x86 CPUs)")
        self.kernel = "fbgemm"
        torch.backends.quantized.engine = "fbgemm"
        q, scale = _per_channel(w, self.FBGEMM_WEIGHT_MAX)
        # Two extra input columns with zero weights carry the +1/-1 range pins.
        q = torch.cat([q, q.new_zeros(q.shape[0], 2)], dim=1)
        with warnings.catch_warnings():  # fbgemm's packing still takes a quantized tensor
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
            )
            packed = torch.ops.quantized.linear_prepack(qweight, None)
        self._handle = next(_HANDLES)
        _PACKED[self._handle] = packed
        weakref.finalize(self, _PACKED.pop, self._handle, None)  # freed with the layer
        self.register_buffer("pins", torch.tensor([[1.0, -1.0]]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1]).float()
        if self.kernel == "draftlm":
            y = torch.ops.draftlm_cpu.int8_linear_handle(rows, self._handle, self.out_features)
            return self._output(y, shape, dtype)
        n = rows.shape[0]
        peak = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
        scaled = rows / peak
        # fbgemm's grid for the pinned range [-1, 1]: step 2/255, levels -128..127 around
        # zero point 128. Where a tie rounds the other way in fbgemm, that value just keeps
        # its 8-bit error.
        step = 2.0 / 255
        coarse = (scaled / step).round().clamp(-128, 127) * step
        residual = ((scaled - coarse) * 255).clamp(-1.0, 1.0)
        pinned = torch.cat([torch.cat([scaled, residual]), self.pins.expand(2 * n, 2)], 1)
        y = int8_linear(pinned, self._handle, self.out_features)
        return self._output((y[:n] + y[n:] / 255) * peak, shape, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()} {self.kernel} kernel"


class Int4Linear(_QuantizedLinear):
    """Weight-only int4: groups of 32 along the input in super-blocks of 8 (`Int4Groups`).

    Runs draftlm's AVX2 kernel (`quant.kernels`: int8 activations, integer group scales)
    where it can be built, else PyTorch's packed kernel (bfloat16 activations and a
    bfloat16 scale and zero point per group, out_features a multiple of 16)."""

    mode = "int4"

    def __init__(self, linear: nn.Linear, importance: Tensor | None = None) -> None:
        super().__init__(linear)
        weight = linear.weight.detach()
        out_f, in_f = weight.shape
        if in_f % INT4_GROUP:
            raise DraftlmError(f"--quantize int4 needs in_features divisible by {INT4_GROUP}, "
                               f"got {in_f} x {out_f}")
        self._set_groups(Int4Groups.quantize(weight, importance))

    @classmethod
    def from_groups(cls, groups: Int4Groups, bias: Tensor | None = None) -> Int4Linear:
        """A layer holding 4-bit codes as they are (a GGUF file's Q4_K/Q4_0/Q4_1 blocks)."""
        rows, cols = groups.codes.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._set_shape(cols, rows, bias)
        layer._set_groups(groups)
        return layer

    def _set_groups(self, groups: Int4Groups) -> None:
        """Store `groups` in the layout of the kernel this machine runs."""
        if cpu_kernels_available():
            self.kernel = "draftlm"
            # Held by the kernel's registry and called by handle: torch.compile guards
            # every tensor a compiled step reads, and these would be 5 per layer.
            self._packed = pack_int4(groups)
            self._handle = torch.ops.draftlm_cpu.int4_register(*self._packed.values())
            weakref.finalize(self, torch.ops.draftlm_cpu.release, self._handle)
            return
        q = groups.codes
        if q.shape[0] % 16:
            raise DraftlmError(f"--quantize int4 with PyTorch's kernel needs out_features "
                               f"divisible by 16 (its tile), got {q.shape[0]}")
        self.kernel = "torch"
        scale, minimum = groups.group_affine()
        # PyTorch's kernel computes (q - 8) * scale + zero: zero is the value of level 8.
        zero = minimum + 8 * scale
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32), 1), persistent=False)
        scales_zeros = torch.stack([scale, zero], dim=-1)
        self.register_buffer("scales_zeros", scales_zeros.transpose(0, 1).contiguous()
                             .to(torch.bfloat16), persistent=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes one forward pass reads for the weight (codes and their scales)."""
        tensors = list(self._packed.values()) if self.kernel == "draftlm" \
            else [self.packed, self.scales_zeros]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1])
        if self.kernel == "draftlm":
            y = torch.ops.draftlm_cpu.int4_linear_handle(rows.float(), self._handle,
                                                         self.out_features)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.packed,
                                                  INT4_GROUP, self.scales_zeros).float()
        return self._output(y, shape, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()} g{INT4_GROUP} {self.kernel} kernel"


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    """One linear layer whose outputs are those of `linears` side by side."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0],
                      bias=any(lin.bias is not None for lin in linears), device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([
            lin.bias.detach() if lin.bias is not None
            else lin.weight.new_zeros(lin.out_features) for lin in linears
        ]), requires_grad=False)
    return fused


def _plan(model: nn.Module) -> list[tuple[nn.Module, str, str, list[str]]]:
    """(parent, new attribute, name prefix, parts) for every layer `quantize_model` makes.
    Projections that read the same input become one layer: one kernel call, one activation
    quantization (rows are exact either way: weights are per channel)."""
    plan = []
    for prefix, parent in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        fused = set()
        for parts, attr in ((["q_proj", "k_proj", "v_proj"], "qkv_proj"),
                            (["gate_proj", "up_proj"], "gate_up_proj")):
            if all(isinstance(getattr(parent, p, None), nn.Linear) for p in parts):
                plan.append((parent, attr, prefix, parts))
                fused.update(parts)
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and name not in fused:
                plan.append((parent, name, prefix, [name]))
    return plan


def quantize_model(
    model: nn.Module, mode: str, int4_groups: dict[str, Int4Groups] | None = None,
    importance: dict[str, Tensor] | Callable[[], dict[str, Tensor]] | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by its quantized form; returns it.

    `int4_groups` (weight name -> 4-bit codes, from `quant.gguf_int4.read_int4_groups`) gives
    int4 layers their codes as stored in a GGUF file instead of re-quantized floats; a fused
    layer takes them only when all its parts have them. `int4-mixed` puts the head, and
    layers with a part the file stores above 4 bits, in int8 instead (module docstring).
    `importance` (module name -> mean squared input activation per column, from
    `calibrate`; or a function returning it, called on the float model only when some layer
    is quantized to int4 from floats) weights the 4-bit search toward the columns that
    matter. A tied output head shares the embedding's Parameter; quantizing it makes a
    separate int8/int4 copy."""
    if mode not in QUANTIZE_MODES:
        raise DraftlmError(f"unknown --quantize {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return model
    stored = int4_groups if mode in FOUR_BIT_MODES and int4_groups else {}

    def kind(prefix: str, parts: list[str]) -> str:
        """int8, int4 (from floats) or stored (the file's 4-bit codes)."""
        from_file = all(f"{prefix}{part}.weight" in stored for part in parts)
        if mode == "int8":
            return "int8"
        if mode == "int4-mixed" and (parts == ["lm_head"] or (stored and not from_file)):
            # What llama.cpp's Q4_K_M keeps above 4 bits (the output head, and the tensors
            # the file stores as Q5/Q6/Q8) stays in 8 bits.
            return "int8"
        return "stored" if from_file else "int4"

    plan = [(parent, attr, prefix, parts, kind(prefix, parts))
            for parent, attr, prefix, parts in _plan(model)]
    if callable(importance):
        importance = importance() if any(k == "int4" for *_, k in plan) else None
    for parent, attr, prefix, parts, how in plan:
        linears = [getattr(parent, p) for p in parts]
        fused = _concat(linears) if len(linears) > 1 else linears[0]
        if how == "stored":
            layer = Int4Linear.from_groups(Int4Groups.concat(
                [stored[f"{prefix}{p}.weight"] for p in parts]), fused.bias)
        elif how == "int4":
            # Fused parts read the same input: the first part's statistics hold for all.
            layer = Int4Linear(fused, (importance or {}).get(f"{prefix}{parts[0]}"))
        else:
            layer = Int8Linear(fused)
        for p in parts:
            delattr(parent, p)
        setattr(parent, attr, layer)
    model.quantization = mode  # read back by LM.quantization
    return model
