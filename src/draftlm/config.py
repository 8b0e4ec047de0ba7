"""Model configuration: one dataclass for every Llama-like family, with named presets.

The presets carry the published numbers of each model so that a test can rebuild the
parameter count on the meta device and catch a typo before it costs a training run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from draftlm.errors import DraftlmError


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `linear` divides positions by `factor` (CodeLlama-style
    long-context fine-tunes); `llama3` rescales low frequencies only (Llama 3.1)."""

    kind: str = "linear"  # "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


# (field, smallest, largest): bounds that no real checkpoint comes near, so that a value
# past them is a damaged file rather than a model.
_INT_FIELDS = (
    ("vocab_size", 1, 1 << 24),
    ("n_layers", 1, 1024),
    ("dim", 1, 1 << 16),
    ("n_heads", 1, 1024),
    ("n_kv_heads", 1, 1024),
    ("intermediate_size", 1, 1 << 18),
    ("max_seq_len", 1, 1 << 24),
)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only Llama-family transformer."""

    name: str = "custom"
    vocab_size: int = 32000
    n_layers: int = 12
    dim: int = 768
    n_heads: int = 12
    n_kv_heads: int = 12
    intermediate_size: int = 2048
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v only
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    # Explicit head size: some families (not the presets) decouple it from dim / n_heads.
    head_dim_override: int | None = field(default=None, repr=False)
    # A draft's output head may cover only this many of the vocabulary's tokens (FR-Spec:
    # the frequent ones); `Transformer.head_token_ids` says which. None: all of them.
    head_vocab_size: int | None = None

    def __post_init__(self) -> None:
        # Checked before anything is built: a damaged or hostile config.json must fail here
        # in one line, not as a ZeroDivisionError or after allocating 100,000 layers.
        for name, low, high in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DraftlmError(f"config {self.name!r}: {name} must be an integer, "
                                   f"got {value!r}")
            if not low <= value <= high:
                raise DraftlmError(f"config {self.name!r}: {name}={value} is outside "
                                   f"[{low}, {high}]")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 < value < float("inf"):
                raise DraftlmError(f"config {self.name!r}: {name} must be a positive number, "
                                   f"got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise DraftlmError(f"config {self.name!r}: rope_scaling must be a mapping, got "
                               f"{self.rope_scaling!r}")
        if self.head_dim_override is not None and (
                isinstance(self.head_dim_override, bool)
                or not isinstance(self.head_dim_override, int)
                or not 1 <= self.head_dim_override <= 4096):
            raise DraftlmError(f"config {self.name!r}: head_dim must be an integer in "
                               f"[1, 4096], got {self.head_dim_override!r}")
        for token in (*self.eos_ids, *(() if self.bos_id is None else (self.bos_id,))):
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise DraftlmError(f"config {self.name!r}: token ids must be integers >= 0, "
                                   f"got {token!r}")
        if self.head_vocab_size is not None:
            if isinstance(self.head_vocab_size, bool) or not isinstance(self.head_vocab_size, int) \
                    or not 1 <= self.head_vocab_size <= self.vocab_size:
                raise DraftlmError(f"config {self.name!r}: head_vocab_size must be an integer in "
                                   f"[1, vocab_size={self.vocab_size}], got "
                                   f"{self.head_vocab_size!r}")
            if self.tie_embeddings:
                raise DraftlmError(f"config {self.name!r}: a truncated head (head_vocab_size) "
                                   "cannot be tied to the embeddings")
        if self.n_heads % self.n_kv_heads:
            raise DraftlmError(
                f"config {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise DraftlmError(
                f"config {self.name!r}: dim={self.dim} is not divisible by n_heads={self.n_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        """The named preset; an unknown name lists the known ones."""
        if name not in PRESETS:
            raise DraftlmError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_ids"] = list(self.eos_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DraftlmError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        data = dict(data)
        if isinstance(data.get("rope_scaling"), dict):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if "eos_ids" in data:
            data["eos_ids"] = tuple(data["eos_ids"])
        return cls(**data)

    # ---- HF transformers' config.json -------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        """Read a HF `config.json` of a LlamaForCausalLM / Qwen2ForCausalLM checkpoint."""
        if not isinstance(hf, dict):
            raise DraftlmError("config.json must hold a JSON object")
        try:
            return cls._from_hf(hf, name)
        except (TypeError, ValueError, AttributeError) as err:
            raise DraftlmError(f"config.json has a value of the wrong type ({err})") from err

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], name: str) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise DraftlmError(
                f"unsupported architecture model_type={model_type!r}: draftlm loads llama, "
                "mistral and qwen2 checkpoints"
            )
        missing = [k for k in _HF_REQUIRED if k not in hf]
        if missing:
            raise DraftlmError(f"config.json lacks {', '.join(missing)}")
        scaling = None
        rs = hf.get("rope_scaling") or None
        if rs is not None and not isinstance(rs, dict):
            raise DraftlmError(f"config.json: rope_scaling must be a mapping, got {rs!r}")
        if rs:
            kind = rs.get("rope_type", rs.get("type", "linear"))
            if kind not in ("linear", "llama3", "default"):
                raise DraftlmError(f"unsupported rope_scaling type {kind!r}")
            if kind != "default":
                scaling = RopeScaling(
                    kind=kind,
                    factor=float(rs.get("factor", 1.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_seq_len=int(rs.get("original_max_position_embeddings", 8192)),
                )
        eos = hf.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        return cls(
            name=name,
            vocab_size=hf["vocab_size"],
            n_layers=hf["num_hidden_layers"],
            dim=hf["hidden_size"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            intermediate_size=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            bos_id=hf.get("bos_token_id"),
            eos_ids=eos_ids,
            head_dim_override=head_dim if head_dim and head_dim != hf["hidden_size"] // n_heads
            else None,
            head_vocab_size=hf.get("draftlm_head_vocab_size"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A HF `config.json` that transformers loads as the same model."""
        qwen = self.qkv_bias
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": list(self.eos_ids) if len(self.eos_ids) != 1 else self.eos_ids[0],
            "torch_dtype": "float32",
        }
        if self.head_vocab_size is not None:  # draftlm's own: other loaders refuse the head
            hf["draftlm_head_vocab_size"] = self.head_vocab_size
        if not qwen:
            hf["attention_bias"] = False
            hf["mlp_bias"] = False
        else:
            hf["use_sliding_window"] = False
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
            if rs.kind == "llama3":
                hf["rope_scaling"].update(
                    low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_seq_len,
                )
        return hf


_HF_REQUIRED = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
                "intermediate_size")


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # AMD's draft model: 12 x 768, MHA, untied head, Llama-2 tokenizer (134.1M params).
    "amd-llama-135m": _preset(name="amd-llama-135m"),
    "amd-llama-135m-code": _preset(name="amd-llama-135m-code"),
    "codellama-7b": _preset(
        name="codellama-7b", vocab_size=32016, n_layers=32, dim=4096, n_heads=32, n_kv_heads=32,
        intermediate_size=11008, max_seq_len=16384, rope_theta=1_000_000.0,
    ),
    "tinyllama-1.1b": _preset(
        name="tinyllama-1.1b", n_layers=22, dim=2048, n_heads=32, n_kv_heads=4,
        intermediate_size=5632,
    ),
    "smollm2-135m": _preset(
        name="smollm2-135m", vocab_size=49152, n_layers=30, dim=576, n_heads=9, n_kv_heads=3,
        intermediate_size=1536, max_seq_len=8192, rope_theta=100_000.0, tie_embeddings=True,
        bos_id=1, eos_ids=(2,),
    ),
    "smollm2-360m": _preset(
        name="smollm2-360m", vocab_size=49152, n_layers=32, dim=960, n_heads=15, n_kv_heads=5,
        intermediate_size=2560, max_seq_len=8192, rope_theta=100_000.0, tie_embeddings=True,
        bos_id=1, eos_ids=(2,),
    ),
    "qwen2.5-coder-0.5b": _preset(
        name="qwen2.5-coder-0.5b", vocab_size=151936, n_layers=24, dim=896, n_heads=14,
        n_kv_heads=2, intermediate_size=4864, max_seq_len=32768, rope_theta=1_000_000.0,
        norm_eps=1e-6, tie_embeddings=True, qkv_bias=True, bos_id=None,
        eos_ids=(151645, 151643),
    ),
    "qwen2.5-coder-1.5b": _preset(
        name="qwen2.5-coder-1.5b", vocab_size=151936, n_layers=28, dim=1536, n_heads=12,
        n_kv_heads=2, intermediate_size=8960, max_seq_len=32768, rope_theta=1_000_000.0,
        norm_eps=1e-6, tie_embeddings=True, qkv_bias=True, bos_id=None,
        eos_ids=(151645, 151643),
    ),
    # For tests: small enough to build and run in milliseconds.
    "tiny": _preset(
        name="tiny", vocab_size=256, n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
        intermediate_size=128, max_seq_len=256, bos_id=None, eos_ids=(0,),
    ),
}
