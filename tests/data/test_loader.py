"""TokenLoader: bijective shuffling, cross-shard reads, exact resume, rank split, mixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import byte_tokenizer

from draftlm.data.loader import PackedTokens, TokenLoader, permute, val_batches
from draftlm.data.prepare import prepare
from draftlm.errors import DraftlmError


def make_dataset(folder: Path, letter: str, num_docs: int = 40) -> Path:
    src = folder.with_suffix(".jsonl")
    lines = [f'{{"text": "{letter * (i % 5 + 3)} {i}"}}\n' for i in range(num_docs)]
    src.write_text("".join(lines))
    prepare([str(src)], str(folder), byte_tokenizer(), shard_tokens=37, val_fraction=0.2,
            workers=1, progress=False)
    return folder


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_permute_is_a_bijection(n: int) -> None:
    out = permute(np.arange(n), n, seed=5)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 100:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, permute(np.arange(n), n, seed=6))


def test_stream_reads_cross_shard_boundaries(tmp_path: Path) -> None:
    data = PackedTokens(make_dataset(tmp_path / "a", "a"), "train")
    assert len(data.shards) > 3
    flat = np.concatenate([np.asarray(s) for s in data.shards])
    for start, length in [(0, 5), (30, 20), (36, 2), (0, data.num_tokens), (50, 74)]:
        assert np.array_equal(data.read(start, length), flat[start : start + length])


def test_one_epoch_visits_every_window_once(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "a", "a")
    loader = TokenLoader([(folder, 1.0)], seq_len=8, micro_batch_size=1, seed=3)
    data = loader.data[0]
    n = loader.windows[0]
    rows = [loader.next_batch()[0] for _ in range(n)]
    expected = sorted(tuple(data.read(w * 8, 9).tolist()) for w in range(n))
    assert sorted(tuple(r.tolist()) for r in rows) == expected
    assert rows[0].shape == (9,) and rows[0].dtype == torch.int64


def test_resume_from_state_continues_identically(tmp_path: Path) -> None:
    folders = [(make_dataset(tmp_path / "a", "a"), 2.0), (make_dataset(tmp_path / "b", "b"), 1.0)]
    straight = TokenLoader(folders, seq_len=6, micro_batch_size=3, seed=1)
    expected = [straight.next_batch() for _ in range(12)]
    first = TokenLoader(folders, seq_len=6, micro_batch_size=3, seed=1)
    got = [first.next_batch() for _ in range(5)]
    second = TokenLoader(folders, seq_len=6, micro_batch_size=3, seed=1)
    second.load_state_dict(first.state_dict())
    got += [second.next_batch() for _ in range(7)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    with pytest.raises(DraftlmError, match="another data"):
        TokenLoader(folders, seq_len=7, micro_batch_size=3).load_state_dict(first.state_dict())


def test_ranks_split_the_global_batch(tmp_path: Path) -> None:
    folder = [(make_dataset(tmp_path / "a", "a"), 1.0)]
    single = TokenLoader(folder, seq_len=5, micro_batch_size=4, seed=2)
    ranks = [TokenLoader(folder, seq_len=5, micro_batch_size=2, seed=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(6):
        whole = single.next_batch()
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), whole)


def test_mixture_follows_the_weights(tmp_path: Path) -> None:
    a, b = make_dataset(tmp_path / "a", "a"), make_dataset(tmp_path / "b", "b")
    loader = TokenLoader([(a, 3.0), (b, 1.0)], seq_len=4, micro_batch_size=8, seed=0)
    batches = torch.cat([loader.next_batch() for _ in range(50)])
    assert loader.counts == [300, 100]
    letters = [chr(int(x)) for x in batches[:, 0]]
    from_b = sum(1 for row in batches if ord("b") in row.tolist() and ord("a") not in row.tolist())
    assert from_b > 0 and letters.count("a") > letters.count("b")


def test_val_batches_are_fixed_and_split(tmp_path: Path) -> None:
    data = PackedTokens(make_dataset(tmp_path / "a", "a", num_docs=200), "val")
    whole = list(val_batches(data, seq_len=4, micro_batch_size=2, max_sequences=8))
    parts = [list(val_batches(data, 4, 1, 8, rank=r, world_size=2)) for r in range(2)]
    assert len(whole) == 4 and len(parts[0]) == len(parts[1]) == 4
    for i, batch in enumerate(whole):
        assert torch.equal(batch, torch.cat([parts[0][i], parts[1][i]]))
    assert torch.equal(whole[0][0], torch.from_numpy(data.read(0, 5)))


def test_datasets_with_different_tokenizers_are_rejected(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from draftlm.tokenizer import Tokenizer

    other = Tokenizer(HFTokenizer(models.WordLevel({"x": 0, "[UNK]": 1}, unk_token="[UNK]")),
                      eos_ids=(0,))
    (tmp_path / "o.txt").write_text("x x x x x x x x x x x x x x x x x x x")
    prepare([str(tmp_path / "o.txt")], str(tmp_path / "o"), other, val_fraction=0.0, workers=1,
            progress=False)
    with pytest.raises(DraftlmError, match="different tokenizers"):
        TokenLoader([(make_dataset(tmp_path / "a", "a"), 1.0), (tmp_path / "o", 1.0)], 2, 1)
