"""The model against HF transformers' reference implementation, and the KV cache."""

import pytest
import torch

from draftlm.config import ModelConfig, RopeScaling
from draftlm.model import Transformer

transformers = pytest.importorskip("transformers")


def tiny(**changes) -> Transformer:
    model = Transformer(ModelConfig.from_name("tiny").with_(**changes))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


def hf_twin(model: Transformer):
    """The same weights in HF transformers' Llama / Qwen2."""
    hf_config = model.config.to_hf()
    if model.config.qkv_bias:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_config))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config))
    state = {
        (k if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()
    }
    hf.load_state_dict(state, strict=not model.config.tie_embeddings)
    return hf.eval()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"qkv_bias": True, "tie_embeddings": True},
        {"rope_scaling": RopeScaling(kind="linear", factor=4.0)},
        {"rope_scaling": RopeScaling(kind="llama3", factor=8.0, original_max_seq_len=64)},
        {"n_kv_heads": 4},
    ],
    ids=["llama", "qwen2", "linear-rope", "llama3-rope", "mha"],
)
def test_logits_match_hf_transformers(changes) -> None:
    model = tiny(**changes)
    if changes.get("qkv_bias"):  # biases start at zero: make them matter
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf_twin(model)(ids).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_tied_head_shares_the_embedding() -> None:
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_cached_decoding_equals_full_pass() -> None:
    model = tiny()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(batch_size=2, max_seq_len=64)
        pieces = [model(ids[:, :20], start_pos=0), model(ids[:, 20:27], start_pos=20)]
        pieces += [model(ids[:, t : t + 1], start_pos=t) for t in range(27, 48)]
    assert model.cache_len == 48
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5


def test_rollback_then_new_tokens_equal_a_fresh_pass() -> None:
    model = tiny()
    gen = torch.Generator().manual_seed(3)
    prefix, wrong, right = (torch.randint(0, 256, (1, n), generator=gen) for n in (10, 6, 6))
    with torch.no_grad():
        model.setup_cache(1, 32)
        model(prefix, start_pos=0)
        model(wrong, start_pos=10)  # a rejected draft
        model.rollback(12)  # keep two of its tokens
        kept = torch.cat([prefix, wrong[:, :2], right], dim=1)
        out = model(right, start_pos=12)
        reference = model.__class__.forward(model, kept)  # no start_pos: no cache
    assert model.cache_len == 18
    assert (out - reference[:, 12:]).abs().max() < 1e-5


def test_rollback_rejects_lengths_beyond_the_cache() -> None:
    model = tiny()
    model.setup_cache(1, 16)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=0)
    with pytest.raises(ValueError):
        model.rollback(5)
    with pytest.raises(ValueError, match="skips"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=6)
    with pytest.raises(ValueError, match="exceed the cache"):
        model(torch.zeros(1, 13, dtype=torch.long), start_pos=4)


def test_positions_pass_equals_the_cached_pass() -> None:
    """The static-shape pass (positions as a tensor, attention over the whole cache under
    a mask) gives the logits of the cached pass at the same positions."""
    model = tiny()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model.setup_cache(1, 32)
        model(ids[:, :12], start_pos=0)
        cached = model(ids[:, 12:], start_pos=12)
        model.rollback(12)
        static = model(ids[:, 12:], positions=torch.arange(12, 16))
    torch.testing.assert_close(static, cached, atol=1e-5, rtol=1e-5)


def test_num_logits_returns_the_last_positions() -> None:
    model = tiny()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(ids, num_logits=3), model(ids)[:, -3:], atol=1e-6)


def test_bfloat16_stays_close_to_float32() -> None:
    model = tiny()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(torch.bfloat16)(ids).float()
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (low - ref).abs().max() < 0.1


def test_training_pass_has_gradients() -> None:
    model = tiny().train()
    ids = torch.randint(0, 256, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = tiny()
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.cuda()(ids.cuda()).cpu()
    assert (cpu - gpu).abs().max() < 1e-3


def test_rope_tables_cover_only_the_positions_reached() -> None:
    """A config claiming a context of 16M positions (2 x 16 GB of float32 tables if made
    whole) allocates tables for the positions its passes reach, and computes what a model
    with a short context computes."""
    torch.manual_seed(0)
    short = Transformer(ModelConfig.from_name("tiny"))
    huge = Transformer(short.config.with_(max_seq_len=1 << 24))
    huge.load_state_dict(short.state_dict())
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(huge(ids), short(ids), rtol=0, atol=0)
        assert huge._rope[0].shape[0] == 20
        huge.setup_cache(1, 300)
        huge(ids, start_pos=0)
        assert huge._rope[0].shape[0] == 20
        huge(ids[:, :5], start_pos=20)
        assert huge._rope[0].shape[0] == 40  # grown by doubling as cached passes reach on
        positions = torch.arange(3)
        huge(ids[:, :3], positions=positions)  # a static-shape pass spans the whole cache
        assert huge._rope[0].shape[0] == 300
    assert short.rope_tables(torch.device("cpu"))[0].shape[0] == short.config.max_seq_len
