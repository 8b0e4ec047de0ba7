"""Compiled cached passes (`CompiledDecoder`): one graph per kind of pass, logits equal to
the eager model's to float rounding, the static-shape (CUDA-graph) variant, and `LM`'s
hookup."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_lm, needs_cpp_compiler

from draftlm.compile import CompiledDecoder
from draftlm.model import Transformer


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_decode_step_matches_eager_and_compiles_once() -> None:
    """One graph, compiled by CompiledDecoder, serves every position and cache size;
    logits equal eager ones to float rounding."""
    import torch._dynamo

    model = make_tiny_lm(seed=3).model
    ids = torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    eager_logits, compiled_logits = [], []
    with torch.inference_mode():
        model.setup_cache(1, 32)
        model(ids[:, :4], start_pos=0)
        for start_pos in range(4, 9):
            eager_logits.append(model(ids[:, start_pos : start_pos + 1], start_pos=start_pos))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        decoder = CompiledDecoder(model)
        # Compiled on the spot (a scratch cache), not by the first real step.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        decoder.setup_cache(1, 32)
        decoder(ids[:, :4], start_pos=0)  # the prompt pass stays eager
        for start_pos in range(4, 9):
            compiled_logits.append(decoder(ids[:, start_pos : start_pos + 1],
                                           start_pos=start_pos))
            assert model.cache_len == start_pos + 1
        decoder.rollback(6)  # a step after a rollback overwrites the cache as eager does
        again = decoder(ids[:, 6:7], start_pos=6)
        decoder.setup_cache(1, 48)  # another request's cache size: the same graph
        decoder(ids[:, :4], start_pos=0)
        other_size = decoder(ids[:, 4:5], start_pos=4)
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

    def passes(decoder: Transformer | CompiledDecoder) -> list[torch.Tensor]:
        out = []
        decoder.setup_cache(1, 20)
        decoder(ids[:, :6], start_pos=0)
        start_pos = 6
        for t in (2, 5, 3, 4):
            out.append(decoder(ids[:, start_pos : start_pos + t], start_pos=start_pos))
            assert model.cache_len == start_pos + t
            start_pos += t - 1
            decoder.rollback(start_pos)  # as after a rejection: the last token is fed again
        out.append(decoder(ids[:, 16:20], start_pos=16))  # no room for padding: eager
        return out

    with torch.inference_mode():
        eager = passes(model)
        torch._dynamo.reset()
        decoder = CompiledDecoder(model)
        torch._dynamo.utils.counters.clear()  # count the verify graph alone
        decoder.compile_verify(5)
        compiled = passes(decoder)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for e, c in zip(eager, compiled, strict=True):
        assert e.shape == c.shape
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)


def _static_twin_passes(decoder: Transformer | CompiledDecoder,
                        ids: torch.Tensor) -> list[torch.Tensor]:
    """Decode steps, verify passes of 2..5 tokens with rollbacks, and a step after a
    rollback, as AR and speculative decoding run them."""
    out = []
    decoder.setup_cache(1, 40)
    decoder(ids[:, :6], start_pos=0)  # the prompt pass stays eager
    for start_pos in range(6, 9):
        out.append(decoder(ids[:, start_pos : start_pos + 1], start_pos=start_pos))
    start_pos = 9
    for t in (2, 5, 3):
        out.append(decoder(ids[:, start_pos : start_pos + t], start_pos=start_pos))
        assert decoder.cache_len == start_pos + t
        start_pos += t - 1
        decoder.rollback(start_pos)
    out.append(decoder(ids[:, start_pos : start_pos + 1], start_pos=start_pos))
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

        def run(input_ids, start_pos):
            calls.append((fn.__name__, tuple(input_ids.shape), start_pos))
            return fn(input_ids, start_pos)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    with torch.inference_mode():
        decoder = CompiledDecoder(model, static_shapes=True)
        decoder.compile_verify(5)
        calls.clear()
        static = _static_twin_passes(decoder, ids)
    assert compiles == [{"mode": None, "dynamic": False, "fullgraph": True}] * 2
    assert model.max_cache_len == 256  # 40 rounded up to a shared bucket
    assert {c[1] for c in calls if c[1][1] == 1} == {(1, 1)}
    assert {c[1] for c in calls if c[1][1] > 1} == {(1, 5)}  # verify passes padded to 5
    assert len(calls) == 7 and all(c[2] is decoder._start_pos for c in calls)
    for e, s in zip(eager, static, strict=True):
        assert e.shape == s.shape
        torch.testing.assert_close(s, e, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        decoder.setup_cache(1, 300)
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
        decoder = CompiledDecoder(model, static_shapes=True)
        decoder.compile_verify(5)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
        compiled = _static_twin_passes(decoder, ids)
        compiled_again = _static_twin_passes(decoder, ids)
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
        decoder = CompiledDecoder(model, static_shapes=True)  # opt-in: --cuda-graphs
        decoder.compile_verify(5)
        assert decoder.static_shapes
        graphed = _static_twin_passes(decoder, ids)
    for e, g in zip(eager, graphed, strict=True):
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)


def test_lm_decodes_through_the_model_until_compiled(monkeypatch) -> None:
    """`LM.decoder` is the eager model itself until `LM.compile()` puts a CompiledDecoder
    (here with torch.compile stubbed out) in its place; generation goes through it."""
    from draftlm.generate import generate

    lm = make_tiny_lm(seed=3)
    assert lm.decoder is lm.model
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    expected = generate(lm, "hello", max_new_tokens=8).token_ids
    lm.compile()
    assert not lm.decoder.static_shapes  # CUDA graphs are opt-in on every device
    assert isinstance(lm.decoder, CompiledDecoder) and lm.decoder.model is lm.model
    seen: list[int] = []
    step = lm.decoder._step
    lm.decoder._step = lambda ids, start_pos: seen.append(start_pos) or step(ids, start_pos)
    assert generate(lm, "hello", max_new_tokens=8).token_ids == expected
    assert seen == list(range(len("hello") - 1, len("hello") + 7))
