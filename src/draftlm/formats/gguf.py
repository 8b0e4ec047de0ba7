"""Read a llama.cpp GGUF file (arch `llama` or `qwen2`) into draftlm's config, weights and
tokenizer.

The `gguf` package parses the file (memory-mapped) and dequantizes each tensor type it
knows to float32; we rename tensors to draftlm's state-dict names and undo one layout
change: llama.cpp's converter permutes the rows of q/k weights of arch `llama` so its
interleaved ("GPT-J style") RoPE applies, while draftlm (like HF) rotates halves. `qwen2`
files are written unpermuted because llama.cpp runs Qwen2 with rotate-half ("NEOX") RoPE.

Weights are dequantized one tensor at a time and can be cast right away
(`iter_gguf_tensors(..., dtype=torch.bfloat16)`), so a 1.5B model never needs all of its
float32 copy and its bfloat16 copy at once.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from torch import Tensor

from draftlm.config import ModelConfig, RopeScaling
from draftlm.errors import DraftlmError
from draftlm.formats.gguf_tokenizer import end_of_generation_ids, tokenizer_from_gguf
from draftlm.model import Transformer
from draftlm.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Keys whose values are big arrays: read by the tokenizer, left out of `metadata`.
_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
               "tokenizer.ggml.merges")


@dataclass
class GGUFCheckpoint:
    """A GGUF file as draftlm uses it. `tensors` carries draftlm state-dict names; with tied
    embeddings `lm_head.weight` is absent, as in `formats.hf.read_hf_tensors`."""

    config: ModelConfig
    tensors: dict[str, Tensor]
    tokenizer: Tokenizer
    metadata: dict[str, Any] = field(default_factory=dict)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A `gguf.GGUFReader` over `path`; every way a file can be unreadable is a one-line
    DraftlmError (the reader itself raises ValueError/IndexError/KeyError/...)."""
    path = Path(path)
    if not path.is_file():
        raise DraftlmError(f"no GGUF file at {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DraftlmError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader validates nothing up front; any failure = bad file
        # Reading past the end shows up as an empty slice ([0] -> IndexError) or a short one
        # (numpy refuses to view/reshape it); anything else is a malformed header.
        short = isinstance(err, IndexError) or any(
            text in str(err) for text in ("cannot reshape", "larger dtype")
        )
        if short:
            raise DraftlmError(
                f"{path} is truncated ({size} bytes): the file ends before its header and "
                "tensors do; download or assemble it again"
            ) from err
        raise DraftlmError(f"{path} has a corrupt GGUF header ({err}); get the file again") from err
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise DraftlmError(f"{path} is truncated ({size} bytes) inside tensor {tensor.name}")
    return reader


def read_metadata(reader: gguf.GGUFReader, arrays: bool = True) -> dict[str, Any]:
    """Key -> plain Python value (str, int, float, bool, list) of every metadata field.

    With `arrays=False` the big arrays (tokens, merges ...) are left out: what is worth
    printing."""
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        is_array = fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and not arrays and (key in _ARRAY_KEYS or len(fld.data) > 64):
            continue
        try:
            out[key] = fld.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as err:
            raise DraftlmError(f"GGUF metadata field {key!r} is corrupt: {err}") from err
    return out


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise DraftlmError(f"GGUF file lacks metadata {key!r}; it is not a complete model file")
    return meta[key]


def _float32_value(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def _rope_scaling(meta: dict[str, Any], arch: str) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = _float32_value(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" or factor == 1.0:
        return None
    if kind != "linear":
        raise DraftlmError(f"unsupported RoPE scaling {kind!r} in GGUF; draftlm supports linear")
    return RopeScaling(kind="linear", factor=factor)


def config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                         name: str = "custom") -> ModelConfig:
    """ModelConfig from `<arch>.*` keys; vocab size, tying and biases from the tensors."""
    try:
        return _config_from_metadata(meta, tensor_shapes, name)
    except (TypeError, ValueError) as err:
        raise DraftlmError(f"GGUF metadata has a value of the wrong type ({err})") from err


def _config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                          name: str) -> ModelConfig:
    arch = _require(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise DraftlmError(
            f"unsupported architecture {arch}; draftlm reads llama and qwen2 GGUF files"
        )
    if "rope_freqs.weight" in tensor_shapes:
        raise DraftlmError("GGUF has per-dimension RoPE frequency factors (rope_freqs, Llama "
                           "3.1 style), which draftlm does not read")
    n_heads = int(_require(meta, f"{arch}.attention.head_count"))
    dim = int(_require(meta, f"{arch}.embedding_length"))
    if n_heads < 1 or dim < 1:
        raise DraftlmError(f"GGUF {arch}.attention.head_count={n_heads} and "
                           f"{arch}.embedding_length={dim} must both be >= 1")
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise DraftlmError(f"GGUF rotates {rope_dims} of {head_dim} head dimensions; draftlm "
                           "supports full-head RoPE only")
    if "token_embd.weight" not in tensor_shapes:
        raise DraftlmError("GGUF file has no token_embd.weight tensor")
    vocab_size = tensor_shapes["token_embd.weight"][0]
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        name=name,
        vocab_size=vocab_size,
        n_layers=int(_require(meta, f"{arch}.block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        intermediate_size=int(_require(meta, f"{arch}.feed_forward_length")),
        max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
        rope_theta=_float32_value(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        norm_eps=_float32_value(meta.get(f"{arch}.attention.layer_norm_rms_epsilon",
                                         1e-6 if arch == "qwen2" else 1e-5)),
        tie_embeddings="output.weight" not in tensor_shapes,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_shapes,
        bos_id=None if bos_id is None else int(bos_id),
        eos_ids=end_of_generation_ids(meta),
        head_dim_override=head_dim if head_dim != dim // n_heads else None,
    )


def gguf_name(name: str) -> str:
    """llama.cpp's name of a draftlm state-dict tensor (`layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`): the inverse of `draftlm_name`, for writing files."""
    for theirs, ours in _GLOBAL_NAMES.items():
        if ours == name:
            return theirs
    parts = name.split(".")
    module = ".".join(parts[2:-1])
    for part, ours in _BLOCK_NAMES.items():
        if parts[0] == "layers" and ours == module:
            return f"blk.{parts[1]}.{part}.{parts[-1]}"
    raise DraftlmError(f"tensor {name!r} has no GGUF name (not a Llama/Qwen2 weight)")


def draftlm_name(gguf_name: str) -> str | None:
    """draftlm state-dict name of a GGUF tensor name (None: not a tensor draftlm knows)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    return None


def unpermute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    The converter regroups each head's rows from [first half | second half] to interleaved
    pairs (x0, x_{d/2}, x1, ...) so that rotating adjacent pairs equals HF's rotate-half;
    we put the halves back. Works on weights [H*D, dim] and biases [H*D]."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def draftlm_layout(name: str, rows: Tensor, arch: str, n_heads: int, n_kv_heads: int) -> Tensor:
    """`rows` of tensor `name` (a weight, bias or per-row data such as 4-bit group scales)
    in draftlm's layout: arch `llama` q/k rows un-permuted, everything else as it is."""
    if arch == "llama" and ".self_attn.q_proj." in name:
        return unpermute_qk(rows, n_heads)
    if arch == "llama" and ".self_attn.k_proj." in name:
        return unpermute_qk(rows, n_kv_heads)
    return rows


def permute_qk(weight: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's permutation itself (the inverse of `unpermute_qk`), for writing files."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise DraftlmError(
            f"GGUF tensor {tensor.name} has quantization type {tensor.tensor_type.name}, which "
            "the gguf package cannot dequantize; re-quantize the model (e.g. Q4_K_M or Q8_0)"
        ) from err
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims inner-first
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map; copy those out.
    return array if array.flags.writeable else array.copy()


def _track(items: list[Any], description: str, enabled: bool) -> Iterable[Any]:
    """`items`, with a progress bar on stderr when asked for and a terminal is watching."""
    if not (enabled and sys.stderr.isatty()):
        return items

    return track(items, description=description, console=Console(stderr=True), transient=True)


def iter_gguf_tensors(reader: gguf.GGUFReader, config: ModelConfig, arch: str,
                      dtype: torch.dtype = torch.float32, progress: bool = False
                      ) -> Iterator[tuple[str, Tensor]]:
    """(draftlm name, tensor) for each weight, dequantized and cast one at a time."""
    for tensor in _track(reader.tensors, "dequantize", progress):
        name = draftlm_name(tensor.name)
        if name is None:
            raise DraftlmError(
                f"GGUF tensor {tensor.name!r} is not part of a {arch} model draftlm can build"
            )
        weight = torch.from_numpy(_dequantize(tensor))
        weight = draftlm_layout(name, weight, arch, config.n_heads, config.n_kv_heads)
        yield name, weight.to(dtype)


def _check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the model needs is present with the shape the config implies."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    for name, shape in expected.items():
        if name not in shapes:
            raise DraftlmError(f"GGUF file lacks the weights of {name!r}")
        if shapes[name] != shape:
            raise DraftlmError(f"GGUF tensor for {name!r} has shape {shapes[name]}, the "
                               f"file's metadata implies {shape}")


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              name: str | None = None, progress: bool = True) -> GGUFCheckpoint:
    """Config, weights (dequantized, cast to `dtype`), tokenizer and printable metadata of a
    GGUF file. `name` names the config (default: the file name without .gguf); `progress`
    shows a bar on a terminal (a 1.5B Q4_K_M file takes over a minute)."""
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    config = config_from_metadata(meta, shapes, name or path.name.removesuffix(".gguf"))
    renamed = {draftlm_name(n): s for n, s in shapes.items() if draftlm_name(n) is not None}
    _check_shapes(config, renamed)
    tokenizer = tokenizer_from_gguf(meta)
    if tokenizer.vocab_size > config.vocab_size:
        raise DraftlmError(f"GGUF tokenizer has {tokenizer.vocab_size} tokens, the embedding "
                           f"only {config.vocab_size} rows")
    arch = meta["general.architecture"]
    tensors = dict(iter_gguf_tensors(reader, config, arch, dtype, progress))
    printable = {k: v for k, v in meta.items()
                 if not isinstance(v, list) and k != "tokenizer.chat_template"}
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=tokenizer,
                          metadata=printable)


def read_gguf_named(path: str | Path, names: list[str]) -> dict[str, Tensor]:
    """Only the tensors `names` (draftlm names) of a GGUF file, dequantized to float32."""
    reader = open_gguf(path)
    meta = read_metadata(reader, arrays=False)
    arch = meta["general.architecture"]
    by_name = {draftlm_name(t.name): t for t in reader.tensors}
    n_heads = int(_require(meta, f"{arch}.attention.head_count"))
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    out: dict[str, Tensor] = {}
    for name in names:
        tensor = by_name.get(name)
        if tensor is None and name == "lm_head.weight":  # a tied head: the embedding
            tensor = by_name.get("embed_tokens.weight")
        if tensor is None:
            raise DraftlmError(f"GGUF file {path} has no tensor for {name!r}")
        weight = torch.from_numpy(_dequantize(tensor))
        out[name] = draftlm_layout(name, weight, arch, n_heads, n_kv_heads)
    return out
