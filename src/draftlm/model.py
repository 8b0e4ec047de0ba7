"""One decoder-only transformer for the whole Llama family (Llama, CodeLlama, TinyLlama,
SmolLM2, Qwen2), selected by `ModelConfig` fields rather than per-family copies.

Module names follow HF transformers' Llama (`layers.N.self_attn.q_proj` ...), so a HF
checkpoint maps onto this model by dropping its `model.` prefix and nothing else.

The KV cache is preallocated and indexed by position: `cache_len` says how many positions
are valid, so rolling back after a rejected speculative draft is one integer assignment.
The cache and the attention of cached passes live in `attention`; `compile` runs cached
passes through torch.compile (and CUDA graphs) from outside: the model itself is eager.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftlm.attention import (
    SMALL_STEP,
    KVCache,
    cache_mask,
    masked_cache_attention,
    past_mask,
    small_step_attention,
)
from draftlm.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as the reference implementations do; bf16 variance drifts.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies of rotary embeddings, with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).float()
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    out = torch.where(wavelen < high_wavelen, inv_freq, out)
    return out.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the HF layout). x: [B, H, T, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # One projection for q, k and v together when `quant.layers` fuses them (one activation
        # quantization and one kernel call instead of three).
        self.qkv_proj: nn.Module | None = None
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
        start_pos: int | None = None, positions: Tensor | None = None,
    ) -> Tensor:
        """Without `start_pos` or `positions`, attention among the new tokens alone (no
        cache). `start_pos`: the first new position of a cached pass. `positions`: the new
        tokens' positions in a static-shape pass (with `mask` over the whole cache)."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_size, kv_size], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cached = start_pos is not None or positions is not None
        if cached and self.kv_cache is not None:
            k, v = self.kv_cache.update(k, v, start_pos, positions)
        if positions is not None:
            assert mask is not None
            y = masked_cache_attention(q, k, v, mask)
        elif cached and t <= SMALL_STEP:
            y = small_step_attention(q, k, v, mask)
        else:
            # Causal among the new tokens only when they are all there is; with a cached past
            # the explicit mask says which positions each new token may see.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused, set by `quant.layers`

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
        start_pos: int | None = None, positions: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """`forward(input_ids [B, T]) -> logits [B, T, V]` (V = `head_vocab_size` for a draft
    with a truncated head, whose row i scores token `head_token_ids[i]`).

    Without a cache (training, scoring) every call is a full causal pass. After
    `setup_cache`, `forward(ids, start_pos)` writes the new keys/values at
    [start_pos, start_pos + T) and attends to everything before them; `rollback(n)` forgets
    positions >= n in O(1).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.head_vocab_size or config.vocab_size,
                                 bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A truncated head's row i scores token head_token_ids[i] (saved with the weights).
        self.head_token_ids: Tensor | None
        self.register_buffer("head_token_ids", None if config.head_vocab_size is None
                             else torch.arange(config.head_vocab_size))
        self.cache_len = 0
        self.max_cache_len = 0
        self._rope: tuple[Tensor, Tensor] | None = None

    # ---- weights -----------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) linear/embedding weights, unit norms, zero biases (AMD's init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    # ---- cache -------------------------------------------------------------------------
    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> None:
        """Allocate the KV cache once; generation then runs without further allocation."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} > model context {self.config.max_seq_len}")
        weight = self.embed_tokens.weight
        cache = self.layers[0].self_attn.kv_cache
        if (
            self.max_cache_len == max_seq_len and cache is not None
            and cache.k.shape[0] == batch_size and cache.k.dtype == weight.dtype
            and cache.k.device == weight.device
        ):
            self.cache_len = 0
            return
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size, self.config.n_kv_heads, max_seq_len, self.config.head_dim,
                weight.dtype, weight.device,
            )
        self.max_cache_len = max_seq_len
        self.cache_len = 0

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_cache_len = self.cache_len = 0

    def rollback(self, length: int) -> None:
        """Forget cached positions >= length. O(1): later writes simply overwrite them."""
        if not 0 <= length <= self.cache_len:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.cache_len}")
        self.cache_len = length

    def check_cached_pass(self, start_pos: int, num_tokens: int) -> None:
        """A cached pass must start at `cache_len` or below it (which overwrites, i.e. an
        implicit rollback) and end inside the cache."""
        if self.layers[0].self_attn.kv_cache is None:
            raise ValueError("start_pos given but no cache: call setup_cache() first")
        if start_pos > self.cache_len:
            raise ValueError(f"start_pos {start_pos} skips past cache_len {self.cache_len}")
        if start_pos + num_tokens > self.max_cache_len:
            raise ValueError(
                f"{start_pos + num_tokens} positions exceed the cache of {self.max_cache_len}"
            )

    # ---- forward -----------------------------------------------------------------------
    def rope_tables(self, device: torch.device,
                    length: int | None = None) -> tuple[Tensor, Tensor]:
        """cos and sin [n, head_dim] of positions [0, n), n >= `length` (None: the whole
        context), made on first need and grown by doubling: a config that claims a context
        of millions of positions costs only the positions its passes reach."""
        limit = self.config.max_seq_len
        want = limit if length is None else min(max(length, 1), limit)
        have = 0
        if self._rope is not None and self._rope[0].device == device:
            have = self._rope[0].shape[0]
        if have < want:
            n = min(max(want, 2 * have), limit)
            inv_freq = rope_frequencies(
                self.config.head_dim, self.config.rope_theta, self.config.rope_scaling
            )
            angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self._rope = (angles.cos().to(device), angles.sin().to(device))
        assert self._rope is not None
        return self._rope

    def forward(
        self, input_ids: Tensor, start_pos: int | None = None, num_logits: int | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, V] for the last `num_logits` positions (all when None).

        `start_pos` selects the cached path (`check_cached_pass` says where it may start).
        `positions` [T], a device tensor, selects the static-shape pass of
        `compile.CompiledDecoder`: attention spans the whole cache under a mask, so no shape
        depends on the position and one CUDA graph replays at every step."""
        x = self.features(input_ids, start_pos, positions)
        if num_logits is not None:
            x = x[:, -num_logits:]
        return self.lm_head(x)

    def features(
        self, input_ids: Tensor, start_pos: int | None = None, positions: Tensor | None = None,
        embeds: Tensor | None = None,
    ) -> Tensor:
        """The last layer's normalised hidden states [B, T, dim]: what the head reads, and
        what a feature-level draft head (`speculative.feature_head`) drafts from. `embeds`
        [B, T, dim] replaces the token embeddings (that head's fused token-and-feature
        input)."""
        t = input_ids.shape[1]
        # CompiledDecoder checks and counts the positions of its compiled passes itself: an
        # int attribute read or written inside a graph would pin the graph to its value.
        counted = start_pos is not None and not torch.compiler.is_compiling()
        if counted:
            self.check_cached_pass(start_pos, t)
        elif start_pos is None and positions is None and t > self.config.max_seq_len:
            raise ValueError(f"{t} tokens exceed the context of {self.config.max_seq_len}")
        # Compiled passes find the whole table made (`CompiledDecoder`): no growth in a graph.
        start = 0 if start_pos is None else start_pos
        length = None if torch.compiler.is_compiling() else (
            self.max_cache_len if positions is not None else start + t)
        cos, sin = self.rope_tables(input_ids.device, length)
        mask = None
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
            mask = cache_mask(positions, self.max_cache_len)
        else:
            cos, sin = cos[start : start + t], sin[start : start + t]
            if start_pos is not None and t > 1 and start_pos > 0:
                mask = past_mask(start_pos, t, input_ids.device)
        x = self.embed_tokens(input_ids) if embeds is None else embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, start_pos, positions)
        if counted:
            self.cache_len = start_pos + t
        return self.norm(x)
