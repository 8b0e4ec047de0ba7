"""The KV cache, and attention over it for cached passes of a few new tokens.

The cache is preallocated and indexed by position (`model.Transformer` counts how many
positions are valid, so a rollback is one integer assignment). A full causal pass
(training, scoring, a long prompt) attends through PyTorch's `scaled_dot_product_attention`
in `model.Attention`; the functions here serve cached passes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values for positions [0, max_seq_len), written in place at their position."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str | None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, k: Tensor, v: Tensor, start_pos: int | None, positions: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Write k, v at their positions; return the cache up to the last of them. Given
        `positions` (a static-shape pass), return the whole cache: every shape then stays
        the same from one position to the next."""
        if positions is not None:
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
            return self.k, self.v
        assert start_pos is not None
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


# Decode and verify steps (a few new tokens against a cached past) take a plain matmul path:
# PyTorch's CPU SDPA kernels cost ~1-13 ms a call there, more than the layer's weights.
SMALL_STEP = 16


def small_step_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of a few queries over the cache (`masked_cache_attention`'s folded
    grouped-query matmuls).

    With a cached past (`mask` given: a verify pass of speculative decoding), each new token
    is computed alone over exactly the positions it may see: the same shapes and kernels as
    the one-token decode step at its position, so its result does not depend on the other
    tokens of the pass. With batch-invariant linear layers (`quant.layers.Int8Linear`) a verify
    pass then gives the very logits AR decoding would, bit for bit."""
    t = q.shape[2]
    if mask is not None and t > 1:
        past = k.shape[2] - t
        rows = [
            small_step_attention(q[:, :, i : i + 1], k[:, :, : past + i + 1],
                                 v[:, :, : past + i + 1], None)
            for i in range(t)
        ]
        return torch.cat(rows, dim=2)
    # All new tokens and no past: causal among themselves (one token sees all there is).
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril() if t > 1 else None
    return masked_cache_attention(q, k, v, causal)


def masked_cache_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of T queries over keys/values [B, kv, L, D], `mask` [T, L] (or None: all)
    saying which positions each may see. Grouped-query heads are folded into the query
    length ([B, kv, group*T, D]) so K and V are never repeated or copied.

    A static-shape pass (CUDA graphs, `compile.CompiledDecoder`) calls it over the whole
    cache: no shape depends on the position, so one graph replays at every step. Work then
    grows with the cache's capacity, not its fill: cheap on a GPU, which is where that path
    runs by default."""
    b, h, t, d = q.shape
    kv_heads = k.shape[1]
    group = h // kv_heads
    scores = (q.reshape(b, kv_heads, group * t, d) @ k.transpose(-1, -2)).float() * (d**-0.5)
    if mask is not None:
        length = k.shape[2]
        scores = scores.view(b, kv_heads, group, t, length).masked_fill(~mask, float("-inf"))
        scores = scores.view(b, kv_heads, group * t, length)
    probs = scores.softmax(-1).to(v.dtype)
    return (probs @ v).view(b, h, t, d)


def past_mask(start_pos: int, t: int, device: torch.device) -> Tensor:
    """[t, start_pos + t] bool: new token i sits at position start_pos + i and may see every
    position up to it (a cached pass after `start_pos` positions)."""
    seen = torch.arange(start_pos + t, device=device)
    return seen[None, :] <= (start_pos + torch.arange(t, device=device))[:, None]


def cache_mask(positions: Tensor, cache_len: int) -> Tensor:
    """[T, cache_len] bool: the token at `positions[i]` may see every cache position up to
    its own (a static-shape pass, which attends over the whole cache)."""
    seen = torch.arange(cache_len, device=positions.device)
    return seen[None, :] <= positions[:, None]
