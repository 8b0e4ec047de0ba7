"""Feature-level draft heads (EAGLE, Li et al. 2024): draft from the target's own features.

A standalone draft has to rebuild, from tokens alone, what the target already knows. EAGLE
drafts from what the target computed: its last hidden state h_t (the normalised features its
output head reads) together with the embedding of the token that followed, x_{t+1}. One
decoder layer maps fc([e(x_{t+1}); h_t]) to a guess of h_{t+1}, and the target's own output
head turns that guess into the next token's distribution. Drafting k tokens feeds the
head's guesses back as features; after verification the target's true features of the
accepted tokens replace them. The head is one layer of the target's width, so it costs a
few percent of a target step, and the target's frozen embedding and (truncated, FR-Spec)
output head are borrowed, not stored: a trained head is tens of megabytes.

A head folder holds `config.json` (format `draftlm-feature-head`: the layer's
`ModelConfig`, the target's name and fingerprints) and `model.safetensors` (fc, the layer,
the final norm, and `head_token_ids`, the target tokens its output rows score).
Verification stays exact: the drafter proposes tokens and their q like any other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.formats.registry import sha256_file
from draftlm.load import LM, float_weights, target_fingerprint
from draftlm.model import Transformer
from draftlm.quant.layers import quantize_model
from draftlm.sampling import SamplingParams, logits_to_probs, sample
from draftlm.speculative.drafters import Draft, Drafter, fit_vocab

FORMAT = "draftlm-feature-head"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "SHA256SUMS"
# Heads that draftlm trained and ships (no machine here can download one): a folder each,
# named as `--draft` takes it, with its recipe, data manifest and checksums.
TRAINED_DIR = Path(__file__).resolve().parents[1] / "trained"


def trained_heads() -> dict[str, Path]:
    """Name -> folder of every head shipped in `draftlm/trained`."""
    if not TRAINED_DIR.is_dir():
        return {}
    return {f.name: f for f in sorted(TRAINED_DIR.iterdir()) if (f / CONFIG_FILE).is_file()}


def head_folder(source: str | Path) -> Path:
    """The folder of a head given by path, or by the name of a shipped one."""
    path = Path(source).expanduser()
    if not path.exists() and str(source) in trained_heads():
        return trained_heads()[str(source)]
    return path


def verify_checksums(folder: Path) -> None:
    """Check the files a `SHA256SUMS` lists (a shipped head has one): a damaged or
    replaced file is refused in one line instead of drafting garbage."""
    sums = folder / CHECKSUMS_FILE
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if not name:
            continue
        path = folder / name
        if not path.is_file():
            raise DraftlmError(f"{path} is missing (listed in {sums})")
        if sha256_file(path) != digest:
            raise DraftlmError(f"{path} does not match its SHA-256 in {sums}: the file is "
                               "damaged; restore it (git checkout) or reinstall draftlm")


class Borrowed(nn.Module):
    """A target's weight used as it is: no gradient, and not part of the head's state (a
    non-persistent buffer), so checkpoints and the saved head leave it out."""

    def __init__(self, weight: Tensor, embedding: bool) -> None:
        super().__init__()
        self.embedding = embedding
        self.register_buffer("weight", weight.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.embedding:
            return F.embedding(x, self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight)


class FeatureHead(nn.Module):
    """`forward(ids [B, T], features [B, T, dim]) -> (features [B, T, dim], logits [B, T, H])`:
    at position t the input is the target's feature h_t and the next token x_{t+1}; the
    output guesses h_{t+1} and scores x_{t+2} over the head's H tokens.

    `body` is a one-layer `Transformer` (its KV cache, rollback and rope serve the drafter)
    whose embedding and output head are the target's, borrowed."""

    def __init__(self, config: ModelConfig, embed_weight: Tensor, head_weight: Tensor,
                 head_token_ids: Tensor) -> None:
        super().__init__()
        if config.head_vocab_size != len(head_token_ids) or len(head_weight) != len(
                head_token_ids):
            raise DraftlmError("a feature head's output rows and token ids differ in number")
        self.config = config
        self.fc = nn.Linear(2 * config.dim, config.dim, bias=True)
        with torch.device("meta"):
            body = Transformer(config)
        body.layers.to_empty(device="cpu")
        body.norm.to_empty(device="cpu")
        body.embed_tokens = Borrowed(embed_weight, embedding=True)
        body.lm_head = Borrowed(head_weight, embedding=False)
        body.register_buffer("head_token_ids", head_token_ids.to(torch.long).clone())
        self.body = body

    @property
    def head_token_ids(self) -> Tensor:
        return self.body.head_token_ids

    def num_parameters(self) -> int:
        """The head's own parameters (the borrowed target weights are buffers)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, features: Tensor,
                start_pos: int | None = None) -> tuple[Tensor, Tensor]:
        embeds = self.body.embed_tokens(input_ids).to(features.dtype)
        x = self.fc(torch.cat((embeds, features), dim=-1))
        guess = self.body.features(input_ids, start_pos, embeds=x)
        return guess, self.body.lm_head(guess)


# ---- building, saving, loading ------------------------------------------------------------
def head_config(target: ModelConfig, head_vocab_size: int,
                intermediate_size: int | None = None) -> ModelConfig:
    """The one layer's configuration: the target's width and attention, optionally a
    narrower MLP (the layer's cost and the saved head's size are mostly the MLP)."""
    return target.with_(name=f"{target.name}-feature-head", n_layers=1,
                        intermediate_size=intermediate_size or target.intermediate_size,
                        head_vocab_size=head_vocab_size, tie_embeddings=False)


def save_feature_head(folder: str | Path, head: FeatureHead, target_name: str,
                      fingerprint: str, tokenizer_fingerprint: str,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the head's own weights (in `dtype`) and its config; the folder is replaced
    whole (written beside it, then renamed), so a crash leaves the old one or the new."""
    folder = Path(folder).expanduser()
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in head.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": 1, "model": head.config.to_dict(),
            "target": target_name, "target_fingerprint": fingerprint,
            "tokenizer_fingerprint": tokenizer_fingerprint}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        for path in old.iterdir():
            path.unlink()
        old.rmdir()
    else:
        tmp.rename(folder)
    return folder


def is_feature_head(source: str | Path) -> bool:
    """True for a folder holding a feature head (not a standalone model)."""
    path = head_folder(source) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_head_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder).expanduser() / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DraftlmError(f"{path} is missing or damaged ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise DraftlmError(f"{path} is not a draftlm feature head's config")
    return meta


def load_feature_head(folder: str | Path, target: LM, quantize: str = "none") -> FeatureHead:
    """A saved head on `target`: it borrows the target's embedding and the float rows of
    its output head for `head_token_ids`. Refuses a head made for another target (another
    tokenizer, another hidden size, another model) in one line."""
    folder = head_folder(folder)
    meta = read_head_config(folder)
    verify_checksums(folder)
    config = ModelConfig.from_dict(meta["model"])
    if meta.get("tokenizer_fingerprint") != target.tokenizer.fingerprint:
        raise DraftlmError(f"feature head {folder} was trained for another tokenizer than "
                           f"target {target.name}'s (it was made for {meta.get('target')})")
    if config.dim != target.config.dim:
        raise DraftlmError(f"feature head {folder} reads features of size {config.dim}, but "
                           f"target {target.name} has hidden size {target.config.dim}")
    if meta.get("target_fingerprint") != target_fingerprint(target):
        raise DraftlmError(f"feature head {folder} was trained for {meta.get('target')}, not "
                           f"for target {target.name}")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as err:
        raise DraftlmError(f"{folder / WEIGHTS_FILE} is missing or damaged ({err})") from err
    ids = tensors.get("body.head_token_ids")
    if ids is None or len(ids) != config.head_vocab_size or int(ids.max()) >= (
            target.config.vocab_size):
        raise DraftlmError(f"{folder / WEIGHTS_FILE} has no valid head_token_ids")
    head_rows = float_weights(target, ["lm_head.weight"])["lm_head.weight"][ids]
    dtype = target.dtype
    head = FeatureHead(config, target.model.embed_tokens.weight, head_rows.to(dtype), ids)
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise DraftlmError(f"{folder / WEIGHTS_FILE} does not fit its config "
                           f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    head = head.to(device=target.device, dtype=dtype).eval().requires_grad_(False)
    head.body.head_token_ids = ids.to(target.device)
    if quantize != "none":
        # The output rows are the head's biggest matrix: a plain layer, so they quantize too.
        linear = nn.Linear(config.dim, len(ids), bias=False)
        linear.weight = nn.Parameter(head.body.lm_head.weight, requires_grad=False)
        head.body.lm_head = linear
        quantize_model(head, quantize)
    return head


class HeadStep:
    """A head's one-token cached step as a decoder (`setup_cache`, `rollback`,
    `clear_cache`, `__call__(ids, start_pos)`), fed zero features: what timing a draft
    step needs, at a drafting step's cost."""

    def __init__(self, head: FeatureHead) -> None:
        self.head = head

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> None:
        self.head.body.setup_cache(batch_size, max_seq_len)

    def rollback(self, length: int) -> None:
        self.head.body.rollback(length)

    def clear_cache(self) -> None:
        self.head.body.clear_cache()

    def __call__(self, input_ids: Tensor, start_pos: int) -> Tensor:
        weight = self.head.body.embed_tokens.weight
        features = torch.zeros(*input_ids.shape, self.head.config.dim, dtype=weight.dtype,
                               device=weight.device)
        return self.head(input_ids, features, start_pos=start_pos)[1]


# ---- drafting -----------------------------------------------------------------------------
class FeatureDrafter(Drafter):
    """Drafts with a `FeatureHead` from the target's features.

    The engine hands over the target's features of every position it has verified
    (`observe`); head position j reads (h_j, x_{j+1}), so with the context x_0..x_{m-1}
    and features up to h_{m-2} the head catches up on the positions it has not read and
    its last output scores x_m. Each further draft token feeds the head its own guess of
    the feature; those cache entries are overwritten next round (an implicit rollback)."""

    wants_features = True

    def __init__(self, head: FeatureHead, target: LM, num_draft_tokens: int = 5,
                 adaptive: bool = True, min_confidence: float | None = None,
                 name: str = "feature-head") -> None:
        super().__init__(num_draft_tokens, adaptive)
        self.head = head
        self.name = f"head:{name}"
        self.target_vocab_size = target.config.vocab_size
        self.min_confidence = min_confidence
        self._features: Tensor | None = None  # [capacity, dim]: the target's, by position
        self._known = 0  # positions whose target features are in _features
        self._read = 0  # positions the head's cache holds from true features
        self._capacity = 0

    def begin(self, prompt_ids: Sequence[int], cache_len: int, device: torch.device) -> None:
        super().begin(prompt_ids, cache_len, device)
        self._capacity = min(cache_len, self.head.config.max_seq_len)
        self.head.body.setup_cache(1, self._capacity)
        dtype = self.head.body.embed_tokens.weight.dtype
        self._features = torch.empty(self._capacity, self.head.config.dim, dtype=dtype,
                                     device=device)
        self._known = self._read = 0

    def observe(self, start_pos: int, features: Tensor) -> None:
        """The target's features [n, dim] of positions start_pos.. (now verified)."""
        assert self._features is not None, "begin() first"
        end = min(start_pos + len(features), self._capacity)
        self._features[start_pos:end] = features[: max(0, end - start_pos)]
        self._known = end  # what lay beyond was computed for tokens since rejected
        self._read = min(self._read, start_pos)

    def propose(
        self, context_ids: Sequence[int], max_tokens: int, params: SamplingParams,
        generator: torch.Generator,
    ) -> Draft:
        assert self._features is not None, "begin() first"
        m = len(context_ids)
        end = min(self._known, m - 1)  # head positions [0, end) have true inputs
        # Position end - 1 + i of the head drafts token i; stay inside its cache.
        k = min(max_tokens, self._capacity - end + 1)
        if end < 1 or k < 1:
            return Draft.empty(self.device)
        start = min(self._read, end - 1)
        ids = torch.tensor([context_ids[start + 1 : end + 1]], device=self.device)
        guess, logits = self.head(ids, self._features[None, start:end], start_pos=start)
        self._read = end
        guess, logits = guess[0, -1:], logits[0, -1]
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        head_ids = self.head.head_token_ids
        for i in range(k):
            if params.greedy:
                # The head's rows are the only tokens it can propose: no full-vocabulary row.
                token = head_ids[logits.argmax(-1)]
            else:
                q = logits_to_probs(fit_vocab(logits.float(), self.target_vocab_size, head_ids),
                                    params)
                token = sample(q, generator)
                probs.append(q)
            tokens.append(token)
            if i == k - 1:
                break
            if self.min_confidence is not None:
                top = probs[-1].max() if probs else logits.float().softmax(-1).max()
                if float(top) < self.min_confidence:
                    break
            guess, logits = self.head(token.view(1, 1), guess[None], start_pos=end + i)
            guess, logits = guess[0], logits[0, -1]
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None)
