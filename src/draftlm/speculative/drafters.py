"""Drafters: cheap guesses of the target's next tokens, behind one small interface.

A drafter proposes up to k tokens (and, when it samples, the distribution q it drew each
from); `draftlm.speculative` verifies them against the target. Three kinds:

- `ModelDrafter`: a small model with the target's tokenizer (qwen2.5-coder-0.5b drafting
  for -1.5b). A draft vocabulary that is a prefix of the target's (AMD-Llama-135M's 32000
  tokens under CodeLlama's 32016) is fine: its probabilities are padded with zeros.
- `NgramDrafter`: prompt lookup. The last n tokens are searched for earlier in the
  context and whatever followed them there is proposed. No model, nearly free.
- `CrossTokenizerDrafter`: a draft with another tokenizer (smollm2-135m for Qwen). The
  target's context is decoded to text and re-tokenized for the draft, the draft continues
  greedily, and its text is encoded back into target tokens.

Deterministic proposals (n-gram, cross-tokenizer) carry no q: the engine treats q as the
point mass on the proposed token. Rejection sampling with a point-mass proposal is still
exact (accept with probability p(token), else draw from p with that token removed), so
the output keeps exactly the target's distribution whatever the drafter proposes; a
drafter only changes the speed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from draftlm.compile import CompiledDecoder
from draftlm.errors import DraftlmError
from draftlm.load import LM
from draftlm.sampling import SamplingParams, logits_to_probs, sample
from draftlm.tokenizer import Tokenizer


@dataclass
class Draft:
    """Proposed tokens [k] (on the target's device) and the draft probabilities [k, V_target]
    they were drawn from; `probs` None means a deterministic proposal (q = one-hot)."""

    tokens: Tensor
    probs: Tensor | None = None

    @classmethod
    def empty(cls, device: torch.device | str) -> Draft:
        return cls(torch.empty(0, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return self.tokens.numel()


class DraftLengthPolicy:
    """How many tokens to draft next round.

    Fixed: always `num_draft_tokens`. Adaptive (HF transformers' heuristic): +2 after a
    round whose draft was accepted whole, -1 after a rejection, within [1, num_draft_tokens].
    It starts at the maximum, so k in a benchmark names the longest draft."""

    def __init__(self, num_draft_tokens: int, adaptive: bool = True) -> None:
        if num_draft_tokens < 1:
            raise DraftlmError(
                f"the number of draft tokens must be >= 1, got {num_draft_tokens}"
            )
        self.max_length = num_draft_tokens
        self.adaptive = adaptive
        self.length = num_draft_tokens

    def reset(self) -> None:
        self.length = self.max_length

    def update(self, num_drafted: int, num_accepted: int) -> None:
        if not self.adaptive or num_drafted == 0:
            return
        if num_accepted == num_drafted:
            self.length = min(self.length + 2, self.max_length)
        else:
            self.length = max(self.length - 1, 1)


class Drafter(ABC):
    """Proposes continuations of the target's context; knows nothing of acceptance."""

    name: str = "drafter"
    # True for drafters that read the target's features (`observe`): the engine then runs
    # the target's verify passes as `features` + head and hands the features over.
    wants_features: bool = False

    def __init__(self, num_draft_tokens: int, adaptive: bool = True) -> None:
        self.policy = DraftLengthPolicy(num_draft_tokens, adaptive)
        self.device: torch.device = torch.device("cpu")

    def begin(self, prompt_ids: Sequence[int], cache_len: int, device: torch.device) -> None:
        """Start a new generation whose target context holds at most `cache_len` tokens."""
        self.policy.reset()
        self.device = device

    @property
    def draft_length(self) -> int:
        """Tokens to draft next round (the policy's current length)."""
        return self.policy.length

    @property
    def max_draft_length(self) -> int:
        """The longest draft this drafter will ever propose (a verify pass's size bound)."""
        return self.policy.max_length

    def update(self, num_drafted: int, num_accepted: int) -> None:
        """Told after every round how much of the last draft the target kept."""
        self.policy.update(num_drafted, num_accepted)

    def observe(self, start_pos: int, features: Tensor) -> None:  # noqa: B027 (optional)
        """The target's features [n, dim] of positions start_pos.. once they are verified
        (called only when `wants_features`)."""

    @abstractmethod
    def propose(
        self, context_ids: Sequence[int], max_tokens: int, params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        """Up to `max_tokens` (>= 1) tokens to follow `context_ids` (prompt + output)."""


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def vocab_compatible(target: Tokenizer, draft: Tokenizer) -> bool:
    """True when every draft token id means the same token to the target.

    The same tokenizer qualifies, and so does a draft vocabulary that is a prefix of the
    target's (a target that appended a few special tokens)."""
    if target.fingerprint == draft.fingerprint:
        return True
    if draft.vocab_size > target.vocab_size:
        return False
    target_vocab = target.backend.get_vocab(with_added_tokens=True)
    draft_vocab = draft.backend.get_vocab(with_added_tokens=True)
    return all(target_vocab.get(token) == i for token, i in draft_vocab.items())


def fit_vocab(draft_logits: Tensor, vocab_size: int,
              head_token_ids: Tensor | None = None) -> Tensor:
    """Draft logits over the target's `vocab_size` ids, as `ModelDrafter` drafts and
    `draftlm eval acceptance` scores them: ids the
    draft lacks get -inf (its probabilities padded with zeros), ids beyond the target's are
    cut (the engine never proposes them). A truncated head's column i is token
    `head_token_ids[i]`."""
    if head_token_ids is not None:
        keep = head_token_ids < vocab_size
        full = draft_logits.new_full((*draft_logits.shape[:-1], vocab_size), float("-inf"))
        return full.index_copy(-1, head_token_ids[keep], draft_logits[..., keep])
    v = draft_logits.shape[-1]
    if v > vocab_size:
        return draft_logits[..., :vocab_size]
    if v < vocab_size:
        pad = draft_logits.new_full((*draft_logits.shape[:-1], vocab_size - v), float("-inf"))
        return torch.cat((draft_logits, pad), dim=-1)
    return draft_logits


class ModelDrafter(Drafter):
    """A draft model that shares the target's vocabulary and keeps its own KV cache.

    The cache holds a prefix of the context; each round rolls back (O(1)) to the longest
    prefix still valid, feeds what is new, then drafts one token per forward pass."""

    def __init__(
        self, draft: LM, target: LM, num_draft_tokens: int = 5, adaptive: bool = True,
        min_confidence: float | None = None,
    ) -> None:
        super().__init__(num_draft_tokens, adaptive)
        if not vocab_compatible(target.tokenizer, draft.tokenizer):
            raise DraftlmError(
                f"draft {draft.name} has another vocabulary than target {target.name} "
                f"({draft.tokenizer.vocab_size} vs {target.tokenizer.vocab_size} tokens); "
                "use cross-tokenizer drafting (--cross-tokenizer)"
            )
        self.draft = draft
        self.name = f"draft:{draft.name}"
        self.target_vocab_size = target.config.vocab_size
        self.draft_vocab_size = draft.config.vocab_size
        # A truncated head (a draft trained for its target, FR-Spec): row i is this token.
        self.head_token_ids = draft.model.head_token_ids
        # Stop drafting once the draft's top probability falls under this (None: never).
        self.min_confidence = min_confidence
        self._cached: list[int] = []  # tokens whose keys/values sit in the draft's cache
        self._uncommitted: Tensor | None = None  # drafted tokens fed last round, not yet read
        self._capacity = 0

    def begin(self, prompt_ids: Sequence[int], cache_len: int, device: torch.device) -> None:
        super().begin(prompt_ids, cache_len, device)
        self._capacity = min(cache_len, self.draft.config.max_seq_len)
        decoder = self.draft.decoder
        slack = 0
        if isinstance(decoder, CompiledDecoder):
            # After a fully accepted draft the draft model catches up on two tokens (its
            # last draft and the target's bonus token): one small compiled graph.
            decoder.compile_verify(2)
            slack = min(1, self.draft.config.max_seq_len - self._capacity)
        decoder.setup_cache(1, self._capacity + slack)
        self._cached, self._uncommitted = [], None

    def propose(
        self, context_ids: Sequence[int], max_tokens: int, params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        # The draft forwards positions up to len(context) + k - 2.
        k = min(max_tokens, self._capacity - len(context_ids) + 1)
        if k < 1:
            return Draft.empty(self.device)
        if max(context_ids) >= self.draft_vocab_size:
            # A target-only token (say, one of CodeLlama's extra 16): the draft sees token 0
            # instead. Only the proposal suffers; verification stays exact.
            context_ids = [t if t < self.draft_vocab_size else 0 for t in context_ids]
        if self._uncommitted is not None:  # the engine has synced since: this costs nothing
            self._cached += self._uncommitted.tolist()
            self._uncommitted = None
        decoder = self.draft.decoder
        start_pos = min(common_prefix_length(self._cached, context_ids), len(context_ids) - 1)
        decoder.rollback(start_pos)
        feed = torch.tensor([context_ids[start_pos:]], device=self.device)
        logits = decoder(feed, start_pos=start_pos, num_logits=1)[0, -1]
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        for i in range(k):
            logits = fit_vocab(logits.float(), self.target_vocab_size, self.head_token_ids)
            if params.greedy:
                token = logits.argmax(-1)
            else:
                q = logits_to_probs(logits, params)
                token = sample(q, generator)
                probs.append(q)
            tokens.append(token)
            if i == k - 1:
                break
            if self.min_confidence is not None:
                top = probs[-1].max() if probs else logits.softmax(-1).max()
                if float(top) < self.min_confidence:
                    break
            logits = decoder(token.view(1, 1), start_pos=len(context_ids) + i)[0, -1]
        drafted = torch.stack(tokens)
        self._cached = list(context_ids)
        self._uncommitted = drafted[:-1]  # their keys/values are cached now
        # Greedy drafting is deterministic: q is the point mass, which the engine assumes.
        return Draft(drafted, torch.stack(probs) if probs else None)


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from `max_ngram` down to `min_ngram`) and propose the tokens that followed it.

    Code repeats itself (names, signatures, docstring phrases), so this often drafts
    several right tokens for free."""

    def __init__(
        self, max_ngram: int = 3, num_draft_tokens: int = 5, adaptive: bool = True,
        min_ngram: int = 1,
    ) -> None:
        super().__init__(num_draft_tokens, adaptive)
        if max_ngram < 1 or not 1 <= min_ngram <= max_ngram:
            raise DraftlmError(f"n-gram size must be >= 1, got {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"ngram:{max_ngram}"

    def lookup(self, context_ids: Sequence[int], max_tokens: int) -> list[int]:
        ids = np.asarray(context_ids, dtype=np.int64)
        length = len(ids)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            pattern = ids[length - n :]
            # Candidate starts i < length - n whose window ids[i:i+n] equals the pattern.
            starts = np.flatnonzero(ids[: length - n] == pattern[0])
            for i in starts[::-1]:
                if i + n < length and np.array_equal(ids[i : i + n], pattern):
                    return ids[i + n : i + n + max_tokens].tolist()
        return []

    def propose(
        self, context_ids: Sequence[int], max_tokens: int, params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        found = self.lookup(context_ids, max_tokens)
        return Draft(torch.tensor(found, dtype=torch.long, device=self.device))


class CrossTokenizerDrafter(Drafter):
    """A draft model with its own tokenizer, bridged through text.

    Each round: decode the target's context, re-tokenize it for the draft (keeping the
    draft's cache for the longest unchanged token prefix), draft greedily, decode the new
    draft tokens and encode that text with the target's tokenizer. The last target token
    of that text is dropped, since the draft's text may end inside a longer target token.

    Proposals are a deterministic function of the context (q = one-hot), so greedy output
    equals plain greedy decoding and sampled output has exactly the target's distribution
    (rejection sampling against a point mass, see the module docstring)."""

    def __init__(
        self, draft: LM, target: LM, num_draft_tokens: int = 5, adaptive: bool = True,
        tail_tokens: int = 8,
    ) -> None:
        super().__init__(num_draft_tokens, adaptive)
        self.draft = draft
        self.target_tokenizer = target.tokenizer
        self.name = f"cross:{draft.name}"
        self.tail_tokens = tail_tokens
        self._cached: list[int] = []
        self._capacity = 0
        self._eos = set(draft.config.eos_ids) | set(draft.tokenizer.eos_ids)

    def begin(self, prompt_ids: Sequence[int], cache_len: int, device: torch.device) -> None:
        super().begin(prompt_ids, cache_len, device)
        # Re-tokenized text can take more draft tokens than target tokens: leave room.
        self._capacity = min(self.draft.config.max_seq_len, 2 * cache_len + 64)
        self.draft.decoder.setup_cache(1, self._capacity)
        self._cached = []

    def propose(
        self, context_ids: Sequence[int], max_tokens: int, params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        text = self.target_tokenizer.decode(context_ids)
        if not text or text.endswith("\ufffd"):  # ends inside a character: nothing to say
            return Draft.empty(self.device)
        draft_ids = self.draft.tokenizer.encode(text)
        num_steps = max_tokens + 1  # one more: the last target token gets dropped
        if len(draft_ids) + num_steps > self._capacity:
            return Draft.empty(self.device)
        decoder = self.draft.decoder
        start_pos = min(common_prefix_length(self._cached, draft_ids), len(draft_ids) - 1)
        decoder.rollback(start_pos)
        feed = torch.tensor([draft_ids[start_pos:]], device=self.draft.device)
        logits = decoder(feed, start_pos=start_pos, num_logits=1)[0, -1]
        steps: list[Tensor] = []
        for i in range(num_steps):
            steps.append(logits.argmax(-1))
            if i < num_steps - 1:
                logits = decoder(steps[-1].view(1, 1), start_pos=len(draft_ids) + i)[0, -1]
        new = torch.stack(steps).tolist()
        self._cached = draft_ids + new[:-1]
        ended = next((i for i, t in enumerate(new) if t in self._eos), None)
        if ended is not None:
            new = new[:ended]
        proposal = self._to_target(context_ids, draft_ids, new)
        if ended is None:
            proposal = proposal[:-1]
        return Draft(torch.tensor(proposal[:max_tokens], dtype=torch.long, device=self.device))

    def _to_target(
        self, context_ids: Sequence[int], draft_ids: list[int], new: list[int]
    ) -> list[int]:
        """Target tokens that continue `context_ids` with the draft's new text."""
        if not new:
            return []
        anchor = draft_ids[-4:]  # decode with context: SentencePiece drops a leading space
        anchor_text = self.draft.tokenizer.decode(anchor)
        full = self.draft.tokenizer.decode(anchor + new)
        new_text = full[len(anchor_text) :] if full.startswith(anchor_text) else (
            self.draft.tokenizer.decode(new)
        )
        new_text = new_text.rstrip("\ufffd")
        if not new_text:
            return []
        # Encode with the context's tail so merges across the seam come out as the target
        # would tokenize them; when the tail itself re-tokenizes differently, the new text
        # alone is the best guess (still exact: the target verifies whatever we propose).
        tail = list(context_ids[-self.tail_tokens :])
        tok = self.target_tokenizer
        ids = tok.encode(tok.decode(tail) + new_text, add_bos=False)
        if ids[: len(tail)] == tail:
            return ids[len(tail) :]
        return tok.encode(new_text, add_bos=False)
