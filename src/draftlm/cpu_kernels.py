"""draftlm's own CPU kernel for int4 decoding, built on first use.

PyTorch's int4 CPU kernel wants bfloat16 activations; on CPUs without AVX512-BF16/AMX (this
project's AVX2 machines) it decodes slower than fbgemm's int8 although it reads half the
bytes. `kernels/int4_avx2.cpp` does what llama.cpp does for its Q4_K format: int8
activations, byte dot products (`_mm256_maddubs_epi16`), 8-bit group scales applied in
integers and one float conversion per super-block of 256 values. It is compiled
with the machine's C++ compiler through `torch.utils.cpp_extension` the first time an int4
layer is made (about 40 s, then cached by torch under ~/.cache/torch_extensions), and
registered as the operator `torch.ops.draftlm_cpu.int4_linear`, which torch.compile treats
as opaque.

Where it cannot be built (not x86 with AVX2, no compiler, a failed build) or where
`DRAFTLM_INT4_KERNEL=torch` asks for it, int4 layers use PyTorch's kernel instead.
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

SOURCE = Path(__file__).parent / "kernels" / "int4_avx2.cpp"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]
_loaded: dict[str, bool] = {}


def has_cpp_compiler() -> bool:
    """torch.compile on CPU and this kernel's build both need a C++ compiler on PATH."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _why_not() -> str | None:
    """Why the kernel cannot be used here, or None when it can be built."""
    if os.environ.get("DRAFTLM_INT4_KERNEL", "auto") == "torch":
        return "DRAFTLM_INT4_KERNEL=torch"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU has no AVX2"
    if not has_cpp_compiler():
        return "no C++ compiler (g++ or clang++) on PATH"
    return None


def int4_kernel_available() -> bool:
    """True when `torch.ops.draftlm_cpu.int4_linear` is loaded (built here if need be)."""
    if "int4" in _loaded:
        return _loaded["int4"]
    reason = _why_not()
    if reason is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            if not (Path(_get_build_directory("draftlm_cpu", False)) / "draftlm_cpu.so").exists():
                print("draftlm: building the int4 CPU kernel (once per machine, ~40 s)",
                      file=sys.stderr, flush=True)
            load(name="draftlm_cpu", sources=[str(SOURCE)], extra_cflags=FLAGS,
                 extra_ldflags=["-fopenmp"],
                 is_python_module=False, verbose=False)
            torch.library.register_fake("draftlm_cpu::int4_linear")(_int4_linear_shape)
        except Exception as exc:  # a broken toolchain must not stop int4 from working
            reason = f"its build failed ({str(exc).strip().splitlines()[-1][:200]})"
    if reason is not None and os.environ.get("DRAFTLM_INT4_KERNEL") != "torch":
        warnings.warn(f"draftlm's int4 kernel is not used: {reason}; int4 layers run "
                      "PyTorch's kernel (slower on AVX2 CPUs)", stacklevel=2)
    _loaded["int4"] = reason is None
    return _loaded["int4"]


def _int4_linear_shape(x: Tensor, codes: Tensor, sub_scale: Tensor, sub_min: Tensor, d: Tensor,
                       dmin: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], codes.shape[0])


def pack_int4(codes: Tensor) -> Tensor:
    """Codes [N, K] (0..15, K a multiple of 32) -> uint8 [N, ceil(K/64) * 32] in the kernel's
    (and GGUF Q4_K's) order: groups of 32 in pairs, byte i of a pair holding code i of the
    first group in its low nibble and code i of the second in its high; a lone last group
    has zero high nibbles."""
    n, k = codes.shape
    pairs = -(-k // 64)
    padded = codes.new_zeros(n, pairs * 64, dtype=torch.uint8)
    padded[:, :k] = codes
    grouped = padded.view(n, pairs, 2, 32)
    return (grouped[:, :, 0] | (grouped[:, :, 1] << 4)).reshape(n, pairs * 32).contiguous()
