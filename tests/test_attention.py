"""Attention of cached passes against PyTorch's SDPA, its batch invariance, the masks, and
the KV cache's two ways of writing."""

import torch
import torch.nn.functional as F

from draftlm.attention import (
    KVCache,
    cache_mask,
    masked_cache_attention,
    past_mask,
    small_step_attention,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def qkv(t: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [1, 4, t, 16] and grouped keys/values [1, 2, length, 16]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, t, HEAD_DIM, generator=gen)
    k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen)
    v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen)
    return q, k, v


def sdpa(q, k, v, mask=None, is_causal=False) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=True)


def test_past_mask_lets_each_new_token_see_up_to_its_position() -> None:
    expected = torch.tensor([[1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(past_mask(3, 3, torch.device("cpu")), expected)
    # Over a larger cache the same rows, with every later position hidden.
    wide = cache_mask(torch.arange(3, 6), 10)
    assert torch.equal(wide[:, :6], expected) and not wide[:, 6:].any()


def test_verify_pass_matches_sdpa_and_each_row_equals_its_decode_step() -> None:
    """A verify pass (5 new tokens after 7 cached) gives SDPA's result, and each token's row
    is bit for bit what a one-token step at its position computes."""
    q, k, v = qkv(t=5, length=12)
    mask = past_mask(7, 5, q.device)
    together = small_step_attention(q, k, v, mask)
    torch.testing.assert_close(together, sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
    for i in range(5):
        alone = small_step_attention(q[:, :, i : i + 1], k[:, :, : 8 + i], v[:, :, : 8 + i], None)
        assert torch.equal(together[:, :, i : i + 1], alone)


def test_new_tokens_without_a_past_are_causal() -> None:
    q, k, v = qkv(t=6, length=6, seed=1)
    torch.testing.assert_close(small_step_attention(q, k, v, None),
                               sdpa(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_masked_attention_over_the_whole_cache_ignores_later_positions() -> None:
    """The static-shape pass: attention over the whole cache under `cache_mask` equals
    attention over the filled part alone, whatever the unfilled part holds."""
    q, k, v = qkv(t=3, length=16, seed=2)
    whole = masked_cache_attention(q, k, v, cache_mask(torch.arange(5, 8), 16))
    filled = masked_cache_attention(q, k[:, :, :8], v[:, :, :8], past_mask(5, 3, q.device))
    torch.testing.assert_close(whole, filled, atol=1e-6, rtol=1e-6)


def test_kv_cache_writes_at_positions() -> None:
    cache = KVCache(1, KV_HEADS, 8, HEAD_DIM, torch.float32, "cpu")
    _, k, v = qkv(t=1, length=3, seed=3)
    keys, values = cache.update(k, v, start_pos=2, positions=None)
    assert keys.shape[2] == values.shape[2] == 5  # the cache up to the last new position
    assert torch.equal(cache.k[:, :, 2:5], k) and torch.equal(cache.v[:, :, 2:5], v)
    keys, values = cache.update(2 * k, 2 * v, start_pos=None, positions=torch.tensor([5, 6, 7]))
    assert keys.shape[2] == 8  # a static-shape pass sees the whole cache
    assert torch.equal(cache.k[:, :, 5:], 2 * k) and torch.equal(cache.k[:, :, 2:5], k)
