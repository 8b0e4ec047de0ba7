"""Training checkpoints: exact round trip, damage detection, kill-safety of the writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.model import Transformer
from draftlm.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_model_tensors,
    read_checkpoint_state,
    save_checkpoint,
)

IDENTITY = {"model_config": "tiny", "seq_len": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(tied: bool, seed: int = 0) -> tuple[Transformer, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny").with_(tie_embeddings=tied))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randint(0, 256, (2, 8))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_restores_model_optimizer_and_rng(tmp_path: Path, tied: bool) -> None:
    model, optimizer = _trained(tied)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 7, model, optimizer,
                           {"identity": IDENTITY, "loader": {"counts": [5]}}, tied, True, 2)
    expected_random = torch.rand(3)
    fresh, fresh_opt = _trained(tied, seed=1)
    state = load_checkpoint(path, fresh, fresh_opt, tied, IDENTITY)
    assert state["step"] == 7 and state["loader"] == {"counts": [5]}
    assert torch.equal(torch.rand(3), expected_random)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if tied:
        assert fresh.lm_head.weight is fresh.embed_tokens.weight
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        sa, sb = optimizer.state[p], fresh_opt.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    batch = torch.randint(0, 256, (2, 8))
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        m(batch).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(),
                                                  strict=True))


def test_keep_last_and_damage_detection(tmp_path: Path) -> None:
    model, optimizer = _trained(False)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {"identity": IDENTITY}, False, True, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    last = list_checkpoints(tmp_path)[-1]
    with pytest.raises(DraftlmError, match="other settings"):
        load_checkpoint(last, model, optimizer, False, {**IDENTITY, "seq_len": 9})
    weights = last / "optimizer.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DraftlmError, match="checksum"):
        read_checkpoint_state(last)
    (list_checkpoints(tmp_path)[0] / "state.json").unlink()
    with pytest.raises(DraftlmError, match="not a complete training checkpoint"):
        load_model_tensors(list_checkpoints(tmp_path)[0])


WRITER = """
import sys, torch
from draftlm.config import ModelConfig
from draftlm.model import Transformer
from draftlm.training.checkpoint import save_checkpoint
from pathlib import Path
torch.set_num_threads(1)
model = Transformer(ModelConfig.from_name("tiny").with_(dim=512, n_heads=8, n_kv_heads=8,
                    intermediate_size=1024, n_layers=3, vocab_size=4096))
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
opt.step()
step = 0
while True:
    step += 1
    save_checkpoint(Path(sys.argv[1]), step, model, opt, {"identity": {}}, False, True, 2)
"""


@pytest.mark.slow
def test_a_killed_writer_never_leaves_a_checkpoint_that_loads(tmp_path: Path) -> None:
    """SIGKILL the writer at several moments while a temporary folder exists (mid-write,
    mid-rename, mid-prune): every `step-*` folder left must verify and load."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = tmp_path / "ckpt"
    for delay_s in (0.0, 0.05, 0.2, 0.4):
        proc = subprocess.Popen([sys.executable, str(script), str(root)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while not list(root.glob(".step-*.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        for folder in list_checkpoints(root):
            state = read_checkpoint_state(folder)
            assert json.loads((folder / "state.json").read_text())["step"] == state["step"]
            assert "embed_tokens.weight" in load_model_tensors(folder)
    assert list(root.glob(".step-*"))  # a kill mid-write did leave debris, ignored above


def test_export_checkpoint_as_hf_folder(tmp_path: Path) -> None:
    from draftlm.load import load
    from draftlm.training.checkpoint import export_checkpoint

    model, optimizer = _trained(True)
    data = tmp_path / "data"
    byte_tokenizer().save(data / "tokenizer")
    identity = {"model_config": model.config.to_dict(), "data": [{"path": str(data)}]}
    path = save_checkpoint(tmp_path / "ck", 3, model, optimizer, {"identity": identity},
                           True, True, 1)
    out = export_checkpoint(path, tmp_path / "hf")
    lm = load(out, dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids), model.eval()(ids))
    assert lm.tokenizer.encode("ab") == [97, 98]


def test_debris_of_interrupted_saves_is_removed(tmp_path: Path) -> None:
    """What a save or a deletion killed midway leaves (`.step-*.tmp-*`, `.step-*.trash-*`)
    goes with the next save; other hidden files stay."""
    from draftlm.training.checkpoint import remove_stale

    model, optimizer = _trained(False)
    root = tmp_path / "ck"
    for name in (".step-000004.tmp-1a2b3c4d", ".step-000002.trash-deadbeef"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"partial")
    (root / ".keep").mkdir()
    save_checkpoint(root, 5, model, optimizer, {"identity": {}}, False, True, 2)
    assert sorted(p.name for p in root.iterdir()) == [".keep", "step-000005"]
    (root / ".step-000006.tmp-0f0f0f0f").mkdir()
    assert [p.name for p in remove_stale(root)] == [".step-000006.tmp-0f0f0f0f"]
    assert remove_stale(tmp_path / "absent") == []
