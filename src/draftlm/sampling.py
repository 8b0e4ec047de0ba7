"""Sampling helpers: pure functions from logits to a distribution, and draws from it.

Speculative sampling must apply exactly the same transformation to the draft's and the
target's logits, so it lives here once and both sides call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from draftlm.errors import DraftlmError

# Temperatures below this are greedy: dividing logits by 1e-30 overflows float32 to inf
# and the softmax to NaN, while any temperature this small already puts all of the mass
# on the argmax (a logit gap of 1e-3 becomes a factor of e^1000).
GREEDY_BELOW = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into the next token. temperature 0 (or below `GREEDY_BELOW`)
    means greedy; every caller (generate, speculative decoding, the server) goes through
    this one check."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails too
            raise DraftlmError(f"temperature must be a finite number >= 0, got "
                               f"{self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DraftlmError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise DraftlmError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities over the vocabulary (last dim) after temperature, top-k and top-p.

    Greedy decoding is the one-hot distribution on the argmax, which lets speculative
    sampling treat greedy as the zero-temperature case of the same acceptance rule."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the most
        # likely token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of `probs` [..., V] -> [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return drawn.reshape(probs.shape[:-1])


def next_token(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> Tensor:
    """The next token for each row of `logits` [..., V]: argmax when greedy, else a draw."""
    if params.greedy:
        return logits.argmax(-1)
    return sample(logits_to_probs(logits, params), generator)


def check_finite(logits: Tensor, name: str) -> None:
    """Damaged weights (NaN or inf) give non-finite logits, whose argmax is a silent
    garbage token; checked once per generation, at the first logits, where the host waits
    for them anyway."""
    if not bool(torch.isfinite(logits).all()):
        raise DraftlmError(f"{name} computes non-finite logits (NaN or inf): its weights are "
                           "damaged or overflow in this dtype; check the file or try "
                           "--dtype float32")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG: seeded when asked, otherwise from OS entropy (never the global RNG)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
