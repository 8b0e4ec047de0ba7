"""Training a feature-level draft head (EAGLE) from teacher shards that hold the target's
features (`draftlm teacher --features`).

The head starts as a piece of its target: its layer is the target's last decoder layer
(with the MLP cut to the `intermediate_size` neurons that carry the most weight), its
norm is the target's final norm, its output rows are the target's head rows for the
tokens frequent in the corpus (FR-Spec), and fc passes the feature through unchanged
while the token half starts small. Training then teaches it what EAGLE's loss asks: the
next feature (smooth L1 regression, as EAGLE) and the target's next-token distribution
(the distillation losses of `training.distill`), with uniform noise on the input
features so that drafting from its own, imperfect guesses stays on track.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from draftlm.errors import DraftlmError
from draftlm.load import float_weights, load
from draftlm.speculative.feature_head import FeatureHead, head_config
from draftlm.training.distill import distill_loss
from draftlm.training.teacher import TeacherWindows


def _strongest_neurons(gate: Tensor, up: Tensor, down: Tensor, keep: int) -> Tensor:
    """Indices of the `keep` MLP neurons with the largest weight norms (the product of
    their gate, up and down norms), in order: a cheap, data-free magnitude pruning."""
    score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    return score.topk(keep).indices.sort().values


def build_feature_head(target: str, head_token_ids: Tensor,
                       intermediate_size: int | None = None, seed: int = 0) -> FeatureHead:
    """A head for `target` initialised from the target's last layer (module docstring)."""
    lm = load(target, dtype="float32")
    config = head_config(lm.config, len(head_token_ids), intermediate_size)
    if not 1 <= config.intermediate_size <= lm.config.intermediate_size:
        raise DraftlmError(f"feature_intermediate_size must be in [1, "
                           f"{lm.config.intermediate_size}], got {config.intermediate_size}")
    last = f"layers.{lm.config.n_layers - 1}."
    names = ["embed_tokens.weight", "lm_head.weight", "norm.weight"]
    weights = float_weights(lm, names)
    layer = {k.removeprefix(last): v.float() for k, v in lm.model.state_dict().items()
             if k.startswith(last)}
    head = FeatureHead(config, weights["embed_tokens.weight"],
                       weights["lm_head.weight"][head_token_ids], head_token_ids)
    keep = _strongest_neurons(layer["mlp.gate_proj.weight"], layer["mlp.up_proj.weight"],
                              layer["mlp.down_proj.weight"], config.intermediate_size)
    layer["mlp.gate_proj.weight"] = layer["mlp.gate_proj.weight"][keep]
    layer["mlp.up_proj.weight"] = layer["mlp.up_proj.weight"][keep]
    layer["mlp.down_proj.weight"] = layer["mlp.down_proj.weight"][:, keep]
    head.body.layers[0].load_state_dict(layer)
    head.body.norm.weight.data.copy_(weights["norm.weight"])
    dim = config.dim
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc = torch.zeros(dim, 2 * dim)
        fc[:, :dim].normal_(0.0, 0.02, generator=generator)  # the token's embedding
        fc[:, dim:] = torch.eye(dim)  # the feature, passed on as it is
        head.fc.weight.copy_(fc)
        head.fc.bias.zero_()
    return head


def feature_head_loss(head: torch.nn.Module, batch: dict[str, Tensor], kind: str,
                      regression_weight: float, noise: float,
                      head_token_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """EAGLE's loss over a batch of teacher windows: head position j reads (h_j + noise,
    x_{j+1}) and is scored on h_{j+1} (smooth L1) and on the target's distribution of
    x_{j+2} (`kind`, as standalone drafts). Returns (loss, parts)."""
    if "features" not in batch:
        raise DraftlmError("the teacher shards hold no target features: compute them with "
                           "`draftlm teacher --features`")
    tokens, features = batch["tokens"], batch["features"].float()
    length = features.shape[1]
    inputs = features[:, : length - 1]
    if noise > 0 and head.training:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * noise
    guess, logits = head(tokens[:, 1:length], inputs)
    regression = F.smooth_l1_loss(guess.float(), features[:, 1:])
    distill = distill_loss(kind, logits, batch["topk_ids"][:, 1:].long(),
                           batch["topk_logprobs"][:, 1:], tokens[:, 2:], head_token_ids)
    return distill + regression_weight * regression, {"regression": regression.detach(),
                                                      "distill": distill.detach()}


@torch.no_grad()
def evaluate_feature_head(head: torch.nn.Module, folder: str, windows: int, kind: str,
                          regression_weight: float,
                          head_token_ids: Tensor) -> dict[str, Any] | None:
    """Loss parts and the greedy match (the head's top token == the target's, one step
    from true features: the first drafted token's acceptance) over the first `windows`
    windows of a held-out teacher folder."""
    data = TeacherWindows(folder)
    was_training = head.training
    head.eval()
    totals = {"val_loss": 0.0, "val_regression": 0.0, "val_greedy_match": 0.0}
    count = min(windows, data.num_windows)
    for index in range(count):
        window = {k: v[None].to(head_token_ids.device) for k, v in data.read(index).items()}
        loss, parts = feature_head_loss(head, window, kind, regression_weight, 0.0,
                                        head_token_ids)
        length = window["features"].shape[1]
        _, logits = head(window["tokens"][:, 1:length], window["features"][:, :-1].float())
        chosen = head_token_ids[logits.argmax(-1)]
        totals["val_loss"] += float(loss)
        totals["val_regression"] += float(parts["regression"])
        totals["val_greedy_match"] += float(
            (chosen == window["topk_ids"][:, 1:, 0]).float().mean())
    head.train(was_training)
    if count == 0:
        return None
    return {k: v / count for k, v in totals.items()}
