"""Drafts built for a target: a smaller sibling pruned to a few layers, with a head over the
tokens that matter.

A draft has to cost about a twentieth of a target step and still agree with it. Two cheap
levers shape one from a pretrained sibling of the target (same tokenizer):

- layers: keep a few of the sibling's blocks (`layers`), the way layer-dropping
  compression does; distillation then teaches the remaining blocks to stand in for the
  dropped ones. Width stays, so every kept weight starts trained.
- head: FR-Spec (Zhao et al. 2025) restricts the draft's output head to the tokens that
  are frequent in the target domain. A 151,936-token head is most of a small draft's
  per-token cost; 32,768 frequent code tokens cover nearly all the target's choices, and
  verification stays exact because the draft's q is zero on the other tokens and the
  residual distribution covers them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from draftlm.errors import DraftlmError
from draftlm.model import Transformer


def token_counts(windows: Iterable[Tensor], vocab_size: int) -> Tensor:
    """How often each token id occurs in `windows` (int64 [vocab_size])."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for window in windows:
        ids = window.reshape(-1).numpy()
        counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return torch.from_numpy(counts)


def frequent_tokens(counts: Tensor, size: int, always: Sequence[int] = ()) -> Tensor:
    """The `size` most frequent ids (ties to the lower id), always including `always`
    (end-of-generation tokens: a draft that cannot propose them cannot stop), sorted."""
    if not 1 <= size <= len(counts):
        raise DraftlmError(f"head_vocab_size must be in [1, {len(counts)}], got {size}")
    forced = sorted({int(t) for t in always if 0 <= int(t) < len(counts)})
    if len(forced) > size:
        raise DraftlmError(f"head_vocab_size {size} cannot hold the {len(forced)} "
                           "end-of-generation tokens")
    score = counts.double().clone()
    score[forced] = float("inf")
    # Stable descending sort: equal counts keep id order, so the choice is deterministic.
    order = torch.sort(-score, stable=True).indices
    return order[:size].sort().values


def prune(model: Transformer, layers: Sequence[int] | None = None,
          head_token_ids: Tensor | None = None) -> Transformer:
    """A new model holding `model`'s blocks `layers` (in that order) and a head over
    `head_token_ids` (rows of its head, or of the embedding when tied). The embedding stays
    whole: the draft reads every token of the target's context."""
    config = model.config
    keep = list(range(config.n_layers)) if layers is None else [int(i) for i in layers]
    if not keep or any(not 0 <= i < config.n_layers for i in keep):
        raise DraftlmError(f"layers to keep must be in [0, {config.n_layers - 1}], got {keep}")
    if len(set(keep)) != len(keep):
        raise DraftlmError(f"layers to keep repeat a layer: {keep}")
    changes: dict = {"n_layers": len(keep), "name": f"{config.name}-draft"}
    if head_token_ids is not None:
        if model.head_token_ids is not None:
            raise DraftlmError("the model's head is truncated already")
        changes.update(head_vocab_size=len(head_token_ids), tie_embeddings=False)
    pruned = Transformer(config.with_(**changes))
    source = model.state_dict()
    target = pruned.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                tensor.copy_(source[f"layers.{keep[int(index)]}.{rest}"])
            elif name == "lm_head.weight" and head_token_ids is not None:
                head = source.get("lm_head.weight", source["embed_tokens.weight"])
                tensor.copy_(head[head_token_ids])
            elif name == "head_token_ids":
                tensor.copy_(head_token_ids if head_token_ids is not None else source[name])
            else:
                tensor.copy_(source[name])
    return pruned
