"""Trainer: loss falls, exact resume, schedule, optimizer groups, recipes, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer

from draftlm.data.prepare import prepare
from draftlm.errors import DraftlmError
from draftlm.training.config import TrainConfig, resolve_config
from draftlm.training.metrics import read_metrics
from draftlm.training.trainer import build_optimizer, lr_at, train

SENTENCES = ["the cat sat on the mat. ", "a dog ran in the park. ", "birds sing at dawn. "]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    docs = [{"text": "".join(SENTENCES[(i + j) % 3] for j in range(i % 4 + 2)) + f"#{i}"}
            for i in range(300)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    prepare([str(root / "docs.jsonl")], str(root / "prepared"), byte_tokenizer(),
            shard_tokens=4096, val_fraction=0.1, workers=1, progress=False)
    return root / "prepared"


def tiny_config(dataset: Path, out: Path, **changes) -> TrainConfig:
    values = dict(model="tiny", data=[{"path": str(dataset)}], out_dir=str(out), seq_len=32,
                  micro_batch_size=4, global_batch_tokens=256, max_steps=12, lr=3e-3,
                  min_lr=3e-4, warmup_steps=3, log_interval=1, eval_interval=6,
                  eval_sequences=16, save_interval=100, precision="fp32", device="cpu",
                  tensorboard=False, export=False, seed=1)
    values.update(changes)
    return TrainConfig(**values)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_loss_falls_and_run_exports_a_loadable_model(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(dataset, tmp_path / "run", max_steps=40, eval_interval=20, export=True,
                      global_batch_tokens=128)
    summary = train(cfg, progress=False)
    curve = losses(tmp_path / "run")
    assert curve[40] < curve[1] - 2.0  # from ~ln(256) = 5.5 toward the repeated sentences
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if "val_loss" in r]
    assert len(vals) == 3 and vals[2] < vals[1] < vals[0]  # steps 0, 20, 40
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    from draftlm.load import load

    lm = load(summary["export"], dtype="float32")
    ids = torch.tensor([byte_tokenizer().encode("the cat sat on")])
    assert lm.tokenizer.fingerprint == byte_tokenizer().fingerprint or lm.tokenizer.encode(
        "the cat") == byte_tokenizer().encode("the cat")
    logits = lm.model(ids)[0, -1]
    assert logits.argmax().item() == ord(" ")  # "the cat sat on" -> " the mat"


def test_stop_and_resume_gives_the_uninterrupted_losses(dataset: Path, tmp_path: Path) -> None:
    # two micro-steps per step: the data position inside accumulation must line up too
    train(tiny_config(dataset, tmp_path / "straight"), progress=False)
    cut = tiny_config(dataset, tmp_path / "cut")
    train(cut, stop_at=5, progress=False)
    assert sorted(losses(tmp_path / "cut")) == [1, 2, 3, 4, 5]
    with pytest.raises(DraftlmError, match="--resume"):
        train(cut, progress=False)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # logged, then killed
        f.write(json.dumps({"step": 6, "loss": 0.0}) + "\n")
    train(cut, resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")  # bit-for-bit
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    val_a = {r["step"]: r["val_loss"] for r in a if "val_loss" in r}
    val_b = {r["step"]: r["val_loss"] for r in b if "val_loss" in r}
    assert sorted(val_a) == [0, 6, 12] and sorted(val_b) == [0, 5, 6, 12]  # + the stop at 5
    assert all(val_a[s] == val_b[s] for s in val_a)


def test_resume_refuses_another_config_and_damaged_checkpoints(
    dataset: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(dataset, tmp_path / "run")
    train(cfg, stop_at=2, progress=False)
    with pytest.raises(DraftlmError, match="other settings.*seq_len"):
        train(tiny_config(dataset, tmp_path / "run", seq_len=16), resume=True, progress=False)
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DraftlmError, match="truncated"):
        train(cfg, resume=True, progress=False)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_only_on_matrices() -> None:
    from draftlm.config import ModelConfig
    from draftlm.model import Transformer

    model = Transformer(ModelConfig.from_name("tiny"))
    decayed, plain = build_optimizer(model, TrainConfig()).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 5


def test_recipe_maps_onto_the_config(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\nlr: 6e-4\nbetas: [0.9, 0.95]\n"
                      "data: [a, {path: b, weight: 3}]\n")
    cfg = resolve_config(str(recipe), set_fields=["min_lr=6e-5", "warmup_steps=7"],
                         max_steps=9)
    assert cfg.lr == 6e-4 and cfg.min_lr == 6e-5 and cfg.warmup_steps == 7
    assert cfg.max_steps == 9 and cfg.betas == (0.9, 0.95)
    assert cfg.data == [{"path": "a", "weight": 1.0}, {"path": "b", "weight": 3}]
    recipe.write_text("lr: 1\nlearning_rate: 2\n")
    with pytest.raises(DraftlmError, match="unknown recipe fields: learning_rate"):
        resolve_config(str(recipe))


def test_global_batch_must_divide(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DraftlmError, match="not a multiple"):
        train(tiny_config(dataset, tmp_path / "r", global_batch_tokens=200), progress=False)


def test_finetune_from_a_training_checkpoint(dataset: Path, tmp_path: Path) -> None:
    train(tiny_config(dataset, tmp_path / "base"), stop_at=3, progress=False)
    (ckpt,) = (tmp_path / "base" / "checkpoints").iterdir()
    cfg = tiny_config(dataset, tmp_path / "ft", init=str(ckpt), max_steps=2, lr=1e-9,
                      min_lr=1e-9, warmup_steps=1)
    train(cfg, progress=False)
    base, tuned = losses(tmp_path / "base"), losses(tmp_path / "ft")
    assert tuned[1] < base[1] - 0.05  # it starts where the base run left off, not at random


def test_export_loads_in_hf_transformers_with_the_same_logits(
    dataset: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers", reason="HF transformers (peer) missing")
    summary = train(tiny_config(dataset, tmp_path / "run", max_steps=2, export=True),
                    progress=False)
    from draftlm.load import load

    ours = load(summary["export"], dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["export"]).eval()
    ids = torch.tensor([byte_tokenizer().encode("the dog ran")])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours.model(ids), atol=1e-5)


def test_val_data_folders_are_evaluated(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "held.txt").write_text("the cat sat on the mat. " * 30)
    prepare([str(tmp_path / "held.txt")], str(tmp_path / "held"), byte_tokenizer(),
            val_fraction=1.0, workers=1, progress=False)
    cfg = tiny_config(dataset, tmp_path / "run", max_steps=1, val_data=[str(tmp_path / "held")])
    summary = train(cfg, progress=False)
    # one repeated sentence: a different number than the main data's val split would give
    other = train(tiny_config(dataset, tmp_path / "run2", max_steps=1), progress=False)
    assert summary["val_loss"] != other["val_loss"]
    assert summary["loss"] == other["loss"]


def test_cli_pretrain_and_finetune(dataset: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from draftlm.cli import main

    common = ["--data", str(dataset), "--seq-len", "16", "--micro-batch-size", "2",
              "--global-batch-tokens", "32", "--device", "cpu", "--precision", "fp32",
              "--max-steps", "2", "--set", "tensorboard=false", "--set", "cpu_threads=1"]
    assert main(["pretrain", *common, "--out-dir", str(tmp_path / "p"), "--model", "tiny"]) == 0
    pre = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert pre["step"] == 2 and Path(pre["export"], "config.json").is_file()
    assert main(["finetune", *common, "--out-dir", str(tmp_path / "f"), "--init",
                 pre["export"], "--lr", "1e-4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert main(["finetune", *common, "--out-dir", str(tmp_path / "g")]) == 1
    assert "--init" in capsys.readouterr().err


def test_activation_checkpointing_keeps_the_losses(dataset: Path, tmp_path: Path) -> None:
    train(tiny_config(dataset, tmp_path / "plain", max_steps=3), progress=False)
    train(tiny_config(dataset, tmp_path / "ac", max_steps=3, activation_checkpointing=True),
          progress=False)
    plain, ac = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert plain.keys() == ac.keys()
    assert all(abs(plain[s] - ac[s]) < 1e-6 for s in plain)
    # the wrapper does not rename parameters: the checkpoint holds the plain names
    from safetensors.torch import load_file

    names = load_file(tmp_path / "ac" / "checkpoints" / "step-000003" / "model.safetensors")
    assert "layers.0.self_attn.q_proj.weight" in names


def test_bf16_autocast_on_cpu_tracks_fp32(dataset: Path, tmp_path: Path) -> None:
    train(tiny_config(dataset, tmp_path / "fp32", max_steps=3), progress=False)
    train(tiny_config(dataset, tmp_path / "bf16", max_steps=3, precision="bf16"), progress=False)
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32 != bf16  # autocast did take effect
    assert all(abs(fp32[s] - bf16[s]) < 0.05 for s in fp32)
    start = read_metrics(tmp_path / "bf16" / "metrics.jsonl")[0]
    assert start["autocast"] == "torch.bfloat16"
    with pytest.raises(DraftlmError, match="unknown precision"):
        train(tiny_config(dataset, tmp_path / "x", precision="fp8"), progress=False)
