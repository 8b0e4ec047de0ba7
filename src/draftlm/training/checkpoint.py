"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `step-000123/` with
- `model.safetensors`: the full (unsharded) model state, draftlm parameter names;
- `optimizer.safetensors`: AdamW's per-parameter tensors, keyed `<param>/<name>`;
- `state.json`: step, resolved train and model configs, data-loader position, RNG states,
  optimizer hyper-parameters, and the size and SHA-256 of both tensor files.
No pickle anywhere. The folder is written under a temporary name, synced and renamed
into place, and `state.json` is written last; a process killed at any point therefore
leaves either no `step-*` folder or a complete one, and a file damaged later is caught by
its checksum. Full state dicts are gathered through `torch.distributed.checkpoint`'s
state-dict helpers, which handle plain, DDP and FSDP2 models alike.

`initial_model` is the model a run starts from: a fresh preset, a training checkpoint's
weights, or any model `draftlm.load` reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats.gguf_export import save_gguf
from draftlm.formats.hf import save_hf_folder
from draftlm.load import load
from draftlm.model import Transformer
from draftlm.tokenizer import Tokenizer
from draftlm.training.config import TrainConfig
from draftlm.training.distributed import barrier

STEP_PATTERN = re.compile(r"^step-(\d{6,})$")
STALE_PATTERN = re.compile(r"^\.step-\d+\.(tmp|trash)-[0-9a-f]+$")
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in states.items()}


def set_rng_state(states: dict[str, str]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(states["cpu"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(states["cuda"]))


def model_state(model: nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """The full model state on CPU (collective under FSDP: every rank must call it)."""
    state = get_model_state_dict(model, options=_FULL)
    if tied:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    return {k: v.contiguous() for k, v in state.items()}


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], tied: bool, is_main: bool, keep_last: int,
) -> Path | None:
    """Write `root/step-NNNNNN` (rank 0 writes; every rank gathers); keep the last N."""
    tensors = model_state(model, tied)
    optim = get_optimizer_state_dict(model, optimizer, options=_FULL)
    final = root / f"step-{step:06d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".step-{step:06d}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / MODEL_FILE))
            flat = {f"{name}/{key}": value.contiguous()
                    for name, entry in optim["state"].items() for key, value in entry.items()}
            save_file(flat, str(tmp / OPTIMIZER_FILE))
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                     for name in (MODEL_FILE, OPTIMIZER_FILE)}
            full = {**state, "step": step, "rng": rng_state(), "files": files,
                    "param_groups": optim["param_groups"]}
            (tmp / STATE_FILE).write_text(json.dumps(full, indent=1) + "\n")
            for path in [*tmp.iterdir(), tmp]:
                _fsync(path)
            if final.exists():
                _discard(final)
            tmp.rename(final)
            _fsync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            _discard(old)
        remove_stale(root)
    barrier()
    return final if is_main else None


def remove_stale(root: Path) -> list[Path]:
    """Delete what interrupted saves and deletions left (`.step-*.tmp-*`, `.step-*.trash-*`
    folders): a save killed midway is never resumed from, so its folder is only waste.
    Run by rank 0 at start and after every save; returns what it removed."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and STALE_PATTERN.match(p.name)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _discard(folder: Path) -> None:
    """Rename first, then delete: a kill mid-delete leaves a hidden folder, never a
    half-deleted `step-*` one."""
    trash = folder.with_name(f".{folder.name}.trash-{uuid.uuid4().hex[:8]}")
    folder.rename(trash)
    shutil.rmtree(trash)


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted saves ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    """`state.json`, after checking that both tensor files are complete and unaltered."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
        files = state["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DraftlmError(f"{folder} is not a complete training checkpoint ({err}); "
                           "resume from an earlier one or start again") from err
    for name, expected in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != expected["bytes"]:
            raise DraftlmError(f"{file} is missing or truncated; resume from another checkpoint")
        if _sha256(file) != expected["sha256"]:
            raise DraftlmError(f"{file} does not match its checksum; it was damaged after "
                               "saving, resume from another checkpoint")
    return state


def load_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    read_checkpoint_state(folder)
    try:
        return load_file(str(folder / MODEL_FILE))
    except SafetensorError as err:
        raise DraftlmError(f"cannot read {folder / MODEL_FILE}: {err}") from err


def check_compatible(state: dict[str, Any], identity: dict[str, Any], folder: Path) -> None:
    """A checkpoint continues only the run that made it: the same model and data setup."""
    saved = state.get("identity", {})
    changed = sorted(k for k in identity.keys() | saved.keys() if saved.get(k) != identity.get(k))
    if changed:
        raise DraftlmError(f"{folder} was written by a run with other settings "
                           f"({', '.join(changed)}); use its recipe or a new out_dir")


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tied: bool,
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; returns `state.json`."""
    state = read_checkpoint_state(folder)
    check_compatible(state, identity, folder)
    try:
        tensors = load_file(str(folder / MODEL_FILE))
        flat = load_file(str(folder / OPTIMIZER_FILE))
    except SafetensorError as err:
        raise DraftlmError(f"cannot read checkpoint {folder}: {err}") from err
    if tied:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, field = key.rpartition("/")
        optim_state.setdefault(name, {})[field] = value
    set_optimizer_state_dict(
        model, optimizer, {"state": optim_state, "param_groups": state["param_groups"]},
        options=StateDictOptions(full_state_dict=True),
    )
    set_rng_state(state["rng"])
    return state


def export_checkpoint(checkpoint: str | Path, output: str | Path,
                      tokenizer_folder: str | Path | None = None) -> Path:
    """Write a training checkpoint as a HF folder (draftlm.load and transformers load it).

    The tokenizer comes from `tokenizer_folder`, else from the run's first dataset (the
    copy `draftlm prepare` keeps in `<data>/tokenizer`)."""
    folder = Path(checkpoint).expanduser()
    state = read_checkpoint_state(folder)
    config = ModelConfig.from_dict(state["identity"]["model_config"])
    if tokenizer_folder is None:
        data = [d["path"] for d in state["identity"].get("data") or []]
        teacher = state["identity"].get("teacher")
        if not data and teacher:  # a distilled draft: the teacher's source data
            manifest = json.loads((Path(teacher) / "manifest.json").read_text())
            data = [manifest["spec"]["data"]]
        if not data:
            raise DraftlmError(f"{folder} names no dataset to take the tokenizer from; "
                               "pass --tokenizer FOLDER")
        tokenizer_folder = Path(data[0]) / "tokenizer"
    tokenizer = Tokenizer.from_folder(tokenizer_folder)
    return save_hf_folder(output, config, load_model_tensors(folder), tokenizer)


def export_gguf(source: str | Path, output: str | Path, tokenizer_gguf: str | Path,
                tensor_type: str = "f16") -> Path:
    """Write a training checkpoint, or any model `draftlm.load` reads, as a GGUF file."""
    folder = Path(source).expanduser()
    if (folder / "state.json").is_file():
        state = read_checkpoint_state(folder)
        config = ModelConfig.from_dict(state["identity"]["model_config"])
        tensors = load_model_tensors(folder)
    else:
        lm = load(str(source), dtype="float32")
        config, tensors = lm.config, lm.model.state_dict()
    return save_gguf(output, config, tensors, tokenizer_gguf, tensor_type)


def initial_model(cfg: TrainConfig, data_tokenizer: Tokenizer) -> tuple[Transformer, Tokenizer]:
    """The model to start from: `init` (finetune) or a fresh preset (pretrain)."""
    if cfg.init is None:
        overrides = {"bos_id": data_tokenizer.bos_id, "eos_ids": data_tokenizer.eos_ids,
                     **cfg.model_overrides}  # a recipe's own ids win
        overrides["eos_ids"] = tuple(overrides["eos_ids"])
        config = ModelConfig.from_name(cfg.model).with_(**overrides)
        model = Transformer(config)
        model.init_weights(cfg.init_std, torch.Generator().manual_seed(cfg.seed))
        return model, data_tokenizer
    init = Path(cfg.init).expanduser()
    if (init / "state.json").is_file() and (init / "model.safetensors").is_file():
        state = read_checkpoint_state(init)
        config = ModelConfig.from_dict(state["identity"]["model_config"])
        model = Transformer(config)
        tensors = load_model_tensors(init)
        if config.tie_embeddings:
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        model.load_state_dict(tensors)
        return model, data_tokenizer

    lm = load(cfg.init, dtype="float32", device="cpu")
    # The same ids for the same tokens; post-processors (BOS added on export) may differ.
    if lm.tokenizer.backend.get_vocab() != data_tokenizer.backend.get_vocab():
        raise DraftlmError(f"the data was prepared with another tokenizer than {cfg.init}'s; "
                           f"run `draftlm prepare --tokenizer {cfg.init}`")
    return lm.model.requires_grad_(True), lm.tokenizer
