"""`TrainConfig`: the fields a training recipe (YAML) sets, one to one.

`resolve_config` layers a recipe, `--set FIELD=VALUE` overrides and explicit CLI flags,
in that order, and rejects unknown fields so that a typo in a recipe fails loudly
instead of silently training with a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError


@dataclass
class TrainConfig:
    """Everything a run needs; a recipe YAML sets these fields by name."""

    model: str = "tiny"  # preset for pretraining (ignored when `init` is set)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields
    init: str | None = None  # finetune: registry name, HF folder, .gguf or training checkpoint
    data: list[dict[str, Any]] = field(default_factory=list)  # [{path, weight}]
    val_data: list[str] | None = None  # folders whose val split is evaluated (default: data)
    out_dir: str = "runs/train"
    seq_len: int = 2048
    micro_batch_size: int = 16
    global_batch_tokens: int = 16 * 2048  # per optimizer step, all ranks together
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    init_std: float = 0.02
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where fast) | bf16 | fp32
    strategy: str = "auto"  # auto | none | ddp | fsdp
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    cpu_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    log_interval: int = 10
    eval_interval: int = 200
    eval_sequences: int = 64
    save_interval: int = 1000
    keep_last: int = 2
    peak_flops: float | None = None  # per device; None: see training.metrics.default_peak_flops
    tensorboard: bool = True
    export: bool = True  # write a HF folder `out_dir/final` at the end
    # ---- a draft distilled from its target (`draftlm train-draft`) ----
    teacher: str | None = None  # teacher folder (`draftlm teacher`): windows + target top-k
    distill_loss: str = "fkl"  # fkl | tvd | ce (ce: the data's next tokens, the baseline)
    init_layers: list[int] | None = None  # keep only these blocks of `init` (pruning)
    head_vocab_size: int | None = None  # truncated head over the most frequent tokens
    freeze_embeddings: bool = False  # keep the input embedding as `init` has it
    # ---- a feature-level draft head (EAGLE): `draft_kind: feature-head` ----
    draft_kind: str = "model"  # model (a standalone draft) | feature-head (reads the target)
    feature_intermediate_size: int | None = None  # the head's MLP width (None: the target's)
    # Weight of the next-feature regression beside the distillation loss. EAGLE weighs them
    # 10:1 on Llama's features; Qwen2's final norm makes its features ~10x larger, so 1:1.
    feature_regression: float = 1.0
    feature_noise: float = 0.2  # uniform noise of this width on the input features
    val_teacher: str | None = None  # held-out teacher folder (with features) for validation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DraftlmError(f"unknown recipe fields: {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
        data = dict(data)
        for f in fields(cls):  # YAML reads `6e-4` (no dot) as a string
            if f.type.startswith("float") and isinstance(data.get(f.name), str | int):
                try:
                    data[f.name] = float(data[f.name])
                except ValueError as err:
                    raise DraftlmError(f"recipe field {f.name} must be a number, got "
                                       f"{data[f.name]!r}") from err
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        data["data"] = [{"path": d, "weight": 1.0} if isinstance(d, str) else d
                        for d in data.get("data", [])]
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise DraftlmError(f"cannot read recipe {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise DraftlmError(f"recipe {path} must be a mapping of TrainConfig fields")
        return cls.from_dict(loaded)

    def identity(self, model_config: ModelConfig) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return {"model_config": model_config.to_dict(), "seq_len": self.seq_len,
                "global_batch_tokens": self.global_batch_tokens, "data": self.data,
                "seed": self.seed, "teacher": self.teacher, "distill_loss": self.distill_loss,
                **({"draft_kind": self.draft_kind} if self.draft_kind != "model" else {})}


def resolve_config(
    config: str | None, init: str | None = None, set_fields: list[str] | tuple[str, ...] = (),
    **flags: Any,
) -> TrainConfig:
    """The recipe, then `--set field=value` (YAML-parsed), then the explicit flags."""
    cfg = TrainConfig.from_yaml(config) if config else TrainConfig()
    values = asdict(cfg)
    for item in set_fields:
        key, sep, text = item.partition("=")
        if not sep:
            raise DraftlmError(f"--set expects FIELD=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(text)
    values.update({k: v for k, v in flags.items() if v is not None})
    if flags.get("data"):
        values["data"] = list(flags["data"])
    if init is not None:
        values["init"] = init
    return TrainConfig.from_dict(values)
