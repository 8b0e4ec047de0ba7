"""Feature-level draft heads (EAGLE): trained from teacher shards with the target's
features through the one trainer, saved and loaded on their target, drafting exactly
(greedy output equals plain greedy), and refusing what does not fit in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, make_tiny_lm, permuted_byte_tokenizer

from draftlm.data.prepare import prepare
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.generate import generate
from draftlm.load import LM, load
from draftlm.options import DraftOptions, LoadOptions
from draftlm.speculative.factory import drafter_from_options
from draftlm.speculative.feature_head import (
    FeatureDrafter,
    FeatureHead,
    is_feature_head,
    load_feature_head,
)
from draftlm.training.config import TrainConfig
from draftlm.training.metrics import read_metrics
from draftlm.training.teacher import TeacherWindows, compute_teacher
from draftlm.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

CODE = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
PROMPT = "def f12(x):\n    return x"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny target, teacher shards with its features (train and held out), and a head
    trained on them for 30 steps."""
    root = tmp_path_factory.mktemp("feature-head")
    (root / "code.txt").write_text(CODE)
    prepare([str(root / "code.txt")], str(root / "data"), byte_tokenizer(), val_fraction=0.0,
            progress=False, workers=1)
    # A target that has learnt the corpus a little (a random one has no pattern to draft).
    pretrained = train(TrainConfig(
        model="tiny", model_overrides={"n_layers": 3, "eos_ids": []},
        data=[{"path": str(root / "data")}], out_dir=str(root / "pretrain"), seq_len=64,
        micro_batch_size=4, global_batch_tokens=256, max_steps=60, lr=1e-2, min_lr=1e-3,
        warmup_steps=5, eval_interval=0, save_interval=1000, precision="fp32", device="cpu",
        tensorboard=False, log_interval=10), progress=False)
    target = load(pretrained["export"], dtype="float32")
    save_hf_folder(root / "target", target.config, target.model, target.tokenizer)
    for name, seed in (("teacher", 0), ("val-teacher", 9)):
        compute_teacher(str(root / "target"), str(root / "data"), str(root / name),
                        num_windows=24 if seed == 0 else 4, seq_len=32, top_k=8,
                        dtype="float32", seed=seed, progress=False, features=True)
    compute_teacher(str(root / "target"), str(root / "data"), str(root / "plain-teacher"),
                    num_windows=4, seq_len=32, top_k=8, dtype="float32", progress=False)
    out = root / "head"
    summary = train(head_config(root, out, max_steps=30, export=True, eval_interval=15),
                    progress=False)
    return {"root": root, "target": root / "target", "out": out, "head": Path(summary["export"])}


def head_config(root: Path, out: Path, **changes) -> TrainConfig:
    values = dict(teacher=str(root / "teacher"), val_teacher=str(root / "val-teacher"),
                  draft_kind="feature-head", head_vocab_size=96, feature_intermediate_size=64,
                  out_dir=str(out), seq_len=32, micro_batch_size=2, global_batch_tokens=128,
                  max_steps=30, lr=1e-2, min_lr=1e-3, warmup_steps=2, log_interval=1,
                  feature_regression=1.0,
                  eval_interval=0, eval_sequences=4, save_interval=100, precision="fp32",
                  device="cpu", tensorboard=False, export=False, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def target_lm(trained, **kw) -> LM:
    return load(str(trained["target"]), dtype="float32", **kw)


# ---- teacher shards with features ---------------------------------------------------------
def test_teacher_features_are_the_targets_last_hidden_states(trained) -> None:
    data = TeacherWindows(trained["root"] / "teacher")
    assert data.spec.features
    window = data.read(3)
    target = target_lm(trained)
    with torch.no_grad():
        hidden = target.model.features(window["tokens"][None, :-1])[0]
        top = torch.log_softmax(target.model.lm_head(hidden), -1).topk(8, -1)
    assert window["features"].dtype == torch.bfloat16
    torch.testing.assert_close(window["features"].float(), hidden, atol=2e-2, rtol=1e-2)
    assert torch.equal(window["topk_ids"].long(), top.indices)
    # A folder made without features cannot be continued with them (other settings).
    with pytest.raises(DraftlmError, match="other settings"):
        compute_teacher(str(trained["target"]), str(trained["root"] / "data"),
                        str(trained["root"] / "plain-teacher"), num_windows=4, seq_len=32,
                        top_k=8, dtype="float32", progress=False, features=True)


# ---- training -------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_raises_the_held_out_match(trained) -> None:
    records = read_metrics(trained["out"] / "metrics.jsonl")
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sum(loss[s] for s in (28, 29, 30)) < 0.7 * sum(loss[s] for s in (1, 2, 3))
    val = [r for r in records if "val_greedy_match" in r]
    assert [r["step"] for r in val] == [0, 15, 30]
    assert val[-1]["val_greedy_match"] > val[0]["val_greedy_match"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    start = next(r for r in records if r.get("event") == "start")
    assert start["parameters"] < 0.5 * make_tiny_lm(n_layers=3).model.num_parameters()


def test_the_saved_head_holds_only_its_own_weights(trained) -> None:
    folder = trained["head"]
    assert is_feature_head(folder) and not is_feature_head(trained["target"])
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "draftlm-feature-head" and meta["model"]["n_layers"] == 1
    from safetensors.torch import load_file
    names = set(load_file(str(folder / "model.safetensors")))
    assert "fc.weight" in names and "body.head_token_ids" in names
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    head = load_feature_head(folder, target_lm(trained))
    assert isinstance(head, FeatureHead) and head.config.intermediate_size == 64
    assert len(head.head_token_ids) == 96


def test_resume_continues_exactly(trained, tmp_path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(head_config(trained["root"], whole, max_steps=6, save_interval=3), progress=False)
    train(head_config(trained["root"], split, max_steps=6, save_interval=3), stop_at=3,
          progress=False)
    train(head_config(trained["root"], split, max_steps=6, save_interval=3), resume=True,
          progress=False)
    a = {r["step"]: r["loss"] for r in read_metrics(whole / "metrics.jsonl") if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(split / "metrics.jsonl") if "loss" in r}
    assert b[6] == pytest.approx(a[6], rel=1e-5)


def test_recipe_errors_are_one_line(trained, tmp_path) -> None:
    root = trained["root"]
    with pytest.raises(DraftlmError, match="holds no target features"):
        train(head_config(root, tmp_path / "a", teacher=str(root / "plain-teacher")),
              progress=False)
    with pytest.raises(DraftlmError, match="draft_kind must be one of"):
        train(head_config(root, tmp_path / "b", draft_kind="medusa"), progress=False)
    with pytest.raises(DraftlmError, match="leave `init`"):
        train(head_config(root, tmp_path / "c", init=str(trained["target"])), progress=False)


# ---- drafting -------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_feature_drafting_equals_plain_greedy(trained, quantize, k) -> None:
    target = target_lm(trained)
    expected = generate(target, PROMPT, max_new_tokens=40).token_ids
    head = load_feature_head(trained["head"], target, quantize)
    result = generate(target, PROMPT, max_new_tokens=40,
                      drafter=FeatureDrafter(head, target, k, adaptive=False))
    assert result.token_ids == expected
    stats = result.stats
    assert 0 < stats["num_accepted"] < stats["num_drafted"]
    assert stats["drafter"] == "head:feature-head"


def test_one_token_prompts_and_sampling(trained) -> None:
    target = target_lm(trained)
    drafter = drafter_from_options(target, DraftOptions(draft=str(trained["head"]),
                                                        num_draft_tokens=3))
    assert isinstance(drafter, FeatureDrafter)
    assert generate(target, "d", max_new_tokens=12, drafter=drafter).token_ids == \
        generate(target, "d", max_new_tokens=12).token_ids
    runs = [generate(target, PROMPT, max_new_tokens=24, temperature=1.0, seed=s,
                     drafter=drafter).token_ids for s in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]
    # Ending drafts at unsure tokens drafts less, and changes nothing of the output.
    unsure = drafter_from_options(target, DraftOptions(draft=str(trained["head"]),
                                                       num_draft_tokens=3, adaptive=False,
                                                       min_confidence=0.99))
    short = generate(target, PROMPT, max_new_tokens=24, drafter=unsure)
    full = generate(target, PROMPT, max_new_tokens=24, drafter=drafter)
    assert short.token_ids == full.token_ids
    assert short.stats["num_drafted"] < 3 * short.stats["target_forwards"]


def test_a_head_refuses_another_target(trained, tmp_path) -> None:
    folder = trained["head"]
    wider = make_tiny_lm(seed=0, n_layers=3, dim=96, n_heads=4, n_kv_heads=2)
    with pytest.raises(DraftlmError, match="hidden size"):
        load_feature_head(folder, wider)
    other = make_tiny_lm(seed=0, n_layers=3)
    other.tokenizer = permuted_byte_tokenizer()
    with pytest.raises(DraftlmError, match="another tokenizer"):
        load_feature_head(folder, other)
    deeper = make_tiny_lm(seed=0, n_layers=4)
    with pytest.raises(DraftlmError, match="was trained for"):
        load_feature_head(folder, deeper)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(DraftlmError, match="damaged"):
        load_feature_head(broken, target_lm(trained))
    with pytest.raises(DraftlmError, match="cross-tokenizer"):
        drafter_from_options(target_lm(trained), DraftOptions(draft=str(folder),
                                                              cross_tokenizer=True),
                             LoadOptions())


# ---- teacher-forced acceptance -------------------------------------------------------------
def test_eval_acceptance_scores_a_head_from_true_features(trained, tmp_path) -> None:
    """`draftlm eval acceptance --draft HEAD`: the first drafted token's agreement, which
    training raised above what the untrained head (the target's last layer) reaches."""
    from draftlm.eval.acceptance import cmd_acceptance

    text = tmp_path / "held.py"
    text.write_text(CODE[-3000:])
    args = dict(target=str(trained["target"]), files=[str(text)], window=128,
                timing_steps=2, timing_context=16, max_draft_tokens=4)
    trained_report = cmd_acceptance(draft=str(trained["head"]), json_output=True, **args)
    untrained = train(head_config(trained["root"], tmp_path / "untrained", max_steps=1,
                                  lr=1e-9, min_lr=1e-9, warmup_steps=1, export=True),
                      progress=False)["export"]
    untrained_report = cmd_acceptance(draft=untrained, json_output=True, **args)
    assert trained_report["draft"] == "final" and trained_report["num_positions"] > 500
    assert trained_report["greedy_match"] > untrained_report["greedy_match"] + 0.2
    assert 0 < trained_report["cost_ratio"] and len(trained_report["speedup"]["alpha"]) == 4


# ---- heads shipped in draftlm/trained -------------------------------------------------------
def test_a_damaged_shipped_file_is_refused(trained, tmp_path) -> None:
    from draftlm.formats.registry import sha256_file
    from draftlm.speculative.feature_head import verify_checksums

    folder = tmp_path / "shipped"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((trained["head"] / name).read_bytes())
    (folder / "SHA256SUMS").write_text("".join(
        f"{sha256_file(folder / n)}  {n}\n" for n in ("config.json", "model.safetensors")))
    verify_checksums(folder)
    load_feature_head(folder, target_lm(trained))
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DraftlmError, match="does not match its SHA-256"):
        load_feature_head(folder, target_lm(trained))
    (folder / "model.safetensors").unlink()
    with pytest.raises(DraftlmError, match="is missing"):
        verify_checksums(folder)


SHIPPED = sorted(__import__("draftlm.speculative.feature_head", fromlist=["x"])
                 .trained_heads().items())


@pytest.mark.parametrize(("name", "folder"), SHIPPED, ids=[n for n, _ in SHIPPED])
def test_shipped_heads_are_whole_and_documented(name, folder) -> None:
    """Each head in draftlm/trained: its checksums match, it fits the 64 MB budget, and its
    recipe, data manifest and training summary are there, naming a registry target."""
    from draftlm.formats.registry import REAL_MODELS
    from draftlm.speculative.feature_head import head_folder, read_head_config, verify_checksums

    assert head_folder(name) == folder
    verify_checksums(folder)
    listed = {line.split("  ")[1] for line in (folder / "SHA256SUMS").read_text().splitlines()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "data.json",
            "training.json"} <= listed
    assert (folder / "model.safetensors").stat().st_size <= 64 << 20
    meta = read_head_config(folder)
    assert meta["target"] in REAL_MODELS
    summary = json.loads((folder / "training.json").read_text())
    assert summary["loss_last"] < summary["loss_first"]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize(("name", "folder"), SHIPPED, ids=[n for n, _ in SHIPPED])
def test_shipped_heads_draft_exactly_for_their_target(name, folder) -> None:
    from draftlm.formats.registry import is_installed
    from draftlm.speculative.feature_head import read_head_config

    target_name = read_head_config(folder)["target"]
    if not is_installed(target_name):
        pytest.skip(f"{target_name} is not installed (pip install 'draftlm[models]')")
    target = load(target_name, quantize="int8")
    drafter = drafter_from_options(target, DraftOptions(draft=name, num_draft_tokens=4))
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    result = generate(target, prompt, max_new_tokens=48, drafter=drafter)
    assert result.token_ids == generate(target, prompt, max_new_tokens=48).token_ids
    assert result.stats["acceptance_rate"] > 0.3
