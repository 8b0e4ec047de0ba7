"""Drafts trained for a target: pruning and truncated heads, then distillation from teacher
shards through the one trainer (loss falls, exact resume, exports that load)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, make_tiny_lm, noisy_copy

from draftlm.data.loader import PackedTokens
from draftlm.data.prepare import prepare
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.load import load
from draftlm.training.command import export, train_draft
from draftlm.training.config import TrainConfig
from draftlm.training.draft import frequent_tokens, prune, token_counts
from draftlm.training.metrics import read_metrics
from draftlm.training.teacher import compute_teacher
from draftlm.training.trainer import train

CODE = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- shaping a draft ----------------------------------------------------------------------
def test_frequent_tokens_keep_the_most_common_and_the_stop_tokens() -> None:
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    assert frequent_tokens(counts, 3).tolist() == [2, 3, 5]
    assert frequent_tokens(counts, 3, always=[1]).tolist() == [1, 2, 3]
    with pytest.raises(DraftlmError, match="head_vocab_size must be in"):
        frequent_tokens(counts, 7)
    windows = [torch.tensor([[1, 2, 2]]), torch.tensor([2, 5])]
    assert token_counts(windows, 6).tolist() == [0, 1, 3, 0, 0, 1]


def test_prune_keeps_the_chosen_blocks_and_head_rows() -> None:
    lm = make_tiny_lm(seed=2, n_layers=3)
    ids = torch.tensor([0, 3, 97, 255])
    draft = prune(lm.model, [2, 0], ids)
    assert draft.config.n_layers == 2 and draft.config.head_vocab_size == 4
    assert torch.equal(draft.layers[0].mlp.up_proj.weight, lm.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(draft.layers[1].self_attn.q_proj.weight,
                       lm.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(draft.lm_head.weight, lm.model.lm_head.weight[ids])
    assert torch.equal(draft.head_token_ids, ids)
    # All blocks kept and the whole head: the same function as the model.
    same = prune(lm.model, None, torch.arange(256))
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(same(tokens), lm.model(tokens))
    for bad, message in (([3], "must be in"), ([0, 0], "repeat")):
        with pytest.raises(DraftlmError, match=message):
            prune(lm.model, bad)


# ---- distillation end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    (root / "code.txt").write_text(CODE)
    prepare([str(root / "code.txt")], str(root / "data"), byte_tokenizer(), val_fraction=0.0,
            progress=False, workers=1)
    target = make_tiny_lm(seed=0, n_layers=3)
    save_hf_folder(root / "target", target.config, target.model, target.tokenizer)
    # A sibling: the target's weights plus noise (pruned below to two of its three blocks).
    sibling = noisy_copy(target, noise=0.3)
    save_hf_folder(root / "sibling", sibling.config, sibling.model, sibling.tokenizer)
    compute_teacher(str(root / "target"), str(root / "data"), str(root / "teacher"),
                    num_windows=24, seq_len=32, top_k=8, dtype="float32", progress=False)
    return {"root": root, "teacher": root / "teacher", "sibling": root / "sibling",
            "target": root / "target", "data": root / "data"}


def draft_config(shards, out: Path, **changes) -> TrainConfig:
    values = dict(init=str(shards["sibling"]), teacher=str(shards["teacher"]),
                  init_layers=[0, 2], head_vocab_size=64, out_dir=str(out), seq_len=32,
                  micro_batch_size=2, global_batch_tokens=128, max_steps=16, lr=3e-3,
                  min_lr=3e-4, warmup_steps=2, log_interval=1, eval_interval=0,
                  save_interval=100, precision="fp32", device="cpu", tensorboard=False,
                  export=False, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize(("kind", "lr", "factor"), [("fkl", 3e-3, 0.7), ("tvd", 1e-2, 0.9)])
def test_distillation_moves_the_draft_towards_the_target(shards, tmp_path, kind, lr,
                                                         factor) -> None:
    out = tmp_path / kind
    summary = train(draft_config(shards, out, distill_loss=kind, export=True, max_steps=24,
                                 lr=lr), progress=False)
    curve = losses(out)
    assert sum(curve[s] for s in (22, 23, 24)) < factor * sum(curve[s] for s in (1, 2, 3))
    draft = load(summary["export"], dtype="float32")
    assert draft.config.n_layers == 2 and draft.config.head_vocab_size == 64
    assert draft.model.head_token_ids.dtype == torch.int64  # ids, whatever the weights' dtype
    assert 0 in draft.model.head_token_ids.tolist()  # the tiny tokenizer's end of text
    # The head holds the corpus' most frequent tokens, counted over the teacher's source.
    source = PackedTokens(shards["data"], "train")
    counts = token_counts([torch.from_numpy(source.read(0, source.num_tokens))], 256)
    assert torch.equal(draft.model.head_token_ids, frequent_tokens(counts, 64, [0]))


def test_validation_scores_a_truncated_head_over_its_tokens(shards, tmp_path) -> None:
    """The next-token loss of a draft with a 64-token head skips the data's other tokens
    (they were an index error) and falls as the draft trains."""
    (shards["root"] / "held.txt").write_text(CODE[:4000])
    prepare([str(shards["root"] / "held.txt")], str(shards["root"] / "held"), byte_tokenizer(),
            val_fraction=1.0, progress=False, workers=1)
    out = tmp_path / "val"
    train(draft_config(shards, out, val_data=[str(shards["root"] / "held")], eval_interval=8,
                       eval_sequences=4, max_steps=16), progress=False)
    vals = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]


def test_ce_baseline_trains_on_the_same_windows(shards, tmp_path) -> None:
    train(draft_config(shards, tmp_path / "ce", distill_loss="ce", max_steps=6), progress=False)
    assert len(losses(tmp_path / "ce")) == 6


def test_frozen_embeddings_stay_as_the_sibling_has_them(shards, tmp_path) -> None:
    summary = train(draft_config(shards, tmp_path / "frozen", freeze_embeddings=True,
                                 export=True, max_steps=4), progress=False)
    draft = load(summary["export"], dtype="float32")
    sibling = load(str(shards["sibling"]), dtype="float32")
    assert torch.equal(draft.model.embed_tokens.weight, sibling.model.embed_tokens.weight)
    assert not torch.equal(draft.model.layers[0].mlp.up_proj.weight,
                           sibling.model.layers[0].mlp.up_proj.weight)
    tied = make_tiny_lm(seed=5, tie_embeddings=True)
    save_hf_folder(tmp_path / "tied-sibling", tied.config, tied.model, tied.tokenizer)
    with pytest.raises(DraftlmError, match="untied head"):
        train(draft_config(shards, tmp_path / "tied", init=str(tmp_path / "tied-sibling"),
                           freeze_embeddings=True, head_vocab_size=None, init_layers=None),
              progress=False)


def test_stop_and_resume_gives_the_uninterrupted_losses(shards, tmp_path) -> None:
    train(draft_config(shards, tmp_path / "straight", max_steps=8), progress=False)
    train(draft_config(shards, tmp_path / "cut", max_steps=8), stop_at=4, progress=False)
    train(draft_config(shards, tmp_path / "cut", max_steps=8), resume=True, progress=False)
    straight, cut = losses(tmp_path / "straight"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))
    for step in range(1, 9):
        assert cut[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


def test_train_draft_command_and_gguf_export(shards, tmp_path, capsys) -> None:
    out = tmp_path / "cmd"
    train_draft(teacher=str(shards["teacher"]), init=str(shards["sibling"]), out_dir=str(out),
                init_layers="1", head_vocab_size=32, max_steps=2, seq_len=32,
                micro_batch_size=2, global_batch_tokens=64, device="cpu", precision="fp32",
                set_fields=["tensorboard=false", "eval_interval=0", "save_interval=2",
                            "warmup_steps=1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    step = next((out / "checkpoints").iterdir())
    export(str(step), str(tmp_path / "hf"))
    assert load(str(tmp_path / "hf"), dtype="float32").config.head_vocab_size == 32


def test_bad_draft_recipes_are_one_line_errors(shards, tmp_path) -> None:
    with pytest.raises(DraftlmError, match="differs from the teacher"):
        train(draft_config(shards, tmp_path / "a", seq_len=64), progress=False)
    with pytest.raises(DraftlmError, match="leave `data` out"):
        train(draft_config(shards, tmp_path / "b", data=[{"path": str(shards["data"])}]),
              progress=False)
    with pytest.raises(DraftlmError, match="distill_loss must be one of"):
        train(draft_config(shards, tmp_path / "c", distill_loss="kl"), progress=False)
    with pytest.raises(DraftlmError, match="needs teacher shards"):
        train_draft(init=str(shards["sibling"]), out_dir=str(tmp_path / "d"))
    with pytest.raises(DraftlmError, match="comma-separated"):
        train_draft(teacher=str(shards["teacher"]), init_layers="0;1")
    # Teacher shards made by another target cannot train a draft of another tokenizer.
    other = tmp_path / "other-tokenizer"
    lm = make_tiny_lm(seed=1)
    lm.tokenizer.backend.add_tokens(["<extra>"])
    save_hf_folder(other, lm.config.with_(vocab_size=257), _grown(lm.model), lm.tokenizer)
    with pytest.raises(DraftlmError, match="another tokenizer"):
        train(draft_config(shards, tmp_path / "e", init=str(other)), progress=False)


def _grown(model):
    from draftlm.model import Transformer

    grown = Transformer(model.config.with_(vocab_size=257))
    state = {k: v for k, v in model.state_dict().items()}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat((state[name], state[name][:1]))
    grown.load_state_dict(state)
    return grown


def test_training_flops_count_the_truncated_head_only() -> None:
    from draftlm.config import ModelConfig
    from draftlm.training.metrics import flops_per_token

    full = ModelConfig.from_name("qwen2.5-coder-0.5b").with_(tie_embeddings=False)
    draft = full.with_(head_vocab_size=32768)
    assert flops_per_token(full, 512) - flops_per_token(draft, 512) == 6 * 896 * (151936 - 32768)
