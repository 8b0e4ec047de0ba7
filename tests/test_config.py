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
