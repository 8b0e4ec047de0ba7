"""Write a draftlm model as a GGUF file that llama.cpp-style runtimes load (as a draft model).

The layout is llama.cpp's own converter's (`convert_hf_to_gguf.py`): its tensor names, q/k
rows permuted for arch `llama` (not for `qwen2`), 1-D tensors (norms, biases) in F32, a
tied head left out. Weights go in F32, F16 or Q8_0 (`gguf.quants` quantizes).

The tokenizer is copied, key for key and with its value types, from a GGUF file that holds
the same tokenizer (for a draft trained for a target: the target's file). llama.cpp needs
metadata that a tokenizer.json does not keep (the pre-tokenizer's name, token types), and a
draft must tokenize exactly as its target does, so copying is both simpler and exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats.gguf import gguf_name, open_gguf, permute_qk

TENSOR_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}

def architecture(config: ModelConfig) -> str:
    """GGUF arch: Qwen2 is Llama with q/k/v biases, and llama.cpp names it apart."""
    return "qwen2" if config.qkv_bias else "llama"


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    reader = open_gguf(source)
    fields = {name: f for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise DraftlmError(f"{source} holds no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise DraftlmError(f"{source}'s tokenizer has {len(tokens.data)} tokens, the model "
                           f"{vocab_size}: it is not this model's tokenizer")
    for name, field in fields.items():
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def save_gguf(
    path: str | Path, config: ModelConfig, tensors: Mapping[str, Tensor],
    tokenizer_gguf: str | Path, tensor_type: str = "f16", name: str | None = None,
) -> Path:
    """Write the model to `path` (atomically: a temporary file renamed at the end).

    A truncated head (`head_vocab_size`, a draft's) is written whole, as llama.cpp expects:
    rows of tokens outside it are zero, so they score 0 where the draft's own runtime
    gives them no probability; a proposal of one is still verified exactly."""
    if tensor_type not in TENSOR_TYPES:
        raise DraftlmError(f"unknown GGUF tensor type {tensor_type!r}; use one of "
                           f"{', '.join(TENSOR_TYPES)}")
    if config.rope_scaling is not None and config.rope_scaling.kind != "linear":
        raise DraftlmError(f"GGUF export supports linear rope scaling only, not "
                           f"{config.rope_scaling.kind}")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = architecture(config)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name or config.name)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if config.rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    writer.add_file_type(int({"f32": gguf.LlamaFileType.ALL_F32,
                              "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type]))
    _copy_tokenizer(writer, Path(tokenizer_gguf).expanduser(), config.vocab_size)
    qtype = TENSOR_TYPES[tensor_type]
    tensors = dict(tensors)
    head_ids = tensors.pop("head_token_ids", None)
    if head_ids is not None:
        full = tensors["lm_head.weight"].new_zeros(config.vocab_size, config.dim)
        full[head_ids.long()] = tensors["lm_head.weight"]
        tensors["lm_head.weight"] = full
    for tensor_name, tensor in tensors.items():
        if tensor_name == "lm_head.weight" and config.tie_embeddings:
            continue
        array = tensor.detach().to(torch.float32).cpu()
        if arch == "llama" and ".q_proj." in tensor_name:
            array = permute_qk(array, config.n_heads)
        elif arch == "llama" and ".k_proj." in tensor_name:
            array = permute_qk(array, config.n_kv_heads)
        data = array.numpy()
        kind = qtype if data.ndim == 2 and data.shape[1] % 32 == 0 else TENSOR_TYPES["f32"]
        packed = gguf.quants.quantize(np.ascontiguousarray(data), kind)
        if kind in (TENSOR_TYPES["f32"], TENSOR_TYPES["f16"]):
            writer.add_tensor(gguf_name(tensor_name), packed)
        else:
            writer.add_tensor(gguf_name(tensor_name), packed, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path
