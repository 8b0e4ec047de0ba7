"""One decoder-only transformer for the whole Llama family (Llama, CodeLlama, TinyLlama,
SmolLM2, Qwen2), selected by `ModelConfig` fields rather than per-family copies.

Module names follow HF transformers' Llama (`layers.N.self_attn.q_proj` ...), so a HF
checkpoint maps onto this model by dropping its `model.` prefix and nothing else.

The KV cache is preallocated and indexed by position: `cache_len` says how many positions
are valid, so rolling back after a rejected speculative draft is one integer assignment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def update(self, start_pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v at their positions; return the cache up to the last of them. Given a
        tensor of positions (a static-shape pass), return the whole cache: every shape then
        stays the same from one position to the next."""
        if isinstance(start_pos, Tensor):
            self.k.index_copy_(2, start_pos, k)
            self.v.index_copy_(2, start_pos, v)
            return self.k, self.v
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

    A static-shape pass (CUDA graphs) calls it over the whole cache: no shape depends on
    the position, so one graph replays at every step. Work then grows with the cache's
    capacity, not its fill: cheap on a GPU, which is where that path runs by default."""
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


def past_mask(first: int, t: int, device: torch.device) -> Tensor:
    """[t, first + t] bool: new token i sits at position first + i and may see every
    position up to it (a cached pass after `first` positions)."""
    seen = torch.arange(first + t, device=device)
    return seen[None, :] <= (first + torch.arange(t, device=device))[:, None]


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
        self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int | Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """`start_pos`: None without a cache; the first new position as an int; or, in a
        static-shape pass, the new tokens' positions as a tensor (with `mask` over the
        whole cache)."""
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
        if self.kv_cache is not None and start_pos is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        if isinstance(start_pos, Tensor):
            assert mask is not None
            y = masked_cache_attention(q, k, v, mask)
        elif start_pos is not None and t <= SMALL_STEP:
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
        self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int | Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """`forward(input_ids [B, T]) -> logits [B, T, V]`.

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
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cache_len = 0
        self.max_cache_len = 0
        self._rope: tuple[Tensor, Tensor] | None = None
        self._compiled_step = None  # set by compile_decode_step
        self._compiled_verify = None  # set by compile_verify
        self.verify_len = 0
        # Static-shape compiled passes (CUDA graphs): positions travel as this device tensor.
        self.static_shapes = False
        self._pos: Tensor | None = None

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
        if self.static_shapes:
            # A static-shape graph is compiled (and a CUDA graph recorded) per cache size:
            # round sizes up to a few buckets so that requests share them.
            bucket = max(256, 1 << (max_seq_len - 1).bit_length())
            max_seq_len = min(self.config.max_seq_len, bucket)
        weight = self.embed_tokens.weight
        if (
            self.max_cache_len == max_seq_len
            and self.layers[0].self_attn.kv_cache is not None
            and self.layers[0].self_attn.kv_cache.k.shape[0] == batch_size
            and self.layers[0].self_attn.kv_cache.k.dtype == weight.dtype
            and self.layers[0].self_attn.kv_cache.k.device == weight.device
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

    # ---- compiled decode step ----------------------------------------------------------
    def compile_decode_step(self, static_shapes: bool | None = None) -> None:
        """Run every one-token cached step (AR decoding, a draft model's proposals) through
        torch.compile; prefill stays eager (verify passes: `compile_verify`).

        A one-token step of a small model on a CPU is mostly Python and dispatch overhead:
        SmolLM2-135M makes ~1,000 small op calls per token across its 30 layers, and they
        cost more than reading its weights. Inductor fuses each layer's elementwise work
        into a few C++ kernels. The position and the cache length are symbolic
        (`dynamic=True`), so one graph serves every position and cache size; compiled code
        is cached on disk by torch, so only the first run on a machine pays the compile
        (~3 minutes for SmolLM2-135M on 2 cores, ~1 minute once cached).

        `static_shapes` (the default on CUDA) compiles a pass whose shapes never change
        instead, with mode="reduce-overhead": on a GPU that records the step once as a CUDA
        graph and replays it, removing the per-kernel launch cost that dominates a small
        model's step. Positions then travel as a device tensor (an int would be a new graph
        per position), attention spans the whole cache under a mask, and cache sizes are
        rounded up to powers of two (one graph each).

        Fused kernels round differently from eager ones: logits agree to float rounding,
        not bit for bit. The graph is compiled here, on a scratch cache: a draft model that
        drafts one token per round steps only after a rejection, so its first step could
        otherwise come (and compile) in the middle of a timed generation."""
        device = self.embed_tokens.weight.device
        if static_shapes is None:
            static_shapes = device.type == "cuda"
        self.static_shapes = static_shapes
        self._rope_tables(device)
        if static_shapes:
            self._pos = torch.zeros(1, dtype=torch.long, device=device)
            if device.type == "cuda":  # read in place at each replay, never copied in
                assert self._rope is not None
                for table in (*self._rope, self._pos):
                    torch._dynamo.mark_static_address(table)
        step = self._static_pass if static_shapes else self._decode_one
        self._compiled_step = self._compile(step)
        self._warm_up(1)

    @property
    def compiled(self) -> bool:
        """True once `compile_decode_step` has run."""
        return self._compiled_step is not None

    def compile_verify(self, length: int) -> None:
        """Run cached passes of 2..`length` tokens (speculative verify passes) through
        torch.compile as one graph of exactly `length` tokens: shorter passes are padded
        with copies of their last token, whose keys/values land past the real ones and are
        forgotten at once (the cache needs `length` - 1 positions of slack; a pass near the
        end of the cache runs eager). One fixed shape means one compile, whatever draft
        lengths an adaptive drafter picks. Each real token still attends over exactly the
        positions before it, so padding never changes its logits. Static shapes (CUDA
        graphs) follow `compile_decode_step`. The graph is compiled here, on a scratch
        cache, not inside the caller's first timed generation."""
        if length < 2 or length > SMALL_STEP:
            raise ValueError(f"verify length must be in [2, {SMALL_STEP}], got {length}")
        if self._compiled_verify is not None and self.verify_len == length:
            return
        self._rope_tables(self.embed_tokens.weight.device)
        self.verify_len = length
        self._compiled_verify = self._compile(
            self._static_pass if self.static_shapes else self._verify_many
        )
        self._warm_up(2)

    def _compile(self, fn):  # noqa: ANN001, ANN202 - torch.compile's own types
        if not self.static_shapes:
            return torch.compile(fn, dynamic=True, fullgraph=True)
        cuda = self.embed_tokens.weight.device.type == "cuda"
        return torch.compile(fn, mode="reduce-overhead" if cuda else None, dynamic=False,
                             fullgraph=True)

    def _warm_up(self, tokens: int) -> None:
        """Run cached passes of `tokens` tokens on a scratch cache (the caller sets up its
        own next) so that torch.compile compiles now (and, with CUDA graphs, records: the
        second and third runs). Position 3, not 0 or 1, which torch would specialize on."""
        device = self.embed_tokens.weight.device
        need = 3 + max(tokens, self.verify_len) + 1
        if self.config.max_seq_len < need:
            return  # too short a context to warm up: the first real pass compiles
        with torch.inference_mode():
            self.setup_cache(1, need)
            self(torch.zeros(1, 3, dtype=torch.long, device=device), start_pos=0)
            for _ in range(3 if self.static_shapes else 1):
                self(torch.zeros(1, tokens, dtype=torch.long, device=device), start_pos=3)
        self.cache_len = 0

    def _static_pass(self, input_ids: Tensor, first: Tensor) -> Tensor:
        """Logits [B, T, V] of T tokens at positions first.. (`first`: a one-element device
        tensor), attending over the whole cache under a mask: no shape depends on the
        position, so the compiled graph is the same at every step."""
        assert self._rope is not None
        cache = self.layers[0].self_attn.kv_cache
        assert cache is not None
        positions = first + torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self._rope[0][positions], self._rope[1][positions]
        seen = torch.arange(cache.k.shape[2], device=input_ids.device)
        mask = seen[None, :] <= positions[:, None]
        return self.lm_head(self._hidden(input_ids, cos, sin, positions, mask))

    def _run_compiled(self, fn, input_ids: Tensor, first: int) -> Tensor:  # noqa: ANN001
        # A fresh contiguous id tensor: a strided slice would be another graph.
        ids = input_ids.clone(memory_format=torch.contiguous_format)
        if self.static_shapes:
            assert self._pos is not None
            self._pos.fill_(first)  # on the device: no host sync, one address for the graph
            # A CUDA graph's outputs are overwritten by its next replay: hand out a copy.
            return fn(ids, self._pos).clone()
        # Module buffers count as static by default; the KV cache's length must be symbolic
        # too, or every request with another cache size would compile again.
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return fn(ids, first)

    def _verify_many(self, input_ids: Tensor, pos: int) -> Tensor:
        """Logits [B, T, V] of T tokens at positions pos.. (cache holds pos > 0)."""
        assert self._rope is not None
        t = input_ids.shape[1]
        cos, sin = self._rope[0][pos : pos + t], self._rope[1][pos : pos + t]
        mask = past_mask(pos, t, input_ids.device)
        return self.lm_head(self._hidden(input_ids, cos, sin, pos, mask))

    def _decode_one(self, input_ids: Tensor, pos: int) -> Tensor:
        """Logits [B, 1, V] of one token per row at position `pos` (cache holds pos)."""
        assert self._rope is not None
        cos, sin = self._rope[0][pos : pos + 1], self._rope[1][pos : pos + 1]
        return self.lm_head(self._hidden(input_ids, cos, sin, pos, None))

    def _hidden(self, input_ids: Tensor, cos: Tensor, sin: Tensor,
                start_pos: int | Tensor | None, mask: Tensor | None) -> Tensor:
        """Final-norm hidden states [B, T, D]: what every pass (eager, compiled, static)
        computes alike; they differ only in how they make positions, rope rows and mask."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, mask)
        return self.norm(x)

    # ---- forward -----------------------------------------------------------------------
    def _rope_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._rope is None or self._rope[0].device != device:
            inv_freq = rope_frequencies(
                self.config.head_dim, self.config.rope_theta, self.config.rope_scaling
            )
            pos = torch.arange(self.config.max_seq_len, dtype=torch.float32)
            angles = torch.outer(pos, inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self._rope = (angles.cos().to(device), angles.sin().to(device))
        return self._rope

    def forward(
        self, input_ids: Tensor, start_pos: int | None = None, num_logits: int | None = None
    ) -> Tensor:
        """Logits for the last `num_logits` positions (all when None).

        `start_pos` selects the cached path; it must equal `cache_len` or lie below it
        (which overwrites, i.e. an implicit rollback)."""
        b, t = input_ids.shape
        use_cache = start_pos is not None
        if use_cache:
            if self.layers[0].self_attn.kv_cache is None:
                raise ValueError("start_pos given but no cache: call setup_cache() first")
            if start_pos > self.cache_len:
                raise ValueError(f"start_pos {start_pos} skips past cache_len {self.cache_len}")
            if start_pos + t > self.max_cache_len:
                raise ValueError(
                    f"{start_pos + t} positions exceed the cache of {self.max_cache_len}"
                )
        elif t > self.config.max_seq_len:
            raise ValueError(f"{t} tokens exceed the context of {self.config.max_seq_len}")
        first = start_pos or 0
        if self._compiled_step is not None and use_cache and t == 1:
            logits = self._run_compiled(self._compiled_step, input_ids, first)
            self.cache_len = first + 1
            return logits
        if (self._compiled_verify is not None and use_cache and first > 0
                and 1 < t <= self.verify_len and first + self.verify_len <= self.max_cache_len):
            pad = input_ids[:, -1:].expand(b, self.verify_len - t)
            logits = self._run_compiled(self._compiled_verify, torch.cat((input_ids, pad), 1),
                                        first)
            self.cache_len = first + t  # the padding's cache entries: forgotten
            return logits[:, t - (num_logits or t) : t]
        cos, sin = self._rope_tables(input_ids.device)
        cos, sin = cos[first : first + t], sin[first : first + t]
        mask = None
        if use_cache and first > 0 and t > 1:
            mask = past_mask(first, t, input_ids.device)
        x = self._hidden(input_ids, cos, sin, start_pos, mask)
        if use_cache:
            self.cache_len = first + t
        if num_logits is not None:
            x = x[:, -num_logits:]
        return self.lm_head(x)
