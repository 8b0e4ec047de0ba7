"""Cached passes of a `Transformer` through torch.compile: `CompiledDecoder`.

A one-token step of a small model on a CPU is mostly Python and dispatch overhead:
SmolLM2-135M makes ~1,000 small op calls per token across its 30 layers, and they cost
more than reading its weights. Inductor fuses each layer's elementwise work into a few C++
kernels. The model stays eager; the decoding loops (`generate`, `speculative`) make their
cached passes through `LM.decoder`, which is this wrapper when the model is compiled
(`load(..., compile_step=True)`, `--compile`) and the model itself otherwise. Fused kernels
round differently from eager ones: logits agree to float rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from draftlm.attention import SMALL_STEP
from draftlm.model import Transformer


class CompiledDecoder:
    """`decoder(input_ids, start_pos, num_logits)`: the model's cached pass, with every
    one-token step (AR decoding, a draft model's proposals) and, after `compile_verify`,
    every verify pass of 2..k+1 tokens through a compiled graph; other passes (a prompt)
    run the eager model. It sets up and rolls back the model's cache as the model does.

    The position and the cache length are symbolic (`dynamic=True`), so one graph serves
    every position and cache size; compiled code is cached on disk by torch, so only the
    first run on a machine pays the compile (~3 minutes for SmolLM2-135M on 2 cores,
    ~1 minute once cached).

    `static_shapes` (opt-in: `--cuda-graphs`) compiles a pass whose shapes never change
    instead, with mode="reduce-overhead": on a GPU that records the step once as a CUDA
    graph and replays it, removing the per-kernel launch cost that dominates a small
    model's step. Positions then travel as a device tensor (an int would be a new graph
    per position), attention spans the whole cache under a mask, and cache sizes are
    rounded up to powers of two (one graph each).

    The graph is compiled here, on a scratch cache: a draft model that drafts one token
    per round steps only after a rejection, so its first step could otherwise come (and
    compile) in the middle of a timed generation."""

    def __init__(self, model: Transformer, static_shapes: bool | None = None) -> None:
        device = model.embed_tokens.weight.device
        self.model = model
        # The dynamic step everywhere by default: the CUDA-graph path has not yet run on a
        # GPU (scripts/gpu_check.sh is the check that would make it the CUDA default).
        self.static_shapes = bool(static_shapes)
        self.verify_len = 0
        self._verify: Callable[..., Tensor] | None = None
        # A static-shape pass's first new position, on the device.
        self._start_pos = torch.zeros(1, dtype=torch.long, device=device)
        tables = model.rope_tables(device)  # made now, not traced into the graphs
        if self.static_shapes and device.type == "cuda":  # read in place at each replay
            for table in (*tables, self._start_pos):
                torch._dynamo.mark_static_address(table)
        self._step = self._compile()
        self._warm_up(1)

    def compile_verify(self, length: int) -> None:
        """Run cached passes of 2..`length` tokens (speculative verify passes) through
        torch.compile as one graph of exactly `length` tokens: shorter passes are padded
        with copies of their last token, whose keys/values land past the real ones and are
        forgotten at once (the cache needs `length` - 1 positions of slack; a pass near the
        end of the cache runs eager). One fixed shape means one compile, whatever draft
        lengths an adaptive drafter picks. Each real token still attends over exactly the
        positions before it, so padding never changes its logits. Static shapes (CUDA
        graphs) follow the step's. The graph is compiled here, on a scratch cache, not
        inside the caller's first timed generation."""
        if length < 2 or length > SMALL_STEP:
            raise ValueError(f"verify length must be in [2, {SMALL_STEP}], got {length}")
        if self._verify is not None and self.verify_len == length:
            return
        self.verify_len = length
        self._verify = self._compile()
        self._warm_up(2)

    # ---- the model's cache interface ---------------------------------------------------
    @property
    def cache_len(self) -> int:
        return self.model.cache_len

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> None:
        """The model's `setup_cache`. With static shapes a graph is compiled (and a CUDA
        graph recorded) per cache size: sizes are rounded up to a few buckets so that
        requests share them."""
        context = self.model.config.max_seq_len
        max_seq_len = max_seq_len or context
        if self.static_shapes and max_seq_len <= context:
            max_seq_len = min(context, max(256, 1 << (max_seq_len - 1).bit_length()))
        self.model.setup_cache(batch_size, max_seq_len)

    def rollback(self, length: int) -> None:
        self.model.rollback(length)

    # ---- cached passes -----------------------------------------------------------------
    def __call__(
        self, input_ids: Tensor, start_pos: int, num_logits: int | None = None
    ) -> Tensor:
        """`model(input_ids, start_pos=start_pos, num_logits=num_logits)`, through a
        compiled graph where one fits. The model's checks and its `cache_len` run here,
        outside the graphs."""
        model = self.model
        t = input_ids.shape[1]
        if t == 1:
            model.check_cached_pass(start_pos, t)
            logits = self._run(self._step, input_ids, start_pos)
            model.cache_len = start_pos + 1
            return logits
        if (self._verify is not None and start_pos > 0 and t <= self.verify_len
                and start_pos + self.verify_len <= model.max_cache_len):
            model.check_cached_pass(start_pos, t)
            pad = input_ids[:, -1:].expand(input_ids.shape[0], self.verify_len - t)
            logits = self._run(self._verify, torch.cat((input_ids, pad), 1), start_pos)
            model.cache_len = start_pos + t  # the padding's cache entries: forgotten
            return logits[:, t - (num_logits or t) : t]
        return model(input_ids, start_pos=start_pos, num_logits=num_logits)

    def _compile(self) -> Callable[..., Tensor]:
        if not self.static_shapes:
            return torch.compile(self.model.forward, dynamic=True, fullgraph=True)
        cuda = self._start_pos.device.type == "cuda"
        return torch.compile(self._static_pass, mode="reduce-overhead" if cuda else None,
                             dynamic=False, fullgraph=True)

    def _static_pass(self, input_ids: Tensor, start_pos: Tensor) -> Tensor:
        """Logits [B, T, V] of T tokens from `start_pos` (a one-element device tensor) on,
        attending over the whole cache under a mask: no shape depends on the position, so
        the compiled graph is the same at every step."""
        positions = start_pos + torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.model(input_ids, positions=positions)

    def _run(self, graph: Callable[..., Tensor], input_ids: Tensor, start_pos: int) -> Tensor:
        # A fresh contiguous id tensor: a strided slice would be another graph.
        ids = input_ids.clone(memory_format=torch.contiguous_format)
        if self.static_shapes:
            self._start_pos.fill_(start_pos)  # on the device: no host sync, one address
            # A CUDA graph's outputs are overwritten by its next replay: hand out a copy.
            return graph(ids, self._start_pos).clone()
        # Module buffers count as static by default; the KV cache's length must be symbolic
        # too, or every request with another cache size would compile again.
        with torch._dynamo.config.patch(force_parameter_static_shapes=False):
            return graph(ids, start_pos)

    def _warm_up(self, num_tokens: int) -> None:
        """Run cached passes of `num_tokens` tokens on a scratch cache (the caller sets up
        its own next) so that torch.compile compiles now (and, with CUDA graphs, records:
        the second and third runs). Position 3, not 0 or 1, which torch would specialize
        on."""
        device = self._start_pos.device
        need = 3 + max(num_tokens, self.verify_len) + 1
        if self.model.config.max_seq_len < need:
            return  # too short a context to warm up: the first real pass compiles
        with torch.inference_mode():
            self.setup_cache(1, need)
            self(torch.zeros(1, 3, dtype=torch.long, device=device), start_pos=0)
            for _ in range(3 if self.static_shapes else 1):
                self(torch.zeros(1, num_tokens, dtype=torch.long, device=device), start_pos=3)
        self.model.cache_len = 0
