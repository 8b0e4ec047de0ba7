"""The model against HF transformers' reference implementation, and the KV cache."""

import pytest
import torch
from helpers import make_tiny_lm, needs_cpp_compiler

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


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_decode_step_matches_eager_and_compiles_once() -> None:
    """One graph, compiled by compile_decode_step, serves every position and cache size;
    logits equal eager ones to float rounding."""
    import torch._dynamo

    model = make_tiny_lm(seed=3).model
    ids = torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    eager_logits, compiled_logits = [], []
    with torch.inference_mode():
        model.setup_cache(1, 32)
        model(ids[:, :4], start_pos=0)
        for pos in range(4, 9):
            eager_logits.append(model(ids[:, pos : pos + 1], start_pos=pos))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.compile_decode_step()
        # Compiled on the spot (a scratch cache), not by the first real step.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        model.setup_cache(1, 32)
        model(ids[:, :4], start_pos=0)  # the prompt pass stays eager
        for pos in range(4, 9):
            compiled_logits.append(model(ids[:, pos : pos + 1], start_pos=pos))
            assert model.cache_len == pos + 1
        model.rollback(6)  # a step after a rollback overwrites the cache as eager does
        again = model(ids[:, 6:7], start_pos=6)
        model.setup_cache(1, 48)  # another request's cache size: the same graph
        model(ids[:, :4], start_pos=0)
        other_size = model(ids[:, 4:5], start_pos=4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for eager, compiled in zip(eager_logits, compiled_logits, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, eager_logits[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(other_size, eager_logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_verify_pads_to_one_graph_and_matches_eager() -> None:
    """Passes of 2..5 tokens run one padded graph of 5; real tokens' logits equal eager
    ones to float rounding, the padding leaves nothing behind, the end of the cache
    falls back to eager."""
    import torch._dynamo

    model = make_tiny_lm(seed=3).model
    ids = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(0))

    def passes() -> list[torch.Tensor]:
        out = []
        model.setup_cache(1, 20)
        model(ids[:, :6], start_pos=0)
        pos = 6
        for t in (2, 5, 3, 4):
            out.append(model(ids[:, pos : pos + t], start_pos=pos))
            assert model.cache_len == pos + t
            pos += t - 1
            model.rollback(pos)  # as after a rejection: the last token is fed again
        out.append(model(ids[:, 16:20], start_pos=16))  # no room for padding: eager
        return out

    with torch.inference_mode():
        eager = passes()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.compile_verify(5)
        compiled = passes()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for e, c in zip(eager, compiled, strict=True):
        assert e.shape == c.shape
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)


def _static_twin_passes(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """Decode steps, verify passes of 2..5 tokens with rollbacks, and a step after a
    rollback, as AR and speculative decoding run them."""
    out = []
    model.setup_cache(1, 40)
    model(ids[:, :6], start_pos=0)  # the prompt pass stays eager
    for pos in range(6, 9):
        out.append(model(ids[:, pos : pos + 1], start_pos=pos))
    pos = 9
    for t in (2, 5, 3):
        out.append(model(ids[:, pos : pos + t], start_pos=pos))
        assert model.cache_len == pos + t
        pos += t - 1
        model.rollback(pos)
    out.append(model(ids[:, pos : pos + 1], start_pos=pos))
    return out


def test_static_shape_passes_keep_every_shape_and_match_eager(monkeypatch) -> None:
    """The CUDA-graph path's passes, run uncompiled here: the compiled function sees the
    same shapes and the same position tensor at every step (so one graph serves them all),
    and its logits equal the eager path's."""
    model = make_tiny_lm(seed=3, max_seq_len=1024).model
    ids = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = _static_twin_passes(model, ids)
    compiles, calls = [], []

    def fake_compile(fn, **kwargs):
        compiles.append(kwargs)

        def run(input_ids, first):
            calls.append((fn.__name__, tuple(input_ids.shape), first))
            return fn(input_ids, first)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    with torch.inference_mode():
        model.compile_decode_step(static_shapes=True)
        model.compile_verify(5)
        calls.clear()
        static = _static_twin_passes(model, ids)
    assert compiles == [{"mode": None, "dynamic": False, "fullgraph": True}] * 2
    assert model.max_cache_len == 256  # 40 rounded up to a shared bucket
    assert {c[1] for c in calls if c[1][1] == 1} == {(1, 1)}
    assert {c[1] for c in calls if c[1][1] > 1} == {(1, 5)}  # verify passes padded to 5
    assert len(calls) == 7 and all(c[2] is model._pos for c in calls)
    for e, s in zip(eager, static, strict=True):
        assert e.shape == s.shape
        torch.testing.assert_close(s, e, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        model.setup_cache(1, 300)
    assert model.max_cache_len == 512


@pytest.mark.slow
@needs_cpp_compiler
def test_static_shape_step_compiles_once_for_every_position() -> None:
    """With inductor (what CUDA graphs record on a GPU): one graph for the step and one for
    verify passes across positions and requests in the same cache bucket; logits equal
    eager ones to float rounding."""
    import torch._dynamo

    model = make_tiny_lm(seed=3).model
    ids = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = _static_twin_passes(model, ids)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.compile_decode_step(static_shapes=True)
        model.compile_verify(5)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
        compiled = _static_twin_passes(model, ids)
        compiled_again = _static_twin_passes(model, ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for e, c, a in zip(eager, compiled, compiled_again, strict=True):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a, c)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_matches_eager() -> None:
    """On a GPU the compiled step defaults to static shapes under CUDA graphs; its logits
    (handed out as copies, not the graph's reused buffers) equal eager ones."""
    import torch._dynamo

    model = make_tiny_lm(seed=3).model.cuda()
    ids = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        eager = _static_twin_passes(model, ids)
        torch._dynamo.reset()
        model.compile_decode_step()
        model.compile_verify(5)
        assert model.static_shapes
        graphed = _static_twin_passes(model, ids)
    for e, g in zip(eager, graphed, strict=True):
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)
