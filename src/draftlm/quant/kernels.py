"""draftlm's own CPU kernels for int4 and int8 decoding, built on first use.

PyTorch's int4 CPU kernel wants bfloat16 activations; on CPUs without AVX512-BF16/AMX
(AVX2 machines) it decodes slower than fbgemm's int8 although it reads half the bytes.
`csrc/int4_avx2.cpp` does what llama.cpp does for its Q4_K format: int8 activations,
byte dot products (`_mm256_maddubs_epi16`), 8-bit group scales applied in
integers and one float conversion per super-block of 256 values, with weight rows
interleaved in panels of 8 (`pack_int4`) so that one byte product serves 8 rows.
`csrc/int8_avx2.cpp` is weight-only int8 (float32 activations, 8-bit weights per output
channel, the same panels of 8: `pack_int8`); int8 layers use it in place of fbgemm, which
quantizes activations too and costs more per call (benchmarks/reports/cpu-kernels_*.md).

They are compiled with the machine's C++ compiler through `torch.utils.cpp_extension` the
first time a quantized layer is made (about a minute, then cached by torch under
~/.cache/torch_extensions), and registered as operators `torch.ops.draftlm_cpu.*`, which
torch.compile treats as opaque. A layer registers its packed weights once (`int4_register`,
`int8_register`; `csrc/layer_handles.cpp`) and calls `int4_linear_handle(x, handle, n)` or
`int8_linear_handle`: a compiled decode step then holds an integer per layer instead of
weight tensors, each of which torch.compile would check before every step.

Where they cannot be built (not x86 with AVX2, no compiler, a failed build) or where
`DRAFTLM_CPU_KERNELS=torch` asks for it, int4 layers use PyTorch's kernel and int8 layers
fbgemm (with per-row two-part int8 activations: `quant.layers.Int8Linear`).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("layer_handles.cpp", "int4_avx2.cpp", "int4_quantize.cpp", "int8_avx2.cpp")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]
_loaded: dict[str, bool] = {}


def has_cpp_compiler() -> bool:
    """torch.compile on CPU and this kernel's build both need a C++ compiler on PATH."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _why_not() -> str | None:
    """Why the kernel cannot be used here, or None when it can be built."""
    if os.environ.get("DRAFTLM_CPU_KERNELS", "auto") == "torch":
        return "DRAFTLM_CPU_KERNELS=torch"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU has no AVX2"
    if not has_cpp_compiler():
        return "no C++ compiler (g++ or clang++) on PATH"
    return None


def cpu_kernels_available() -> bool:
    """True when the `torch.ops.draftlm_cpu` kernels are loaded (built here if need be)."""
    if "kernels" in _loaded:
        return _loaded["kernels"]
    reason = _why_not()
    if reason is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            if not (Path(_get_build_directory("draftlm_cpu", False)) / "draftlm_cpu.so").exists():
                print("draftlm: building its CPU kernels (once per machine, about a minute)",
                      file=sys.stderr, flush=True)
            load(name="draftlm_cpu", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS,
                 extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
            torch.library.register_fake("draftlm_cpu::int4_linear")(_int4_linear_shape)
            torch.library.register_fake("draftlm_cpu::int4_linear_handle")(_handle_shape)
            torch.library.register_fake("draftlm_cpu::int8_linear")(_int8_linear_shape)
            torch.library.register_fake("draftlm_cpu::int8_linear_handle")(_handle_shape)
        except Exception as exc:  # a broken toolchain must not stop quantized layers working
            reason = f"its build failed ({str(exc).strip().splitlines()[-1][:200]})"
    if reason is not None and os.environ.get("DRAFTLM_CPU_KERNELS") != "torch":
        warnings.warn(f"draftlm's CPU kernels are not used: {reason}; int4 layers run "
                      "PyTorch's kernel and int8 layers fbgemm (slower on AVX2 CPUs)",
                      stacklevel=2)
    _loaded["kernels"] = reason is None
    return _loaded["kernels"]


def _int4_linear_shape(x: Tensor, codes: Tensor, scales: Tensor, mins: Tensor, d: Tensor,
                       dmin: Tensor, n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


def _int8_linear_shape(x: Tensor, codes: Tensor, scale: Tensor, n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


def _handle_shape(x: Tensor, handle: int, n: int) -> Tensor:
    return x.new_empty(x.shape[0], n)


def panels_of_8(t: Tensor, cols: int) -> Tensor:
    """[n, c] -> [ceil(n / 8), 8, cols]: rows in panels of 8 as both kernels read them,
    zero-padded in both dimensions."""
    panels = -(-t.shape[0] // 8)
    padded = t.new_zeros(panels * 8, cols)
    padded[: t.shape[0], : t.shape[1]] = t
    return padded.view(panels, 8, cols)


def pack_int8(codes: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes [N, K] and per-row scales [N] -> the int8 kernel's buffers
    (csrc/int8_avx2.cpp): codes [P, K, 8] with rows in panels of 8, column-interleaved,
    and scales [8P]; padding rows are zeros."""
    panels = panels_of_8(codes, codes.shape[1])
    scales = panels_of_8(scale.float()[:, None], 1).reshape(-1)
    return panels.transpose(1, 2).contiguous(), scales.contiguous()
