"""Presets carry the published numbers: rebuild each on the meta device and count."""

import pytest
import torch

from draftlm.config import PRESETS, ModelConfig, RopeScaling
from draftlm.errors import DraftlmError
from draftlm.model import Transformer

# Parameter counts as published on each model card / config (tied heads counted once).
PUBLISHED = {
    "amd-llama-135m": 134_105_856,
    "amd-llama-135m-code": 134_105_856,
    "codellama-7b": 6_738_546_688,
    "tinyllama-1.1b": 1_100_048_384,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "qwen2.5-coder-0.5b": 494_032_768,
    "qwen2.5-coder-1.5b": 1_543_714_304,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(name))
    assert model.num_parameters() == PUBLISHED[name]


def test_every_preset_is_checked() -> None:
    assert set(PRESETS) - set(PUBLISHED) == {"tiny"}


def test_amd_preset_matches_the_card() -> None:
    cfg = ModelConfig.from_name("amd-llama-135m")
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.intermediate_size) == (12, 768, 12, 2048)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings) == (32000, 2048, False)
    assert cfg.head_dim == 64


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(DraftlmError, match="amd-llama-135m"):
        ModelConfig.from_name("gpt-5")


def test_bad_head_counts_are_rejected() -> None:
    with pytest.raises(DraftlmError, match="n_kv_heads"):
        ModelConfig(n_heads=12, n_kv_heads=5)


@pytest.mark.parametrize("name", ["amd-llama-135m", "qwen2.5-coder-0.5b", "smollm2-135m"])
def test_hf_config_round_trip(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    assert ModelConfig.from_hf(cfg.to_hf(), name=name) == cfg


def test_hf_config_with_llama3_scaling_round_trips() -> None:
    cfg = ModelConfig.from_name("tiny").with_(
        rope_scaling=RopeScaling(kind="llama3", factor=8.0, original_max_seq_len=128)
    )
    assert ModelConfig.from_hf(cfg.to_hf(), name="tiny") == cfg


def test_dict_round_trip() -> None:
    cfg = ModelConfig.from_name("tiny").with_(rope_scaling=RopeScaling(factor=2.0))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_unsupported_hf_model_type() -> None:
    with pytest.raises(DraftlmError, match="gpt_neox"):
        ModelConfig.from_hf({"model_type": "gpt_neox"})


# ---- damaged or hostile configs: one line, before anything is built -----------------------
HF_LLAMA = {"model_type": "llama", "vocab_size": 256, "num_hidden_layers": 2, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.mark.parametrize(("change", "message"), [
    ({"num_attention_heads": 0}, "n_heads=0 is outside"),
    ({"hidden_size": "abc"}, "dim must be an integer"),
    ({"num_hidden_layers": "2"}, "n_layers must be an integer"),
    ({"num_hidden_layers": 100_000}, "n_layers=100000 is outside"),
    ({"rope_scaling": "linear"}, "rope_scaling must be a mapping"),
    ({"vocab_size": -5}, "vocab_size=-5 is outside"),
    ({"max_position_embeddings": 10**12}, "max_seq_len=1000000000000 is outside"),
    ({"rope_theta": "fast"}, "wrong type"),
    ({"rms_norm_eps": 0}, "norm_eps must be a positive number"),
    ({"num_key_value_heads": True}, "n_kv_heads must be an integer"),
    ({"eos_token_id": "x"}, "token ids must be integers"),
])
def test_bad_hf_values_are_one_line_errors(change, message) -> None:
    with pytest.raises(DraftlmError, match=message):
        ModelConfig.from_hf({**HF_LLAMA, **change})


def test_missing_hf_fields_and_non_objects_are_named() -> None:
    broken = dict(HF_LLAMA)
    del broken["hidden_size"]
    with pytest.raises(DraftlmError, match="lacks hidden_size"):
        ModelConfig.from_hf(broken)
    with pytest.raises(DraftlmError, match="JSON object"):
        ModelConfig.from_hf([1, 2])  # type: ignore[arg-type]
    assert ModelConfig.from_hf(HF_LLAMA).n_layers == 2


def test_every_preset_passes_its_own_checks() -> None:
    for name in PRESETS:
        assert ModelConfig.from_dict(ModelConfig.from_name(name).to_dict()) == PRESETS[name]
