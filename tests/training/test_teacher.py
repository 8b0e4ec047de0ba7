"""Teacher shards: the target's top-k over prepared windows, resumable, refusing mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, make_tiny_lm

from draftlm.data.prepare import prepare
from draftlm.errors import DraftlmError
from draftlm.formats.hf import save_hf_folder
from draftlm.training.teacher import TeacherLoader, TeacherWindows, compute_teacher

TEXT = "def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teacher")
    (root / "code.txt").write_text(TEXT + "".join(f"x{i} = {i * i}\n" for i in range(300)))
    prepare([str(root / "code.txt")], str(root / "data"), byte_tokenizer(), val_fraction=0.0,
            progress=False, workers=1)
    lm = make_tiny_lm(seed=0)
    save_hf_folder(root / "target", lm.config, lm.model, lm.tokenizer)
    other = make_tiny_lm(seed=0, n_layers=1)
    save_hf_folder(root / "other", other.config, other.model, other.tokenizer)
    return {"root": root, "data": root / "data", "target": root / "target",
            "other": root / "other"}


def run(setup, out: str, **changes):
    args = dict(target=str(setup["target"]), data=str(setup["data"]),
                output=str(setup["root"] / out), num_windows=5, seq_len=32, top_k=4,
                windows_per_shard=2, dtype="float32", progress=False)
    return compute_teacher(**{**args, **changes})


def test_shards_hold_the_targets_top_k(setup) -> None:
    manifest = run(setup, "t1")
    assert manifest["complete"] and [s["num_windows"] for s in manifest["shards"]] == [2, 2, 1]
    data = TeacherWindows(setup["root"] / "t1")
    assert data.num_windows == 5
    lm = make_tiny_lm(seed=0)
    for w in (0, 3, 4):
        row = data.read(w)
        assert row["tokens"].shape == (33,) and row["topk_ids"].shape == (32, 4)
        with torch.no_grad():
            logits = lm.model(row["tokens"][None, :-1])[0].float()
        top = torch.log_softmax(logits, -1).topk(4, -1)
        assert torch.equal(row["topk_ids"].long(), top.indices)
        torch.testing.assert_close(row["topk_logprobs"].float(), top.values, atol=2e-3,
                                   rtol=2e-3)
    # Windows are distinct pieces of the data, in a seeded order.
    starts = {tuple(data.read(w)["tokens"][:8].tolist()) for w in range(5)}
    assert len(starts) == 5


def test_an_interrupted_run_resumes_after_the_last_shard(setup) -> None:
    first = run(setup, "t2", num_windows=3)
    assert first["complete"] and sum(s["num_windows"] for s in first["shards"]) == 3
    grown = run(setup, "t2", num_windows=5)  # continue: two more windows, same order
    whole = run(setup, "t2-whole", num_windows=5)
    a, b = TeacherWindows(setup["root"] / "t2"), TeacherWindows(setup["root"] / "t2-whole")
    assert grown["complete"]
    for w in range(5):
        assert torch.equal(a.read(w)["tokens"], b.read(w)["tokens"])
    assert whole["target_fingerprint"] == grown["target_fingerprint"]


def test_a_time_limit_stops_after_a_shard(setup) -> None:
    manifest = run(setup, "t3", max_minutes=0.0)
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    assert not list((setup["root"] / "t3").glob(".*tmp*"))


def test_mismatches_are_one_line_errors(setup) -> None:
    run(setup, "t4", num_windows=2)
    with pytest.raises(DraftlmError, match="other settings"):
        run(setup, "t4", num_windows=2, top_k=8)
    manifest = json.loads((setup["root"] / "t4" / "manifest.json").read_text())
    manifest["target_fingerprint"] = "0" * 64
    (setup["root"] / "t4" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DraftlmError, match="another target"):
        run(setup, "t4", num_windows=2)
    with pytest.raises(DraftlmError, match="fewer than --num-windows"):
        run(setup, "t5", num_windows=10_000)
    with pytest.raises(DraftlmError, match="no teacher shards"):
        TeacherWindows(setup["root"] / "nowhere")
    (setup["root"] / "bad").mkdir()
    (setup["root"] / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DraftlmError, match="damaged"):
        TeacherWindows(setup["root"] / "bad")


def test_a_damaged_shard_is_named(setup) -> None:
    run(setup, "t6", num_windows=2)
    shard = next((setup["root"] / "t6").glob("teacher-*.safetensors"))
    shard.write_bytes(b"\x00" * 10)
    with pytest.raises(DraftlmError, match="missing or damaged"):
        TeacherWindows(setup["root"] / "t6").read(0)


def test_loader_is_a_permutation_per_epoch_and_resumes_exactly(setup) -> None:
    run(setup, "t7")
    loader = TeacherLoader(setup["root"] / "t7", micro_batch_size=1, seed=3)
    first_epoch = [tuple(loader.next_batch()["tokens"][0, :8].tolist()) for _ in range(5)]
    assert len(set(first_epoch)) == 5
    state = loader.state_dict()
    rest = [loader.next_batch()["tokens"] for _ in range(4)]
    again = TeacherLoader(setup["root"] / "t7", micro_batch_size=1, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch()["tokens"]) for a in rest)
    # Two ranks of one micro-batch each see what one process with two per batch sees.
    one = TeacherLoader(setup["root"] / "t7", micro_batch_size=2, seed=3).next_batch()
    ranks = [TeacherLoader(setup["root"] / "t7", 1, seed=3, rank=r, world_size=2).next_batch()
             for r in range(2)]
    assert torch.equal(one["topk_ids"], torch.cat([r["topk_ids"] for r in ranks]))
