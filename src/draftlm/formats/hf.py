"""HF-style checkpoint folders (config.json + safetensors + tokenizer files), read and write.

A folder written here loads in HF transformers (`AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained`) as the same model, and a folder HF writes loads here: the
HF folder is the exchange format between draftlm and the rest of the ecosystem.

Weights are safetensors only (no pickle). Reading goes through safetensors' memory map one
tensor at a time, so a large checkpoint is never held twice; writing happens in a temporary
sibling folder that is renamed into place only once complete, so an interrupted save never
leaves a folder that looks loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from torch import Tensor

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats.sentencepiece import tokenizer_from_sentencepiece
from draftlm.model import Transformer
from draftlm.tokenizer import Tokenizer

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's default shard size

# Buffers some HF checkpoints carry that are not parameters (draftlm recomputes them).
_NON_PARAMETER_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


@dataclass
class HFCheckpoint:
    """What a HF folder holds, keyed the way draftlm's `Transformer` names its parameters."""

    config: ModelConfig
    tensors: dict[str, Tensor]
    tokenizer: Tokenizer


# ---- reading ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DraftlmError(f"{path} is not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise DraftlmError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DraftlmError(f"{path} is not a JSON object")
    return data


def _check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DraftlmError(f"checkpoint folder {folder} does not exist")
    return folder


def read_hf_config(folder: str | Path) -> ModelConfig:
    """The `ModelConfig` of a HF folder's config.json (+ EOS ids of generation_config.json)."""
    folder = _check_folder(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise DraftlmError(f"{folder} has no config.json: it is not a HF checkpoint folder")
    hf = _read_json(path)
    # transformers 5 writes rope settings as `rope_parameters`; older files use top-level keys.
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        hf = dict(hf)
        hf.setdefault("rope_theta", params.get("rope_theta", 10000.0))
        if hf.get("rope_scaling") is None and params.get("rope_type", "default") != "default":
            hf["rope_scaling"] = params
    try:
        config = ModelConfig.from_hf(hf, name=folder.resolve().name)
    except KeyError as err:
        raise DraftlmError(f"{path} lacks the field {err.args[0]!r}") from err
    # Chat models often list extra stop tokens (end-of-turn) only in generation_config.json.
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        merged = tuple(dict.fromkeys([*config.eos_ids, *extra]))
        if merged != config.eos_ids:
            config = config.with_(eos_ids=merged)
    return config


def _weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it, after checking every file exists."""
    index_path = folder / SAFETENSORS_INDEX
    single = folder / SAFETENSORS_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DraftlmError(f"{index_path} has no weight_map")
        files: dict[str, Path] = {}
        for shard in sorted(set(weight_map.values())):
            path = (folder / shard).resolve()
            if path.parent != folder.resolve():
                raise DraftlmError(f"{index_path} names a shard outside the folder: {shard!r}")
            if not path.is_file():
                raise DraftlmError(
                    f"shard {shard} listed in {index_path.name} is missing from {folder}"
                )
            files[shard] = path
        return {name: files[shard] for name, shard in weight_map.items()}
    if single.is_file():
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if any(folder.glob("pytorch_model*.bin")):
        raise DraftlmError(
            f"{folder} holds only pytorch_model.bin (pickle); draftlm loads safetensors only. "
            "Convert it once with transformers: AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder, safe_serialization=True)"
        )
    raise DraftlmError(f"{folder} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open`, with a damaged file (empty, truncated, a garbage or oversized header,
    offsets out of bounds) reported in one line that names it. safetensors checks the
    header's size and offsets before mapping anything, so no huge allocation happens."""
    try:
        handle = safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise DraftlmError(f"{path} is not a readable safetensors file ({err})") from err
    with handle as f:
        yield f


def _draftlm_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of `Transformer(config)`, built on the meta device (free)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: p.shape for name, p in model.state_dict().items()}


def read_hf_tensors(
    folder: str | Path, config: ModelConfig, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The folder's weights under draftlm names, checked against `config`'s shapes.

    Tensors are memory-mapped from the safetensors files and converted to `dtype` one at a
    time. With tied embeddings `lm_head.weight` is left out (the model shares embed_tokens)."""
    folder = _check_folder(folder)
    locations = _weight_files(folder)
    expected = _expected_shapes(config)
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    wanted: dict[Path, list[tuple[str, str]]] = {}
    for hf_name, path in locations.items():
        name = _draftlm_name(hf_name)
        if name in expected:
            wanted.setdefault(path, []).append((hf_name, name))
        elif name == "lm_head.weight" or name.endswith(_NON_PARAMETER_SUFFIXES):
            continue  # a tied head saved anyway, or a buffer draftlm recomputes
        else:
            raise DraftlmError(
                f"{folder} has tensor {hf_name!r}, which the {config.name} architecture "
                "(per its config.json) does not have"
            )
    missing = [n for n in expected if n not in {d for v in wanted.values() for _, d in v}]
    if missing:
        raise DraftlmError(
            f"{folder} lacks tensor {missing[0]!r}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    tensors: dict[str, Tensor] = {}
    for path, names in wanted.items():
        with _open_safetensors(path) as f:
            present = set(f.keys())
            for hf_name, name in names:
                if hf_name not in present:
                    raise DraftlmError(f"tensor {hf_name!r} is missing from {path.name}")
                try:
                    tensor = f.get_tensor(hf_name)
                except (SafetensorError, RuntimeError, ValueError) as err:
                    raise DraftlmError(f"tensor {hf_name!r} in {path} cannot be read ({err}); "
                                       "the file is damaged") from err
                if tensor.shape != expected[name]:
                    raise DraftlmError(
                        f"tensor {hf_name!r} in {path.name} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {tuple(expected[name])}"
                    )
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[name] = tensor
    return {name: tensors[name] for name in expected}  # model order, not file order


def read_hf_named(folder: str | Path, names: list[str]) -> dict[str, Tensor]:
    """Only the tensors `names` (draftlm names) of a folder, memory-mapped: a draft head
    borrowing its target's output head reads one matrix, not the whole model."""
    folder = _check_folder(folder)
    files = _weight_files(folder)
    hf_names = {_draftlm_name(hf): hf for hf in files}
    out: dict[str, Tensor] = {}
    for name in names:
        stored = name
        if stored not in hf_names and name == "lm_head.weight":  # a tied head
            stored = "embed_tokens.weight"
        if stored not in hf_names:
            raise DraftlmError(f"{folder} has no tensor {name!r}")
        path = files[hf_names[stored]]
        with _open_safetensors(path) as f:
            try:
                out[name] = f.get_tensor(hf_names[stored])
            except (SafetensorError, RuntimeError, ValueError) as err:
                raise DraftlmError(f"tensor {name!r} in {path} cannot be read ({err}); the "
                                   "file is damaged") from err
    return out


def read_hf_tokenizer(folder: str | Path, config: ModelConfig | None = None) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json), else a converted SentencePiece tokenizer.model.

    The model config's BOS/EOS ids are the fallback when the tokenizer files name none."""
    folder = _check_folder(folder)
    bos_id = config.bos_id if config is not None else None
    eos_ids = config.eos_ids if config is not None else ()
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder, bos_id=bos_id, eos_ids=eos_ids)
    spm_path = folder / "tokenizer.model"
    if spm_path.is_file():
        config_path = folder / "tokenizer_config.json"
        tokenizer_config = _read_json(config_path) if config_path.is_file() else {}
        jinja_path = folder / "chat_template.jinja"
        return tokenizer_from_sentencepiece(
            spm_path,
            tokenizer_config,
            chat_template=jinja_path.read_text() if jinja_path.is_file() else None,
            bos_id=bos_id,
            eos_ids=eos_ids,
        )
    raise DraftlmError(f"{folder} has no tokenizer.json or tokenizer.model")


def read_hf_folder(folder: str | Path, dtype: torch.dtype | None = None) -> HFCheckpoint:
    """Config, weights (draftlm names, optionally cast to `dtype`) and tokenizer of a folder."""
    config = read_hf_config(folder)
    tensors = read_hf_tensors(folder, config, dtype)
    return HFCheckpoint(config=config, tensors=tensors, tokenizer=read_hf_tokenizer(folder, config))


# ---- writing ----------------------------------------------------------------------------
def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def _element_size(tensor: Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and tensor.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return tensor.element_size()


def _plan_shards(
    tensors: Mapping[str, Tensor], dtype: torch.dtype | None, max_shard_bytes: int
) -> list[list[str]]:
    """Consecutive groups of names, each under `max_shard_bytes` unless one tensor alone is."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * _element_size(tensor, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _cpu_copy(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    tensor = tensor.detach()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype=dtype)
    tensor = tensor.to("cpu").contiguous()
    # safetensors refuses tensors that share storage (views, tied weights): give each its own.
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _write_weights(
    folder: Path, tensors: Mapping[str, Tensor], dtype: torch.dtype | None, max_shard_bytes: int
) -> None:
    shards = _plan_shards(tensors, dtype, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        cpu = {_hf_name(n): _cpu_copy(tensors[n], dtype) for n in shards[0]}
        save_file(cpu, folder / SAFETENSORS_FILE, metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, names in enumerate(shards, start=1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # One shard of CPU copies at a time: a GPU model is never copied to host whole.
        cpu = {_hf_name(n): _cpu_copy(tensors[n], dtype) for n in names}
        save_file(cpu, folder / shard, metadata=metadata)
        total_size += sum(t.numel() * t.element_size() for t in cpu.values())
        weight_map.update(dict.fromkeys(cpu, shard))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _checked_tensors(
    config: ModelConfig, tensors: Mapping[str, Tensor] | Transformer
) -> dict[str, Tensor]:
    """The tensors to write, in model order, with a tied head dropped; shapes match `config`."""
    if isinstance(tensors, Transformer):
        tensors = tensors.state_dict()
    expected = _expected_shapes(config)
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    unknown = [n for n in tensors if n not in expected and n != "lm_head.weight"]
    if unknown:
        raise DraftlmError(f"cannot save tensor {unknown[0]!r}: not a parameter of {config.name}")
    out: dict[str, Tensor] = {}
    for name, shape in expected.items():
        if name not in tensors:
            raise DraftlmError(f"cannot save {config.name}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise DraftlmError(
                f"cannot save {config.name}: tensor {name!r} has shape "
                f"{tuple(tensors[name].shape)}, the config implies {tuple(shape)}"
            )
        out[name] = tensors[name]
    return out


def _generation_config(config: ModelConfig) -> dict[str, Any]:
    eos: int | list[int] | None = list(config.eos_ids) if len(config.eos_ids) != 1 else (
        config.eos_ids[0]
    )
    return {"bos_token_id": config.bos_id, "eos_token_id": eos or None}


def _with_bos_post_processor(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer`, with a tokenizer.json post-processor that adds BOS when draftlm adds one.

    draftlm's `Tokenizer.encode` adds BOS itself, but transformers' generic fast tokenizer
    only runs the tokenizer.json post-processor: without this, HF would encode without BOS."""
    if not tokenizer.add_bos or tokenizer.bos_id is None:
        return tokenizer
    probe = tokenizer.backend.encode("a", add_special_tokens=True).ids
    if probe and probe[0] == tokenizer.bos_id:
        return tokenizer
    bos = tokenizer.id_to_token(tokenizer.bos_id)
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tokenizer.bos_id)],
    )
    existing = backend.post_processor
    backend.post_processor = (
        template if existing is None else processors.Sequence([existing, template])
    )
    return Tokenizer(
        backend, bos_id=tokenizer.bos_id, eos_ids=tokenizer.eos_ids, add_bos=True,
        chat_template=tokenizer.chat_template, pad_id=tokenizer.pad_id,
    )


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished `tmp` onto `folder`; an old folder is removed only afterwards."""
    if not folder.exists():
        tmp.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old)


def save_hf_folder(
    folder: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, Tensor] | Transformer,
    tokenizer: Tokenizer | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a HF folder that transformers loads as this model; returns its path.

    `tensors` may be a model or its state dict, on any device and dtype; `dtype` casts the
    floating-point weights as they are written (config.json's torch_dtype says which). The
    folder appears complete or not at all: an existing folder is replaced only after the
    new one is fully written, and only if it is a checkpoint folder (has config.json) or
    empty, so a mistyped path cannot wipe unrelated files."""
    folder = Path(folder).resolve()  # the real location: renames then never touch a symlink
    if getattr(tensors, "quantization", "none") != "none":
        raise DraftlmError("cannot save a quantized model: save the unquantized one and pass "
                           "--quantize when loading it")
    if max_shard_bytes <= 0:
        raise DraftlmError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if folder.exists() and not folder.is_dir():
        raise DraftlmError(f"cannot save to {folder}: it exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise DraftlmError(
            f"refusing to replace {folder}: it is not empty and holds no config.json; "
            "choose a new folder"
        )
    to_write = _checked_tensors(config, tensors)
    written_dtype = dtype or next(
        (t.dtype for t in to_write.values() if t.is_floating_point()), torch.float32
    )
    if written_dtype not in _DTYPE_NAMES:
        raise DraftlmError(f"cannot save weights as {written_dtype}: use float32/16 or bfloat16")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        hf_config = config.to_hf()
        hf_config["torch_dtype"] = _DTYPE_NAMES[written_dtype]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(_generation_config(config), indent=2) + "\n"
        )
        _write_weights(tmp, to_write, dtype, max_shard_bytes)
        if tokenizer is not None:
            _with_bos_post_processor(tokenizer).save(tmp)
        _fsync_tree(tmp)
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

